"""Registers mmdat's models into the ``MODELS`` registries of mmdet and mmseg.

Each library is optional: a library that is not installed is skipped, so mmdat imports with only
torch and mmengine. A library that is installed but fails to import raises as usual.
"""
import importlib

#: OpenMMLab libraries whose ``MODELS`` registry receives mmdat's models.
SCOPES = ('mmdet', 'mmseg')


def register_model(module: type) -> type:
    """Class decorator: register ``module`` into each installed library's ``MODELS``."""
    for scope in SCOPES:
        try:
            registry = importlib.import_module(f'{scope}.registry')
        except ModuleNotFoundError as error:
            if error.name != scope:
                raise
            continue
        registry.MODELS.register_module(module=module)
    return module
