"""What tools/demo.py and tools/visualize_deformable.py do to their inputs: check the files, load
a config with a DAT backbone and build mmdet's or mmseg's inferencer for it (the image is read
by :mod:`mmdat.utils.image`)."""
import copy
import importlib
import os.path as osp
from typing import Iterable, Optional, Tuple

from mmengine.config import Config

from mmdat.models.utils import check_weights_fit, load_checkpoint_file
from .tool_config import ConfigError, read_config, register_scope

#: ``type`` names under which a config may refer to mmdat's backbone.
DAT_TYPES = ('DAT', 'mmdet.DAT', 'mmseg.DAT')


def add_checkpoint_arguments(parser) -> None:
    """``--trust-checkpoint`` and ``--allow-partial-weights``, for the tools that run a model
    from a checkpoint (test, demo, visualize); see :func:`load_checkpoint_file` and
    :func:`check_weights_fit`."""
    parser.add_argument('--trust-checkpoint', action='store_true',
                        help='read the checkpoint with an unrestricted unpickler: only for a file '
                        'you trust, it may run code it holds')
    parser.add_argument('--allow-partial-weights', action='store_true',
                        help='run even if the checkpoint leaves over 10%% of the model\'s '
                        'parameters at random init')


def check_file(path: Optional[str], what: str, addresses: bool = False) -> None:
    """Stop with a one-line message when ``path`` is given but is not a file.

    Args:
        path (str, optional): The file.
        what (str): What it is, for the message.
        addresses (bool): Accept a source with ``://`` too (a checkpoint's address; reading it
            gives its own one-line error). Defaults to False.
    """
    if addresses and path is not None and '://' in path:
        return
    if path is not None and not osp.isfile(path):
        raise SystemExit(f'{what} not found: {path}')


def check_out_file(path: str, extensions: Iterable[str]) -> None:
    """Stop with a one-line message when ``--out`` cannot be written as asked: its folder does
    not exist, or its extension (which picks the format) is not one of ``extensions``."""
    extensions = sorted(extensions)
    folder = osp.dirname(osp.abspath(path))
    if not osp.isdir(folder):
        raise SystemExit(f'--out {path}: folder {folder} does not exist')
    extension = osp.splitext(path)[1].lower().lstrip('.')
    if extension not in extensions:
        raise SystemExit(f'--out {path}: the extension picks the image format; use one of '
                         f'{", ".join("." + e for e in extensions)}')


def _is_dat(model_cfg) -> bool:
    return isinstance(model_cfg, dict) and (model_cfg.get('type') in DAT_TYPES or getattr(
        model_cfg.get('type'), '__name__', None) == 'DAT')


def load_dat_config(config: str, cfg_options: Optional[dict] = None) -> Tuple[Config, str]:
    """Load a config whose model is a DAT backbone or has one.

    Args:
        config (str): Config file.
        cfg_options (dict, optional): Overrides, as ``--cfg-options`` gives them.

    Returns:
        tuple[Config, str]: The config and its kind: ``'backbone'`` for ``model = dict(type='DAT',
        ...)``, otherwise the library of its detector or segmenter, ``'mmdet'`` or ``'mmseg'``
        (whose modules are then registered).

    Raises:
        ConfigError: The config cannot be read or has no DAT backbone.
    """
    cfg = read_config(config, cfg_options)
    model = cfg.get('model')
    if not isinstance(model, dict):
        raise ConfigError(f'{config} has no model dict')
    if _is_dat(model):
        return cfg, 'backbone'
    if not _is_dat(model.get('backbone')):
        backbone = model.get('backbone')
        found = backbone.get('type') if isinstance(backbone, dict) else None
        raise ConfigError(f'{config} has no DAT backbone: model.type is {model.get("type")!r} and '
                         f'model.backbone.type is {found!r}; expected {DAT_TYPES[0]!r}')
    return cfg, register_scope(cfg)


def _config_dataset_meta(cfg: Config) -> dict:
    """Classes and palette of the config's test dataset, without reading its files."""
    datasets = importlib.import_module(f'{cfg.default_scope}.registry').DATASETS
    dataset_cfg = copy.deepcopy(cfg.test_dataloader.dataset)
    dataset_cfg['lazy_init'] = True
    metainfo = datasets.build(dataset_cfg).metainfo
    return dict(classes=metainfo['classes'], palette=metainfo.get('palette'))


def build_inferencer(cfg: Config, scope: str, checkpoint: Optional[str], device: str,
                     allow_partial_weights: bool = False):
    """mmdet's ``DetInferencer`` or mmseg's ``MMSegInferencer`` for ``cfg``.

    Without a checkpoint (random weights) or with one that does not store the class names, the
    classes and palette come from the config's test dataset rather than the inferencers' default
    (COCO or Cityscapes names, wrong for any other dataset).

    Args:
        cfg (Config): The config.
        scope (str): ``'mmdet'`` or ``'mmseg'``.
        checkpoint (str, optional): Weights, read with mmdat's safe loader.
        device (str): E.g. ``'cpu'``.
        allow_partial_weights (bool): Accept a checkpoint that leaves over 10% of the model's
            parameters at random init (else :class:`CheckpointError`). Defaults to False.
    """
    if scope == 'mmdet':
        from mmdet.apis import DetInferencer
        inferencer = DetInferencer(model=cfg, weights=checkpoint, device=device,
                                   show_progress=False)
    else:
        from mmseg.apis import MMSegInferencer
        inferencer = MMSegInferencer(model=cfg, weights=checkpoint, device=device)
    saved_meta = {}
    if checkpoint is not None:
        # The inferencer keeps no record of where its class names came from, nor of what it
        # loaded: read the file again.
        saved = load_checkpoint_file(checkpoint)
        check_weights_fit(inferencer.model, saved, checkpoint, allow_partial_weights)
        saved_meta = (saved.get('meta') or {}).get('dataset_meta') or {}
    if 'classes' not in saved_meta:
        inferencer.model.dataset_meta = _config_dataset_meta(cfg)
        if scope == 'mmdet':
            inferencer.visualizer.dataset_meta = inferencer.model.dataset_meta
    return inferencer
