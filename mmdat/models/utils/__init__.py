from .checkpoint import extract_state_dict, fit_position_tables, load_checkpoint_file
from .ckpt_convert import dat_converter, is_official_dat
from .recording import DeformableAttentionRecord, deformable_blocks, record_deformable_attention

__all__ = [
    'DeformableAttentionRecord', 'dat_converter', 'deformable_blocks', 'extract_state_dict',
    'fit_position_tables', 'is_official_dat', 'load_checkpoint_file', 'record_deformable_attention'
]
