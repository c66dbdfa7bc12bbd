"""Which file a config's DAT backbone starts from: the one rule, and its one-line errors.

mmdat's configs name the backbone's ImageNet weights in a top-level ``pretrained`` and leave
``model.backbone.init_cfg = dict(type='Pretrained', checkpoint=None)``. mmengine binds a config
variable when the file is parsed, so a ``pretrained`` set in a child config or with
``--cfg-options`` could not reach an inherited ``init_cfg``; :func:`resolve_pretrained` hands it
over late instead, and is the only place that does. mmdat's tools call it when they load a
config, and :class:`mmdat.engine.BackboneWeightsHook` (in every mmdat config's
``default_hooks``) calls it before the runner initialises the weights, so that mmdet's and
mmseg's own tools honour ``pretrained`` too. :func:`load_backbone_weights` then loads that file
into the backbone.
"""
import logging
import os.path as osp
from typing import Any, List, Optional

import torch.nn as nn
from mmengine.logging import print_log

from .checkpoint import CheckpointError, extract_state_dict, fit_position_tables, load_checkpoint_file
from .ckpt_convert import dat_converter, is_official_dat, is_official_datpp

#: Says, at the end of each error, how to choose the weights.
HOW_TO_SET = ('set pretrained=PATH in the config or with --cfg-options pretrained=PATH, or '
              'pretrained=None to train the backbone from scratch on purpose')
_UNSET = object()


def resolved_init_cfg(init_cfg: Optional[dict], pretrained: Any = _UNSET) -> Optional[dict]:
    """The backbone ``init_cfg`` that a config's weights settings amount to.

    The rule: ``init_cfg['checkpoint']``, when not None, is the file (e.g. set with
    ``--cfg-options model.backbone.init_cfg.checkpoint=PATH``); otherwise the config's
    top-level ``pretrained``: a path or URL, or None for a backbone trained from scratch on
    purpose (``init_cfg`` becomes None). A config without ``pretrained`` keeps its ``init_cfg``.

    Args:
        init_cfg (dict, optional): The backbone's ``init_cfg`` as the config gives it.
        pretrained: The config's top-level ``pretrained``; leave it out if the config has none.

    Returns:
        dict or None: The ``init_cfg`` to build the backbone with (a new dict).
    """
    if init_cfg is None or init_cfg.get('checkpoint') is not None or pretrained is _UNSET:
        if init_cfg is not None and pretrained not in (_UNSET, init_cfg.get('checkpoint')):
            print_log(f"Backbone weights: model.backbone.init_cfg.checkpoint={init_cfg.get('checkpoint')!r} "
                      f'is used, not pretrained={pretrained!r}', logger='current', level=logging.WARNING)
        return None if init_cfg is None else dict(init_cfg)
    if pretrained is None:
        return None
    if not isinstance(pretrained, str) or not pretrained:
        raise ValueError(f'pretrained must be a checkpoint path or URL, or None; got {pretrained!r}')
    return dict(init_cfg, checkpoint=pretrained)


def resolve_pretrained(cfg) -> None:
    """Apply :func:`resolved_init_cfg` to ``cfg.model.backbone`` in place.

    Args:
        cfg (Config | dict): A whole config (``model`` and maybe ``pretrained``). Configs whose
            backbone has no ``init_cfg`` key are left as they are.
    """
    backbone = (cfg.get('model') or {}).get('backbone')
    if not isinstance(backbone, dict) or 'init_cfg' not in backbone:
        return
    backbone['init_cfg'] = resolved_init_cfg(backbone['init_cfg'], cfg.get('pretrained', _UNSET))


def check_pretrained_file(checkpoint: Optional[str]) -> None:
    """Raise a one-line error unless ``checkpoint`` names a local file or a URL.

    Args:
        checkpoint (str, optional): ``init_cfg['checkpoint']`` of a ``Pretrained`` backbone.

    Raises:
        ValueError: ``checkpoint`` is None (no weights chosen).
        FileNotFoundError: A local path that does not exist.
    """
    if checkpoint is None:
        raise ValueError(f'No backbone weights chosen (init_cfg checkpoint is None): {HOW_TO_SET}')
    if '://' not in checkpoint and not osp.isfile(checkpoint):
        raise FileNotFoundError(
            f"Backbone weights file '{checkpoint}' not found: download it (docs/weights.md, "
            f"'Official weights'), or {HOW_TO_SET}")


def load_backbone_weights(backbone: nn.Module, checkpoint: str) -> List[str]:
    """Load an mmdat or official DAT/DAT++ checkpoint into a :class:`~mmdat.models.DAT`.

    Official files are converted (:func:`~mmdat.models.utils.dat_converter`) and position
    tables fitted to the backbone's sizes. Weights the file lacks keep their initialisation:
    missing blocks are named in a warning (the output norms ``norm{i}``, which classification
    files lack, in an info line); a file that lacks a whole stage or the stem is refused.

    Args:
        backbone (DAT): The backbone.
        checkpoint (str): Path or URL of the file.

    Returns:
        list[str]: Names of the parameters left at their initialisation.

    Raises:
        CheckpointError: The file cannot be read or lacks a whole stage or the stem.
        ValueError: An official file of the other DAT version, or a file with no weight of
            this backbone.
    """
    state_dict = extract_state_dict(load_checkpoint_file(checkpoint), prefix='backbone.')
    if is_official_dat(state_dict):
        file_version = 2 if is_official_datpp(state_dict) else 1
        if file_version != backbone.arch['version']:
            names = {1: 'DAT (v1)', 2: 'DAT++'}
            raise ValueError(f'{checkpoint} is an official {names[file_version]} checkpoint, but '
                             f'this backbone is {names[backbone.arch["version"]]}; choose a matching arch')
        state_dict = dat_converter(state_dict)
    if not state_dict.keys() & backbone.state_dict().keys():
        raise ValueError(f'No weight of {checkpoint} belongs to this DAT backbone (neither an '
                         'mmdat nor an official DAT/DAT++ layout)')
    state_dict = fit_position_tables(state_dict, backbone.state_dict())
    missing, unexpected = backbone.load_state_dict(state_dict, strict=False)
    params = [name for name, _ in backbone.named_parameters()]
    missing = [name for name in params if name in missing]
    # whole modules: stem, stages.i.downsample, stages.i.blocks.j, norm{i}
    modules = list(dict.fromkeys('.'.join(name.split('.')[:(
        4 if '.blocks.' in name else 3 if name.startswith('stages.') else 1)]) for name in missing))
    for whole in ['patch_embed'] + [f'stages.{i}' for i in range(len(backbone.stages))]:
        inside = [name for name in params if name.startswith(f'{whole}.')]
        if inside and all(name in missing for name in inside):
            raise CheckpointError(f'{checkpoint} has no weights for {whole} of this DAT '
                                  'backbone; is it a checkpoint of another arch?')
    blocks = [m for m in modules if not m.startswith('norm')]
    norms = [m for m in modules if m.startswith('norm')]
    if blocks:
        print_log(f'DAT: {checkpoint} has no weights for {", ".join(blocks)}: they keep their '
                  'random initialisation', logger='current', level=logging.WARNING)
    if norms:
        print_log(f'DAT: output norms initialised, not loaded: {", ".join(norms)}', logger='current')
    if unexpected:
        print_log(f'DAT: unexpected weights in the checkpoint: {", ".join(unexpected)}', logger='current')
    return missing
