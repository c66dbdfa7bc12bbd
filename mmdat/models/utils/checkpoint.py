"""Reading checkpoint files safely and fitting their weights to a model."""
import os.path as osp
import pickle
import types
from typing import Dict, Mapping

import torch
import torch.nn.functional as F
from mmengine.runner.checkpoint import CheckpointLoader

#: Globals a checkpoint needs to rebuild its tensors and containers.
_TENSOR_GLOBALS = {
    ('collections', 'OrderedDict'),
    ('torch._utils', '_rebuild_tensor_v2'),
    ('torch._utils', '_rebuild_parameter'),
    ('torch', 'Size'),
}


class _Dropped:
    """Stands in for any other object of a checkpoint (a pickled config, a numpy scalar, ...).

    It accepts whatever pickle hands it and keeps nothing, so loading runs no foreign code.
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


class _TensorOnlyUnpickler(pickle.Unpickler):

    def find_class(self, module, name):
        if (module, name) in _TENSOR_GLOBALS or (module == 'torch' and name.endswith('Storage')):
            return super().find_class(module, name)
        return _Dropped


#: A ``pickle_module`` for :func:`torch.load` that only rebuilds tensors.
_tensor_only_pickle = types.SimpleNamespace(Unpickler=_TensorOnlyUnpickler, load=pickle.load,
                                            __name__='mmdat_tensor_only_pickle')


def load_checkpoint_file(filename: str) -> Mapping:
    """Load a checkpoint without running code from it.

    A local file is read with ``torch.load(weights_only=True)``. If it holds more than weights
    (e.g. the official DAT files pickle a yacs config), it is read again with an unpickler that
    rebuilds tensors and replaces every other object by an empty stand-in. Other sources (URLs,
    ``open-mmlab://`` etc.) go through mmengine's :class:`CheckpointLoader`.

    Raises:
        FileNotFoundError: No such local file.
        ValueError: The file is not a PyTorch checkpoint.
    """
    if not osp.isfile(filename):
        if '://' in filename:
            return CheckpointLoader.load_checkpoint(filename, map_location='cpu')
        raise FileNotFoundError(f'Checkpoint file not found: {filename}')
    try:
        return torch.load(filename, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError:
        pass
    try:
        return torch.load(filename, map_location='cpu', weights_only=False,
                          pickle_module=_tensor_only_pickle)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise ValueError(f'{filename} is not a readable PyTorch checkpoint ({error})') from None


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
