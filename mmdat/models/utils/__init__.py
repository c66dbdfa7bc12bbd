from .checkpoint import (CheckpointError, check_unloaded, check_weights_fit, extract_state_dict, fit_position_tables,
                         load_checkpoint_file, trust_checkpoint, unloaded_parameters,
                         use_safe_checkpoint_loader)
from .ckpt_convert import (dat_converter, dat_det_seg_converter, is_official_dat,
                           is_official_dat_det_seg, is_official_datpp)
from .pretrained import check_pretrained_file, load_backbone_weights, resolve_pretrained, resolved_init_cfg
from .recording import DeformableAttentionRecord, deformable_blocks, record_deformable_attention

__all__ = [
    'CheckpointError', 'DeformableAttentionRecord', 'check_pretrained_file', 'check_unloaded',
    'check_weights_fit', 'dat_converter', 'dat_det_seg_converter', 'deformable_blocks',
    'extract_state_dict', 'fit_position_tables', 'is_official_dat', 'is_official_dat_det_seg',
    'is_official_datpp', 'load_backbone_weights', 'load_checkpoint_file', 'record_deformable_attention',
    'resolve_pretrained', 'resolved_init_cfg', 'trust_checkpoint', 'unloaded_parameters',
    'use_safe_checkpoint_loader'
]
