from .setup_cfg import adapt_to_cpu, check_dataset_files, load_tool_config, register_scope

__all__ = ['adapt_to_cpu', 'check_dataset_files', 'load_tool_config', 'register_scope']
