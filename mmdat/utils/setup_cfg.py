"""What tools/train.py and tools/test.py do to a config before handing it to mmengine."""
import importlib
import os.path as osp
from typing import Iterable, List

import torch
from mmengine.config import Config

#: The libraries whose configs the tools run, by ``default_scope``.
SCOPES = ('mmdet', 'mmseg')

_DATA_HELP = {
    'mmdet': 'Download COCO 2017 and unpack it so that data/coco/{annotations,train2017,val2017} '
             'exist (or set data_root with --cfg-options)',
    'mmseg': 'Download ADE20K (ADEChallengeData2016) and unpack it to data/ade/ADEChallengeData2016 '
             '(or set data_root with --cfg-options)',
}


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
        raise SystemExit(f'Dataset files not found:\n  {listed}\n{_DATA_HELP[cfg.default_scope]}.')


def use_cpu_backend_without_cuda(cfg: Config) -> None:
    """Distributed training on CPU needs the gloo backend instead of the configs' nccl."""
    if cfg.get('launcher', 'none') != 'none' and not torch.cuda.is_available():
        cfg.setdefault('env_cfg', {}).setdefault('dist_cfg', {})['backend'] = 'gloo'
