"""Reading checkpoints safely, from a file or an address, and fitting their weights to a model.

:func:`load_checkpoint_file` is mmdat's one reader of checkpoints: DAT's ``init_cfg``, the model
converters and the tools call it, and :func:`use_safe_checkpoint_loader` makes mmengine call it
for every source (the runner's ``load_from`` and ``resume``, ``Pretrained`` init_cfgs of any
module, the mmdet/mmseg inferencers). What it refuses and how to trust a file:
``docs/weights.md``.
"""
import logging
import os
import os.path as osp
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile
from http.client import HTTPException
from typing import Callable, Dict, List, Mapping, Optional, Tuple
from urllib.parse import unquote, urlparse

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.logging import print_log
from mmengine.runner.checkpoint import CheckpointLoader

from .restricted_pickle import (CONFIG_CLASSES, OmittedObject, Refused, Unreadable, _MemoryGuard,
                                object_allowance, restricted_pickle_module)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or whose weights do not fit the model.

    Its message is one line that names the file (or address) and the reason.
    """


#: Sources the user trusted with :func:`trust_checkpoint`: real paths of files, and addresses.
_TRUSTED = set()

#: Seconds a download may wait for the server before it is given up.
DOWNLOAD_TIMEOUT = 60

#: Name schemes that mmengine resolves to an address (or a file) through its model tables.
_NAMED_SCHEMES = ('open-mmlab', 'openmmlab', 'torchvision', 'modelzoo', 'mmcls')


def _trust_keys(source: str, path: Optional[str] = None) -> List[str]:
    keys = [osp.realpath(path)] if path else []
    if '://' in source and not source.lower().startswith('file://'):
        keys.append(source)
    return keys


def trust_checkpoint(source: str) -> None:
    """Let :func:`load_checkpoint_file` unpickle ``source`` without restrictions.

    Only for files the user vouches for (the tools' ``--trust-checkpoint``): unpickling such a
    file may run any code it holds.

    Args:
        source (str): A path, a ``file://`` URL, or an address; trusting an ``http(s)://``
            address trusts the file cached for it in torch's hub cache (which, as torch's and
            mmengine's, is keyed by the file name).
    """
    if '://' in source and not source.lower().startswith('file://'):
        _TRUSTED.add(source)
    else:
        _TRUSTED.add(osp.realpath(_local_path(source)))


def _local_path(source: str) -> str:
    if source.lower().startswith('file://'):
        parsed = urlparse(source)
        if parsed.netloc not in ('', 'localhost'):
            raise CheckpointError(f'{source}: a file:// URL on another host ({parsed.netloc})')
        return unquote(parsed.path)
    return osp.expanduser(source)


def _download(url: str) -> str:
    """The file cached for ``url`` in torch's hub cache (``torch.hub.get_dir()/checkpoints``,
    named as torch and mmengine name it), downloaded first if it is not there."""
    name = osp.basename(urlparse(url).path)
    if not name:
        raise CheckpointError(f'{url} names no file to download')
    cache_dir = osp.join(torch.hub.get_dir(), 'checkpoints')
    path = osp.join(cache_dir, name)
    if osp.isfile(path):
        return path
    os.makedirs(cache_dir, exist_ok=True)
    print_log(f'Downloading {url} to {path}', logger='current')
    handle, partial = tempfile.mkstemp(dir=cache_dir, prefix=f'.{name}.', suffix='.partial')
    try:
        request = urllib.request.Request(url, headers={'User-Agent': 'mmdat'})
        with os.fdopen(handle, 'wb') as out, \
                urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT) as response:
            shutil.copyfileobj(response, out, 2**20)
            announced, received = response.getheader('Content-Length'), out.tell()
        # http.client ends a read at a closed connection without an error
        if announced is not None and announced.isdigit() and int(announced) != received:
            raise CheckpointError(f'{url} could not be downloaded: the connection closed after '
                                  f'{received} of {announced} bytes')
        os.replace(partial, path)  # a partial download never takes the cached name
    except urllib.error.HTTPError as error:
        raise CheckpointError(f'{url} could not be downloaded: HTTP {error.code} '
                              f'{error.reason}') from None
    except urllib.error.URLError as error:
        raise CheckpointError(f'{url} could not be downloaded: {error.reason}') from None
    except (OSError, HTTPException) as error:
        raise CheckpointError(f'{url} could not be downloaded: {_reason(error)}') from None
    finally:
        if osp.exists(partial):
            os.remove(partial)
    return path


def _named_model(source: str) -> Tuple[str, Optional[Callable]]:
    """The address (or file) that mmengine's model tables give for ``open-mmlab://NAME`` etc.,
    and what mmengine does to the checkpoint after loading it."""
    from mmengine.runner import checkpoint as mmengine_checkpoint
    scheme, name = source.split('://', 1)
    scheme = scheme.lower()
    process = None
    try:
        if scheme in ('open-mmlab', 'openmmlab'):
            name = mmengine_checkpoint.get_deprecated_model_names().get(name, name)
            target = mmengine_checkpoint.get_external_models()[name]
            if not target.startswith(('http://', 'https://')):
                target = osp.join(mmengine_checkpoint._get_mmengine_home(), target)
        elif scheme in ('torchvision', 'modelzoo'):
            target = mmengine_checkpoint.get_torchvision_models()[name]
        else:
            target = mmengine_checkpoint.get_mmcls_models()[name]
            process = mmengine_checkpoint._process_mmcls_checkpoint
    except KeyError:
        raise CheckpointError(f'{source}: no model of that name in mmengine\'s {scheme} '
                              'table') from None
    except ImportError as error:
        raise CheckpointError(f'{source}: {_reason(error)}') from None
    return target, process


def _resolve(source: str) -> Tuple[str, str, List[str], Optional[Callable]]:
    """``(local file, name for messages, trust keys, post-processing)`` of a source."""
    if '://' not in source or source.lower().startswith('file://'):
        path = _local_path(source)
        if not osp.isfile(path):
            raise FileNotFoundError(f'Checkpoint file not found: {source}')
        return path, source, _trust_keys(source, path), None
    scheme = source.split('://', 1)[0].lower()
    if scheme in ('http', 'https'):
        path = _download(source)
        return path, f'{source} (cached as {path})', _trust_keys(source, path), None
    if scheme in _NAMED_SCHEMES:
        target, process = _named_model(source)
        path, _, keys, _ = _resolve(target)
        return path, f'{source} ({target})', keys + _trust_keys(source), process
    raise CheckpointError(f'{source}: mmdat reads checkpoints from local files, file:// and '
                          'http(s):// addresses (and the names of open-mmlab://, torchvision:// '
                          f'and mmcls://), not from {scheme}:// sources; copy the file here and '
                          'pass its path')


def _reason(error: BaseException) -> str:
    """The first sentence of an error message, after the error's type."""
    if isinstance(error, Refused):
        return str(error)  # our own one-line message
    lines = str(error).strip().splitlines()
    text = lines[0].split('. ')[0] if lines else ''
    text = text if len(text) <= 160 else text[:157] + '...'
    return f'{type(error).__name__}: {text}' if text else type(error).__name__


