from .inference import (add_checkpoint_arguments, build_inferencer, check_file, check_out_file,
                        load_dat_config, read_image)
from .setup_cfg import (adapt_to_cpu, check_backbone_weights, check_checkpoint_files,
                        check_dataset_files, load_tool_config, register_scope, set_up_resume,
                        use_atomic_checkpoints)

__all__ = [
    'add_checkpoint_arguments', 'adapt_to_cpu', 'build_inferencer', 'check_backbone_weights', 'check_checkpoint_files',
    'check_dataset_files', 'check_file', 'check_out_file', 'load_dat_config', 'load_tool_config',
    'read_image', 'register_scope', 'set_up_resume', 'use_atomic_checkpoints'
]
