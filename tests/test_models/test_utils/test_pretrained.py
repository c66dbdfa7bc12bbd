"""The one rule that turns a config's `pretrained` into the backbone's init_cfg, the hook that
applies it under any tool, and the DAT backbone's one-line errors when weights are missing."""
from types import SimpleNamespace

import pytest
import torch
from mmengine.config import Config

from mmdat.engine import BackboneWeightsHook
from mmdat.models import DAT
from mmdat.models.utils import check_pretrained_file, resolve_pretrained, resolved_init_cfg
from tests.conftest import MINIMAL_ARCHS

SMALL_ARCH = MINIMAL_ARCHS[1]
UNSET = dict(type='Pretrained', checkpoint=None)


@pytest.mark.parametrize('init_cfg, pretrained, expected', [
    (UNSET, 'a.pth', dict(type='Pretrained', checkpoint='a.pth')),
    (UNSET, None, None),  # from scratch, on purpose
    (dict(type='Pretrained', checkpoint='b.pth'), 'a.pth', dict(type='Pretrained', checkpoint='b.pth')),
    (None, 'a.pth', None),  # a backbone that takes no weights stays so
])
def test_resolved_init_cfg(init_cfg, pretrained, expected):
    assert resolved_init_cfg(init_cfg, pretrained) == expected


def test_resolved_init_cfg_without_pretrained_keeps_init_cfg():
    assert resolved_init_cfg(UNSET) == UNSET
    assert resolved_init_cfg(UNSET) is not UNSET  # a copy


@pytest.mark.parametrize('pretrained', ['', 3, ['a.pth']])
def test_resolved_init_cfg_refuses_bad_pretrained(pretrained):
    with pytest.raises(ValueError, match='pretrained must be a checkpoint path or URL, or None'):
        resolved_init_cfg(UNSET, pretrained)


def test_resolve_pretrained_on_a_config():
    cfg = Config(dict(pretrained='a.pth', model=dict(backbone=dict(type='DAT', init_cfg=UNSET))))
    resolve_pretrained(cfg)
    assert cfg.model.backbone.init_cfg == dict(type='Pretrained', checkpoint='a.pth')
    other = Config(dict(pretrained='a.pth', model=dict(backbone=dict(type='ResNet'))))
    resolve_pretrained(other)  # no init_cfg key: left alone
    assert 'init_cfg' not in other.model.backbone


def test_check_pretrained_file(tmp_path):
    (tmp_path / 'w.pth').touch()
    check_pretrained_file(str(tmp_path / 'w.pth'))
    check_pretrained_file('https://example.com/w.pth')  # downloaded later by mmengine
    with pytest.raises(ValueError, match=r'No backbone weights chosen .*pretrained=None'):
        check_pretrained_file(None)
    with pytest.raises(FileNotFoundError, match=r"^Backbone weights file 'no/such.pth' not found"):
        check_pretrained_file('no/such.pth')


@pytest.mark.parametrize('checkpoint, error', [(None, ValueError), ('no/such.pth', FileNotFoundError)])
def test_dat_init_weights_refuses_missing_weights(checkpoint, error):
    """Also under mmdet's/mmseg's own tools, a backbone without its file does not start from
    random weights."""
    model = DAT(arch=SMALL_ARCH, init_cfg=dict(type='Pretrained', checkpoint=checkpoint))
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(error, match='pretrained=PATH'):
        model.init_weights()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize('wrapped', [False, True])
def test_backbone_weights_hook_hands_pretrained_over(wrapped):
    detector = SimpleNamespace(backbone=DAT(arch=SMALL_ARCH, init_cfg=UNSET))
    model = SimpleNamespace(module=detector) if wrapped else detector
    runner = SimpleNamespace(model=model, cfg=Config(dict(pretrained=None)))
    if wrapped:  # is_model_wrapper looks the type up in the wrapper registry
        from mmengine.model import MMDistributedDataParallel
        runner.model = MMDistributedDataParallel.__new__(MMDistributedDataParallel)
        runner.model.__dict__['_modules'] = {'module': detector}
    BackboneWeightsHook().before_run(runner)
    assert detector.backbone.init_cfg is None
    detector.backbone.init_weights()  # from scratch, no error


def test_backbone_weights_hook_without_pretrained_changes_nothing():
    detector = SimpleNamespace(backbone=DAT(arch=SMALL_ARCH, init_cfg=UNSET))
    BackboneWeightsHook().before_run(SimpleNamespace(model=detector, cfg=Config(dict())))
    assert detector.backbone.init_cfg == UNSET
