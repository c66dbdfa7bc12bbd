from .setup_cfg import check_dataset_files, register_scope, use_cpu_backend_without_cuda

__all__ = ['check_dataset_files', 'register_scope', 'use_cpu_backend_without_cuda']
