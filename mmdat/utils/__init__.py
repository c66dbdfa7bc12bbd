from .image import MAX_IMAGE_PIXELS, MAX_IMAGE_SIDE, ImageError, image_file, read_image
from .inference import (add_checkpoint_arguments, build_inferencer, check_file, check_out_file,
                        load_dat_config)
from .tool_config import (ConfigError, adapt_to_cpu, check_backbone_weights,
                          check_checkpoint_files, check_dataset_files, load_tool_config,
                          read_config, register_scope, use_atomic_checkpoints)
from .tool_errors import error_line, one_line_errors

__all__ = [
    'ConfigError', 'ImageError', 'MAX_IMAGE_PIXELS', 'MAX_IMAGE_SIDE', 'adapt_to_cpu',
    'add_checkpoint_arguments', 'build_inferencer', 'check_backbone_weights',
    'check_checkpoint_files', 'check_dataset_files', 'check_file', 'check_out_file', 'error_line',
    'image_file',
    'load_dat_config', 'load_tool_config', 'one_line_errors', 'read_config', 'read_image',
    'register_scope', 'use_atomic_checkpoints'
]
