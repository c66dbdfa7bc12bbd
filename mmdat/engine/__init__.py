from .backbone_weights_hook import BackboneWeightsHook
from .hooks import AtomicCheckpointHook, AtomicLocalBackend, write_atomically
from .resume import checkpoint_problem, find_resume_checkpoint, list_checkpoints, set_up_resume
from .safe_globals import MMENGINE_CHECKPOINT_GLOBALS, allow_mmengine_checkpoints
from .work_dir import WorkDirInUseError, WorkDirLock

__all__ = [
    'AtomicCheckpointHook', 'AtomicLocalBackend', 'BackboneWeightsHook',
    'MMENGINE_CHECKPOINT_GLOBALS', 'WorkDirInUseError', 'WorkDirLock', 'allow_mmengine_checkpoints',
    'checkpoint_problem', 'find_resume_checkpoint', 'list_checkpoints', 'set_up_resume',
    'write_atomically'
]
