"""Reading checkpoint files safely and fitting their weights to a model.

:func:`load_checkpoint_file` is mmdat's one reader of checkpoint files: DAT's ``init_cfg``, the
model converters and the tools call it, and :func:`use_safe_checkpoint_loader` makes mmengine's
runner (``load_from``, ``resume``) and the mmdet/mmseg inferencers call it for local files too.
"""
import logging
import os.path as osp
import pickle
import types
import warnings
from typing import Dict, List, Mapping, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.logging import print_log
from mmengine.runner.checkpoint import CheckpointLoader


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read, or whose weights do not fit the model.

    Its message is one line that names the file and the reason.
    """


# numpy 2 moved ``numpy.core`` to ``numpy._core``; pickles name either.
_NUMPY_GLOBALS = {(f'numpy.{core}.multiarray', name)
                  for core in ('core', '_core') for name in ('_reconstruct', 'scalar')}
_NUMPY_GLOBALS |= {('numpy', 'ndarray'), ('numpy', 'dtype')}

#: ``(module, name)`` globals the restricted reader builds: tensors, their storages and dtypes,
#: plain containers and numpy arrays. Nothing here runs code chosen by the file.
_ALLOWED_GLOBALS = {
    ('collections', 'OrderedDict'),
    ('builtins', 'set'),
    ('builtins', 'frozenset'),
    ('_codecs', 'encode'),  # how protocol 2 pickles bytes
    ('torch._utils', '_rebuild_tensor'),
    ('torch._utils', '_rebuild_tensor_v2'),
    ('torch._utils', '_rebuild_parameter'),
    ('torch', 'Size'),
    ('torch', 'device'),
} | _NUMPY_GLOBALS

#: Classes of the configs that training scripts pickle next to the weights (the official DAT
#: files hold a yacs ``CfgNode``). They are read as inert :class:`OmittedObject` stand-ins.
CONFIG_CLASSES = {('yacs.config', 'CfgNode'), ('argparse', 'Namespace')}

#: Files the user trusted with :func:`trust_checkpoint` (real paths).
_TRUSTED = set()


class OmittedObject:
    """Stands in for a pickled config object (see :data:`CONFIG_CLASSES`).

    It accepts whatever the unpickler hands it and keeps nothing, so reading it runs no code.
    """

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, value):
        pass

    def extend(self, values):
        pass


class _RestrictedUnpickler(pickle.Unpickler):
    """Builds only :data:`_ALLOWED_GLOBALS` (and torch dtypes and storage types); configs become
    :class:`OmittedObject`; any other global is refused before it is imported."""

    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module == 'torch' and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module == 'torch' and name.endswith('Storage') and name.isidentifier():
            return super().find_class(module, name)
        if (module, name) in CONFIG_CLASSES:
            return OmittedObject
        raise pickle.UnpicklingError(f'refused to load {module}.{name}: only tensors, plain '
                                     'containers and numpy arrays are read')


def _restricted_load(file, **kwargs):
    return _RestrictedUnpickler(file, **kwargs).load()


#: A ``pickle_module`` for :func:`torch.load`. torch's reader of the legacy (non-zip) format
#: unpickles its header with ``pickle_module.load``, so both entry points are restricted.
_restricted_pickle = types.SimpleNamespace(Unpickler=_RestrictedUnpickler, load=_restricted_load,
                                           __name__='mmdat_restricted_pickle')


def trust_checkpoint(path: str) -> None:
    """Let :func:`load_checkpoint_file` read ``path`` with an unrestricted unpickler.

    Only for files the user vouches for (the tools' ``--trust-checkpoint``): unpickling such a
    file may run any code it holds.
    """
    _TRUSTED.add(osp.realpath(path))


def _reason(error: BaseException) -> str:
    """The first sentence of an error message, after the error's type."""
    if isinstance(error, pickle.UnpicklingError) and str(error).startswith('refused'):
        return str(error)  # our own message
    lines = str(error).strip().splitlines()
    text = lines[0].split('. ')[0] if lines else ''
    text = text if len(text) <= 160 else text[:157] + '...'
    return f'{type(error).__name__}: {text}' if text else type(error).__name__


def load_checkpoint_file(filename: str, map_location='cpu',
                         trusted: Optional[bool] = None) -> Mapping:
    """Read a checkpoint without running code from it.

    A local file is read with ``torch.load(weights_only=True)`` (both the zip and the legacy
    format; mmdat allow-lists what mmengine checkpoints hold, see ``mmdat.engine.safe_globals``).
    If that refuses the file, it is read with an unpickler that builds only tensors, plain
    containers and numpy arrays, reads a pickled config (:data:`CONFIG_CLASSES`, as the official
    DAT files hold) as an inert :class:`OmittedObject` and refuses every other object. Other
    sources (URLs, ``open-mmlab://`` etc.) go through mmengine's :class:`CheckpointLoader`.

    Args:
        filename (str): A local path or a URL that mmengine can load.
        map_location: As for :func:`torch.load`. Defaults to ``'cpu'``.
        trusted (bool, optional): Unpickle without restrictions (the file may then run code).
            ``None`` (default): only if :func:`trust_checkpoint` was called for the file.

    Returns:
        Mapping: The checkpoint.

    Raises:
        FileNotFoundError: No such local file.
        CheckpointError: The file cannot be read (empty, not a checkpoint, truncated, or holding
            objects that are not weights); the message is one line naming the file.
    """
    if not osp.isfile(filename):
        if '://' in filename:
            return CheckpointLoader.load_checkpoint(filename, map_location=map_location)
        raise FileNotFoundError(f'Checkpoint file not found: {filename}')
    if trusted is None:
        trusted = osp.realpath(filename) in _TRUSTED
    if osp.getsize(filename) == 0:
        raise CheckpointError(f'{filename} is not a readable checkpoint: the file is empty')
    try:
        if trusted:
            checkpoint = torch.load(filename, map_location=map_location, weights_only=False)
        else:
            try:
                with warnings.catch_warnings():  # torch's note on pickle protocols other than 2
                    warnings.filterwarnings('ignore', message='Detected pickle protocol')
                    checkpoint = torch.load(filename, map_location=map_location, weights_only=True)
            except pickle.UnpicklingError:
                # Holds more than weights (e.g. a pickled config): read what is safe to read.
                checkpoint = torch.load(filename, map_location=map_location, weights_only=False,
                                        pickle_module=_restricted_pickle)
    except Exception as error:  # torch reports broken files with many error types
        # Only a file refused for the objects it holds is a question of trust; a damaged one is not.
        refused = isinstance(error, pickle.UnpicklingError) and str(error).startswith('refused')
        hint = ' (if you trust this file, pass --trust-checkpoint)' if refused else ''
        raise CheckpointError(f'{filename} is not a readable checkpoint: {_reason(error)}{hint}') \
            from None
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f'{filename} is not a readable checkpoint: it holds a '
                              f'{type(checkpoint).__name__}, not a dict of weights')
    return checkpoint


