"""Reading a config and preparing it for the tools (train, test, demo, analysis, deployment).

Every problem with a config or with the files it names is a :class:`ConfigError`, whose message
the tools print as one line (see :func:`mmdat.utils.one_line_errors`).
"""
import importlib
import logging
import os.path as osp
from typing import Iterable, List, Optional

import torch
from mmengine.config import Config
from mmengine.logging import print_log
from mmengine.registry import init_default_scope

from mmdat.models.utils import check_pretrained_file, resolve_pretrained
from mmdat.registry import SCOPES


class ConfigError(ValueError):
    """A config that cannot be read, does not fit the tool, or names files that are missing."""


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f'{type(error).__name__}: {lines[0]}' if lines else type(error).__name__


def read_config(path: str, cfg_options: Optional[dict] = None) -> Config:
    """``Config.fromfile(path)`` with ``cfg_options`` (``--cfg-options``) merged in.

    Raises:
        ConfigError: No such file, or the file cannot be read as a config (a syntax error, a
            missing ``_base_``, an exception while it runs), or the options do not fit it.
    """
    if not osp.isfile(path):
        raise ConfigError(f'Config file not found: {path}')
    try:
        cfg = Config.fromfile(path)
    except Exception as error:  # mmengine reports bad configs with many error types
        raise ConfigError(f'Cannot read config {path}: {_first_line(error)}') from error
    if cfg_options:
        try:
            cfg.merge_from_dict(cfg_options)
        except Exception as error:
            raise ConfigError(f'--cfg-options do not fit {path}: {_first_line(error)}') from error
    return cfg

# A top-level ``data_root = ...`` of a config is substituted when the file is read, so
# ``--cfg-options data_root=...`` changes nothing: the hint names the keys that do.
_DATA_HELP = {
    'mmdet': 'Download COCO 2017 and unpack it so that data/coco/{annotations,train2017,val2017} '
             'exist (or point the config elsewhere with --cfg-options '
             'train_dataloader.dataset.data_root=DIR/ val_dataloader.dataset.data_root=DIR/ '
             'test_dataloader.dataset.data_root=DIR/ '
             'val_evaluator.ann_file=DIR/annotations/instances_val2017.json '
             'test_evaluator.ann_file=DIR/annotations/instances_val2017.json)',
    'mmseg': 'Download ADE20K (ADEChallengeData2016) and unpack it to data/ade/ADEChallengeData2016 '
             '(or point the config elsewhere with --cfg-options '
             'train_dataloader.dataset.data_root=DIR/ val_dataloader.dataset.data_root=DIR/ '
             'test_dataloader.dataset.data_root=DIR/)',
}


def load_tool_config(config: str, cfg_options: Optional[dict], launcher: str,
                     work_dir: Optional[str]) -> Config:
    """Load a config as tools/train.py and tools/test.py do.

    Applies ``--cfg-options`` and the launcher, registers the modules of its library and sets the
    work dir: ``work_dir`` if given, else the config's, else ``work_dirs/<config name>``.
    """
    cfg = read_config(config, cfg_options)
    cfg.launcher = launcher
    resolve_pretrained(cfg)  # `pretrained` from a child config or --cfg-options reaches the backbone
    register_scope(cfg)
    cfg.work_dir = work_dir or cfg.get('work_dir') or osp.join(
        'work_dirs', osp.splitext(osp.basename(config))[0])
    return cfg


def register_scope(cfg: Config) -> str:
    """Register the modules of the config's library (mmdet or mmseg), make its scope the current
    one (the registries build in the current scope, which a process that built the other
    library's models before has left at that library's) and return it."""
    scope = cfg.get('default_scope')
    if scope not in SCOPES:
        raise ConfigError(f'The config\'s default_scope must be one of {SCOPES} (inherit an mmdet:: '
                         f'or mmseg:: config), got {scope!r}')
    importlib.import_module(f'{scope}.utils').register_all_modules(init_default_scope=False)
    init_default_scope(scope)
    return scope


def _dataset_paths(dataset: dict) -> List[str]:
    """Files and folders a dataset config reads, looking through dataset wrappers."""
    if 'dataset' in dataset:  # RepeatDataset, ClassBalancedDataset, MultiImageMixDataset
        return _dataset_paths(dataset['dataset'])
    if 'datasets' in dataset:  # ConcatDataset
        return [p for d in dataset['datasets'] for p in _dataset_paths(d)]
    root = dataset.get('data_root') or ''
    paths = []
    if dataset.get('ann_file'):
        paths.append(osp.join(root, dataset['ann_file']))
    for prefix in (dataset.get('data_prefix') or {}).values():
        if isinstance(prefix, str) and prefix:
            paths.append(osp.join(root, prefix))
    return paths