def _storage_element_size(storage_type) -> int:
    if storage_type is torch.UntypedStorage:
        return 1
    dtype = getattr(storage_type, 'dtype', None)
    if not isinstance(dtype, torch.dtype):
        raise Refused(f'refused a storage of type {storage_type!r}')
    return torch._utils._element_size(dtype)


def _zip_storage_check(path: str) -> Tuple[Callable, int]:
    """The storage check of a zip checkpoint (each storage must be a member of exactly the size
    it declares, and no member may be larger than its bytes in the file), and its pickle's size.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        raise Unreadable('a truncated or damaged zip archive') from None
    names = [member.filename for member in members]
    if not members or len(set(names)) != len(names):
        raise Unreadable('a zip archive with no members or with two of one name')
    if any(name.endswith('constants.pkl') for name in names):
        raise Refused('refused a TorchScript archive (load it with torch.jit.load if you trust it)')
    for member in members:
        if member.file_size > member.compress_size:
            raise Unreadable(f'refused a compressed zip member ({member.filename}: '
                            f'{member.file_size} bytes from {member.compress_size})')
    prefix = names[0].split('/', 1)[0]  # torch's reader takes the first member's folder
    sizes = {member.filename: member.file_size for member in members}
    pickle_size = sizes.get(f'{prefix}/data.pkl', 0)
    seen = set()

    def check(pid) -> int:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ('storage', b'storage')):
            raise Refused(f'refused a persistent id {pid!r:.80}')
        _, storage_type, key, location, numel = pid
        if type(key) is not str or type(numel) is not int or numel < 0 or \
                not isinstance(location, (str, bytes)):
            raise Refused(f'refused a persistent id {pid!r:.80}')
        nbytes = numel * _storage_element_size(storage_type)
        held = sizes.get(f'{prefix}/data/{key}')
        if held is None or nbytes != held:
            raise Unreadable(f'refused storage {key!r}: it declares {nbytes} bytes, the file holds '
                            f'{held or 0}')
        if key in seen:
            return 0
        seen.add(key)
        return nbytes

    return check, pickle_size


def _legacy_storage_check(file_size: int) -> Callable:
    """The storage check of the legacy format: all storages together within the file size."""
    declared = {}

    def check(pid) -> int:
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] in ('storage', b'storage')):
            raise Refused(f'refused a persistent id {pid!r:.80}')
        _, storage_type, key, location, numel, view = pid
        if type(key) is not str or type(numel) is not int or numel < 0 or \
                not isinstance(location, (str, bytes)) or not (view is None or (
                    isinstance(view, tuple) and len(view) == 3 and type(view[0]) is str
                    and all(type(v) is int and v >= 0 for v in view[1:]))):
            raise Refused(f'refused a persistent id {pid!r:.80}')
        if key in declared:
            return 0
        declared[key] = numel * _storage_element_size(storage_type)
        if sum(declared.values()) > file_size:
            raise Unreadable(f'refused storage {key!r}: its storages declare '
                            f'{sum(declared.values())} bytes, more than the file\'s {file_size}')
        return declared[key]

    return check


def _is_torch_tar(path: str) -> bool:
    """The tar format of torch < 0.4, which torch's legacy reader tries first."""
    try:
        with tarfile.open(path, mode='r:', format=tarfile.PAX_FORMAT):
            return True
    except (tarfile.TarError, OSError, ValueError, EOFError):
        return False