def _load_from_local(filename: str, map_location) -> Mapping:
    return load_checkpoint_file(osp.expanduser(filename), map_location=map_location)


def use_safe_checkpoint_loader() -> None:
    """Make mmengine read local checkpoint files with :func:`load_checkpoint_file`.

    This covers the runner's ``load_from`` and ``resume``, ``Pretrained`` init_cfgs of other
    modules and the mmdet/mmseg inferencers.
    """
    CheckpointLoader.register_scheme(prefixes='', loader=_load_from_local, force=True)


def extract_state_dict(checkpoint: Mapping, prefix: str = '') -> Dict[str, torch.Tensor]:
    """The tensors of a checkpoint's ``state_dict``/``model`` entry (or of the checkpoint itself).

    ``module.`` (DDP) prefixes are removed. With ``prefix`` (e.g. ``'backbone.'``) and keys that
    start with it, only those keys are kept, without the prefix.
    """
    state_dict = checkpoint
    for key in ('state_dict', 'model'):
        if key in checkpoint and isinstance(checkpoint[key], Mapping):
            state_dict = checkpoint[key]
            break
    state_dict = {(k[len('module.'):] if k.startswith('module.') else k): v
                  for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    if prefix and any(k.startswith(prefix) for k in state_dict):
        state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return state_dict


#: Largest share of a model's parameters that a checkpoint may leave at random init, unless the
#: user allows more (``--allow-partial-weights``).
MAX_UNLOADED_FRACTION = 0.1


def unloaded_parameters(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> List[str]:
    """Names of the parameters of ``model`` that ``state_dict`` has no weight of that shape for."""
    return [name for name, param in model.named_parameters()
            if name not in state_dict or tuple(state_dict[name].shape) != tuple(param.shape)]


def check_weights_fit(model: nn.Module, checkpoint: Mapping, filename: str,
                      allow_partial: bool = False) -> None:
    """Refuse a checkpoint that leaves over 10% of the model's parameters at random init.

    Args:
        model (nn.Module): The model the checkpoint is loaded into (not a DDP wrapper).
        checkpoint (Mapping): The checkpoint as read.
        filename (str): Its file, for the message.
        allow_partial (bool): Only log the share left at random init. Defaults to False.

    Raises:
        CheckpointError: Too much of the model is not in the checkpoint.
    """
    check_unloaded(model, unloaded_parameters(model, extract_state_dict(checkpoint)), filename,
                   allow_partial)


def check_unloaded(model: nn.Module, unloaded: List[str], filename: str,
                   allow_partial: bool = False) -> None:
    """:func:`check_weights_fit` for a load that reported its ``unloaded`` parameter names."""
    sizes = dict((name, param.numel()) for name, param in model.named_parameters())
    share = sum(sizes[name] for name in unloaded) / max(sum(sizes.values()), 1)
    if share <= MAX_UNLOADED_FRACTION:
        return
    examples = ', '.join(unloaded[:3]) + (', ...' if len(unloaded) > 3 else '')
    message = (f'{filename} leaves {share:.0%} of the model\'s parameters at random init '
               f'({len(unloaded)} of {len(sizes)} tensors, e.g. {examples})')
    if allow_partial:
        print_log(f'{message}; running anyway (--allow-partial-weights).', logger='current',
                  level=logging.WARNING)
        return
    raise CheckpointError(f'{message}: is it a checkpoint of this config? Pass '
                          '--allow-partial-weights to run with it anyway')


def fit_position_tables(state_dict: Dict[str, torch.Tensor],
                        target: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Resize relative position tables (bicubic) to the target's shapes.

    ``relative_position_bias_table`` ``((2w-1)^2, heads)`` follows the window size and
    ``rpe_table`` ``(heads, 2h-1, 2w-1)`` the pre-training map size, the neighborhood attention
    ``rpb`` ``(heads, 2k-1, 2k-1)`` the kernel size. Any other shape mismatch is an
    error naming the key.
    """
    fitted = {}
    for key, value in state_dict.items():
        wanted = target[key].shape if key in target else value.shape
        if value.shape != wanted:
            if key.endswith('relative_position_bias_table') and value.shape[1] == wanted[1]:
                old, new = round(value.shape[0]**0.5), round(wanted[0]**0.5)
                grid = value.T.reshape(1, -1, old, old)
                value = F.interpolate(grid.float(), size=(new, new), mode='bicubic')
                value = value.reshape(-1, new * new).T.to(state_dict[key].dtype)
            elif key.endswith(('rpe_table', '.rpb')) and value.shape[0] == wanted[0]:
                value = F.interpolate(value[None].float(), size=tuple(wanted[1:]), mode='bicubic')
                value = value[0].to(state_dict[key].dtype)
            else:
                raise ValueError(f'Checkpoint weight {key!r} has shape {tuple(value.shape)}, '
                                 f'which cannot be fitted to the model\'s {tuple(wanted)}')
        fitted[key] = value
    return fitted
