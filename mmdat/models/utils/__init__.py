from .checkpoint import extract_state_dict, fit_position_tables, load_checkpoint_file
from .ckpt_convert import (dat_converter, dat_det_seg_converter, is_official_dat,
                           is_official_dat_det_seg, is_official_datpp)

__all__ = [
    'dat_converter', 'dat_det_seg_converter', 'extract_state_dict', 'fit_position_tables',
    'is_official_dat', 'is_official_dat_det_seg', 'is_official_datpp', 'load_checkpoint_file'
]