def _restricted_load(path: str, map_location):
    """``torch.load`` with the restricted unpickler and the storage and memory checks."""
    with open(path, 'rb') as file:
        is_zip = file.read(4) == b'PK\x03\x04'  # as torch tells the formats apart
    file_size = osp.getsize(path)
    if is_zip:
        storage_check, pickle_size = _zip_storage_check(path)
    elif _is_torch_tar(path):
        raise Refused('refused the tar format of torch < 0.4 (load and save it again with torch '
                      'if you trust it)')
    else:
        storage_check, pickle_size = _legacy_storage_check(file_size), file_size
    guard = _MemoryGuard(object_allowance(pickle_size))
    return torch.load(path, map_location=map_location, weights_only=False,
                      pickle_module=restricted_pickle_module(storage_check, guard))


def load_checkpoint_file(filename: str, map_location='cpu',
                         trusted: Optional[bool] = None) -> Mapping:
    """Read a checkpoint without running code from it, from a file or an address.

    The source is a local path, a ``file://`` URL, an ``http(s)://`` address (downloaded once
    into torch's hub cache, ``torch.hub.get_dir()/checkpoints``, under its file name, as torch
    and mmengine do; a file already there is not downloaded again) or a name of mmengine's
    ``open-mmlab://``, ``torchvision://`` or ``mmcls://`` tables. Whatever the source, the
    local file is read the same way: with an unpickler that builds only tensors, plain
    containers, numeric numpy arrays and mmengine's log buffers, reads a pickled config
    (:data:`CONFIG_CLASSES`, as the official DAT files hold) as an inert
    :class:`OmittedObject`, refuses every other object, and bounds memory (each storage must be
    in the file; objects are limited, see ``restricted_pickle.object_allowance``).

    Args:
        filename (str | os.PathLike): The source.
        map_location: As for :func:`torch.load`. Defaults to ``'cpu'``.
        trusted (bool, optional): Unpickle without restrictions (the file may then run code).
            ``None`` (default): only if :func:`trust_checkpoint` was called for the source (for
            an address: the address or its cached file).

    Returns:
        Mapping: The checkpoint.

    Raises:
        FileNotFoundError: No such local file.
        CheckpointError: The source cannot be read (unknown scheme, download failed, empty,
            not a checkpoint, truncated, holding objects that are not weights, declaring more
            data than it holds); the message is one line naming the source.
    """
    return _read(filename, map_location, trusted)[0]