def check_dataset_files(cfg: Config, dataloaders: Iterable[str]) -> None:
    """Raise :class:`ConfigError` listing the data the config reads that is not on disk."""
    missing = []
    for name in dataloaders:
        loader = cfg.get(name)
        if loader:
            missing += [p for p in _dataset_paths(loader['dataset']) if not osp.exists(p)]
    if missing:
        listed = '\n  '.join(dict.fromkeys(missing))
        # A config may say how to get its own data (the demo configs do).
        help_text = cfg.get('dataset_help') or _DATA_HELP[cfg.default_scope]
        raise ConfigError(f'Dataset files not found:\n  {listed}\n{help_text}.')


def adapt_to_cpu(cfg: Config) -> None:
    """Let a GPU config run on a machine without CUDA.

    Distributed runs use the gloo backend and DDP without device ids. Mixed precision (mmengine's
    ``AmpOptimWrapper`` needs an accelerator; CPU autocast gives bfloat16 results that numpy-based
    evaluators cannot read) is turned off, with a message, for training and testing. For the
    ``pytorch`` launcher (torchrun) the process group is started here, because mmengine's
    ``init_dist`` would select a CUDA device; the runner then uses the existing group.
    """
    if torch.cuda.is_available():
        return
    launcher = cfg.get('launcher', 'none')
    if launcher != 'none':
        cfg.setdefault('env_cfg', {}).setdefault('dist_cfg', {})['backend'] = 'gloo'
        # mmengine would give DDP the local rank as a CUDA device id; CPU modules take none.
        wrapper = cfg.get('model_wrapper_cfg') or dict(
            type='MMDistributedDataParallel', broadcast_buffers=False,
            find_unused_parameters=cfg.get('find_unused_parameters', False))
        wrapper['device_ids'] = None
        cfg.model_wrapper_cfg = wrapper
    if launcher == 'pytorch' and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend='gloo')
    optim_wrapper = cfg.get('optim_wrapper')
    if optim_wrapper and optim_wrapper.get('type') == 'AmpOptimWrapper':
        print_log('No CUDA device: training in float32 (AmpOptimWrapper needs a GPU).',
                  logger='current', level=logging.WARNING)
        optim_wrapper.type = 'OptimWrapper'
        optim_wrapper.pop('loss_scale', None)
    test_cfg = cfg.get('test_cfg')
    if test_cfg and test_cfg.get('fp16'):
        print_log('No CUDA device: testing in float32.', logger='current', level=logging.WARNING)
        test_cfg.fp16 = False


#: ``type`` names of mmengine's plain checkpoint hook, which :func:`use_atomic_checkpoints` swaps.
_PLAIN_CHECKPOINT_HOOKS = ('CheckpointHook', 'mmengine.CheckpointHook')


def use_atomic_checkpoints(cfg: Config) -> None:
    """Save checkpoints with mmdat's ``AtomicCheckpointHook`` where the config has mmengine's
    plain ``CheckpointHook`` (same arguments): a crash during a save then loses nothing."""
    hook = (cfg.get('default_hooks') or {}).get('checkpoint')
    if not hook:
        return
    hook_type = hook.get('type')
    if hook_type in _PLAIN_CHECKPOINT_HOOKS or getattr(hook_type, '__name__', None) == 'CheckpointHook':
        hook['type'] = 'AtomicCheckpointHook'


def _pretrained_files(node) -> List[str]:
    """Checkpoints of the ``Pretrained`` init_cfgs (and mmseg's ``pretrained``) in a model cfg."""
    files = []
    if isinstance(node, dict):
        if node.get('type') == 'Pretrained' and isinstance(node.get('checkpoint'), str):
            files.append(node['checkpoint'])
        if isinstance(node.get('pretrained'), str):
            files.append(node['pretrained'])
        for value in node.values():
            files += _pretrained_files(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            files += _pretrained_files(value)
    return files


def check_checkpoint_files(cfg: Config) -> None:
    """Raise :class:`ConfigError` when ``load_from`` or a model's pretrained file is missing."""
    named = [(cfg.get('load_from'), 'load_from')] + [
        (path, 'pretrained weights of the model') for path in _pretrained_files(cfg.get('model'))]
    for path, what in named:
        if path and '://' not in path and not osp.isfile(path):
            raise ConfigError(f'Checkpoint file not found: {path} ({what})')


def check_backbone_weights(cfg: Config) -> None:
    """Raise :class:`ConfigError` when the backbone's weights file is not chosen or missing.

    Checked before training starts (the backbone's ``init_weights`` checks the same, later,
    under any tool). A backbone without ``init_cfg`` (e.g. ``pretrained=None``) passes.
    """
    init_cfg = (cfg.model.get('backbone') or {}).get('init_cfg')
    if init_cfg is not None and init_cfg.get('type') == 'Pretrained':
        try:
            check_pretrained_file(init_cfg.get('checkpoint'))
        except (ValueError, FileNotFoundError) as error:
            raise ConfigError(str(error)) from None
