from .setup_cfg import adapt_to_cpu, check_dataset_files, register_scope

__all__ = ['adapt_to_cpu', 'check_dataset_files', 'register_scope']