def _read(filename, map_location, trusted: Optional[bool]) -> Tuple[Mapping, bool]:
    """:func:`load_checkpoint_file`, and whether the source was read as trusted."""
    path, name, trust_keys, process = _resolve(os.fspath(filename))
    if trusted is None:
        trusted = any(key in _TRUSTED for key in trust_keys)
    if osp.getsize(path) == 0:
        raise CheckpointError(f'{name} is not a readable checkpoint: the file is empty')
    try:
        with warnings.catch_warnings():  # torch's note on pickle protocols other than 2
            warnings.filterwarnings('ignore', message='Detected pickle protocol')
            if trusted:
                checkpoint = torch.load(path, map_location=map_location, weights_only=False)
            else:
                checkpoint = _restricted_load(path, map_location)
    except Exception as error:  # torch reports broken files with many error types
        hint = (' (if you trust this file, pass --trust-checkpoint)'
                if getattr(error, 'trust_helps', False) else '')
        raise CheckpointError(f'{name} is not a readable checkpoint: {_reason(error)}{hint}') \
            from None
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f'{name} is not a readable checkpoint: it holds a '
                              f'{type(checkpoint).__name__}, not a dict of weights')
    return (process(checkpoint) if process is not None else checkpoint), trusted


def load_from_mmdat(filename: str, map_location=None) -> Mapping:
    """mmengine's checkpoint loader for every source once mmdat is imported (its log line reads
    "Loads checkpoint by mmdat backend").

    mmengine's ``Runner.resume`` runs ``meta['config']`` as Python (``Config.fromstring``, to
    compare GPU ids), so an untrusted file's ``meta['config']`` is left out, with a warning
    (mmengine saves its own config as ``meta['cfg']``, which it never runs).
    """
    checkpoint, trusted = _read(filename, map_location, None)
    meta = checkpoint.get('meta')
    if not trusted and isinstance(meta, Mapping) and 'config' in meta:
        print_log(f'{filename}: left out meta["config"], which resuming would run as Python code '
                  '(pass --trust-checkpoint if you trust this file)', logger='current',
                  level=logging.WARNING)
        checkpoint = dict(checkpoint, meta={k: v for k, v in meta.items() if k != 'config'})
    return checkpoint


#: The prefixes mmengine registers loaders for.
MMENGINE_PREFIXES = ('', 'http://', 'https://', 'pavi://', r'(\S+\:)?s3://', r'(\S+\:)?petrel://',
                     'modelzoo://', 'torchvision://', 'open-mmlab://', 'openmmlab://', 'mmcls://')


def use_safe_checkpoint_loader() -> None:
    """Make mmengine read every checkpoint source with :func:`load_checkpoint_file`.

    This covers the runner's ``load_from`` and ``resume``, ``Pretrained`` init_cfgs of any
    module, ``mmengine.runner.load_checkpoint`` and the mmdet/mmseg inferencers, for each prefix
    mmengine (or a package imported before) registered.
    """
    prefixes = sorted(set(CheckpointLoader._schemes) | set(MMENGINE_PREFIXES))
    CheckpointLoader.register_scheme(prefixes=prefixes, loader=load_from_mmdat, force=True)


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
