from .backbone_weights_hook import BackboneWeightsHook
from .safe_globals import MMENGINE_CHECKPOINT_GLOBALS, allow_mmengine_checkpoints

__all__ = ['BackboneWeightsHook', 'MMENGINE_CHECKPOINT_GLOBALS', 'allow_mmengine_checkpoints']
