"""What tools/train.py and tools/test.py do to a config before handing it to mmengine."""
import importlib
import logging
import os.path as osp
from typing import Iterable, List, Optional, Union

import torch
from mmengine.config import Config
from mmengine.logging import print_log

from mmdat.models.utils import check_pretrained_file, resolve_pretrained

#: The libraries whose configs the tools run, by ``default_scope``.
SCOPES = ('mmdet', 'mmseg')

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
    cfg = Config.fromfile(config)
    cfg.launcher = launcher
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    resolve_pretrained(cfg)  # `pretrained` from a child config or --cfg-options reaches the backbone
    register_scope(cfg)
    cfg.work_dir = work_dir or cfg.get('work_dir') or osp.join(
        'work_dirs', osp.splitext(osp.basename(config))[0])
    return cfg


def register_scope(cfg: Config) -> str:
    """Register the modules of the config's library (mmdet or mmseg) and return its scope."""
    scope = cfg.get('default_scope')
    if scope not in SCOPES:
        raise SystemExit(f'The config\'s default_scope must be one of {SCOPES} (inherit an mmdet:: '
                         f'or mmseg:: config), got {scope!r}')
    importlib.import_module(f'{scope}.utils').register_all_modules(init_default_scope=False)
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
    """Stop with a clear message when the data the config reads is not on disk."""
    missing = []
    for name in dataloaders:
        loader = cfg.get(name)
        if loader:
            missing += [p for p in _dataset_paths(loader['dataset']) if not osp.exists(p)]
    if missing:
        listed = '\n  '.join(dict.fromkeys(missing))
        # A config may say how to get its own data (the demo configs do).
        help_text = cfg.get('dataset_help') or _DATA_HELP[cfg.default_scope]
        raise SystemExit(f'Dataset files not found:\n  {listed}\n{help_text}.')


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


def _checkpoint_folder(cfg: Config) -> str:
    """Where the checkpoint hook saves: ``out_dir/<work dir name>`` if set, else the work dir."""
    out_dir = ((cfg.get('default_hooks') or {}).get('checkpoint') or {}).get('out_dir')
    if out_dir:
        return osp.join(out_dir, osp.basename(cfg.work_dir.rstrip('/')))
    return cfg.work_dir


def set_up_resume(cfg: Config, resume: Union[str, bool, None]) -> Optional[str]:
    """Set ``cfg.resume``/``cfg.load_from`` for ``tools/train.py --resume [PATH]``.

    Args:
        cfg (Config): The config (its ``work_dir`` set).
        resume (str | bool | None): A checkpoint path; ``True`` for the newest complete
            checkpoint of the work dir (see :func:`mmdat.engine.find_resume_checkpoint`); ``None``
            for no ``--resume`` (a config with ``resume = True`` and no ``load_from`` is then
            treated as ``True``).

    Returns:
        str or None: The checkpoint training resumes from (``None``: from the beginning).

    Raises:
        SystemExit: ``PATH`` does not exist, or the work dir has checkpoints but none complete.
    """
    from mmdat.engine import find_resume_checkpoint
    if resume is None:
        if cfg.get('resume') is not True or cfg.get('load_from'):
            return None
        resume = True
    if resume is True:
        hook = (cfg.get('default_hooks') or {}).get('checkpoint') or {}
        templates = (hook['filename_tmpl'], ) if hook.get('filename_tmpl') else None
        path = find_resume_checkpoint(cfg.work_dir, _checkpoint_folder(cfg),
                                      **(dict(templates=templates) if templates else {}))
        if path is None:
            print_log(f'--resume: no checkpoint in {cfg.work_dir} yet; training starts from the '
                      'beginning', logger='current', level=logging.WARNING)
            cfg.resume, cfg.load_from = False, None
            return None
    else:
        path = resume
        if '://' not in path and not osp.isfile(path):
            raise SystemExit(f'--resume: checkpoint file not found: {path}')
    print_log(f'Resuming from {path}', logger='current')
    cfg.resume, cfg.load_from = True, path
    return path


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
    """Stop with a one-line message when ``load_from`` or a model's pretrained file is missing."""
    named = [(cfg.get('load_from'), 'load_from')] + [
        (path, 'pretrained weights of the model') for path in _pretrained_files(cfg.get('model'))]
    for path, what in named:
        if path and '://' not in path and not osp.isfile(path):
            raise SystemExit(f'Checkpoint file not found: {path} ({what})')


def check_backbone_weights(cfg: Config) -> None:
    """Stop with a one-line message when the backbone's weights file is not chosen or missing.

    Checked before training starts (the backbone's ``init_weights`` checks the same, later,
    under any tool). A backbone without ``init_cfg`` (e.g. ``pretrained=None``) passes.
    """
    init_cfg = (cfg.model.get('backbone') or {}).get('init_cfg')
    if init_cfg is not None and init_cfg.get('type') == 'Pretrained':
        try:
            check_pretrained_file(init_cfg.get('checkpoint'))
        except (ValueError, FileNotFoundError) as error:
            raise SystemExit(str(error)) from None
