"""Official DAT++ checkpoints: conversion, parameter counts and parity with pinned outputs."""
import math

import pytest
import torch

from mmdat.models import DAT
from mmdat.models.utils import dat_converter, is_official_dat, is_official_datpp
from tests.conftest import (REPO_ROOT, run_script, official_features, official_input, official_layout,
                            official_state_dict)


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


# the small and base models take seconds each: in the slow tier
@pytest.mark.parametrize('size', ['tiny', pytest.param('small', marks=pytest.mark.slow),
                                  pytest.param('base', marks=pytest.mark.slow)])
def test_converted_official_weights_match_the_official_model(size):
    """Same parameter count as the official model, and the same cls_norm features."""
    layout = official_layout(2, size)
    assert layout['buffers'] == []
    official_count = sum(math.prod(shape) for key, shape in layout['parameters']
                         if not key.startswith('cls_head.'))
    model = DAT(f'{size}++', drop_path_rate=0.0, out_indices=(3, )).eval()  # norm3 is cls_norm
    assert sum(p.numel() for p in model.parameters()) == official_count

    state_dict = official_state_dict(2, size)
    assert is_official_dat(state_dict) and is_official_datpp(state_dict)
    missing, unexpected = model.load_state_dict(dat_converter(state_dict), strict=False)
    assert missing == [] and unexpected == []
    with torch.no_grad():
        features = model(official_input(2))[0]
    expected = official_features(2, size)
    assert features.shape == expected.shape
    assert relative_error(features, expected) <= 1e-4


def test_converter_maps_every_datpp_part():
    state_dict = official_state_dict(2, 'tiny')
    converted = dat_converter(state_dict)
    assert not any(k.startswith('cls_head') for k in converted)
    assert torch.equal(converted['patch_embed.conv2.weight'], state_dict['patch_proj.3.weight'])
    assert torch.equal(converted['patch_embed.norm2.weight'], state_dict['patch_proj.4.norm.weight'])
    assert torch.equal(converted['stages.1.blocks.3.lpu.weight'],
                       state_dict['stages.1.local_perception_units.3.weight'])
    assert torch.equal(converted['stages.2.blocks.5.mlp.dwconv.weight'], state_dict['stages.2.mlps.5.dwc.weight'])
    # 1x1 convs become linear layers
    assert torch.equal(converted['stages.2.blocks.5.mlp.fc1.weight'],
                       state_dict['stages.2.mlps.5.linear1.0.weight'].flatten(1))
    assert torch.equal(converted['stages.3.blocks.0.attn.proj_q.weight'],
                       state_dict['stages.3.attns.0.proj_q.weight'].flatten(1))
    assert torch.equal(converted['stages.0.blocks.0.attn.rpb'], state_dict['stages.0.attns.0.rpb'])
    assert torch.equal(converted['stages.3.downsample.conv.weight'], state_dict['down_projs.2.0.weight'])
    assert torch.equal(converted['norm3.weight'], state_dict['cls_norm.norm.weight'])
    assert len(converted) == len(state_dict) - 2


def test_a_checkpoint_of_the_other_version_is_refused(tmp_path):
    save_official_file(tmp_path / 'official_pp.pth')
    model = DAT('tiny', init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'official_pp.pth')))
    with pytest.raises(ValueError, match=r'official DAT\+\+ checkpoint, but this backbone is DAT \(v1\)'):
        model.init_weights()
    torch.save({'model': {'patch_proj.0.weight': torch.zeros(96, 3, 4, 4),
                          'patch_proj.1.norm.weight': torch.ones(96)}}, tmp_path / 'official_v1.pth')
    model = DAT('tiny++', init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'official_v1.pth')))
    with pytest.raises(ValueError, match=r'official DAT \(v1\) checkpoint, but this backbone is DAT\+\+'):
        model.init_weights()


def test_a_checkpoint_of_something_else_is_refused(tmp_path):
    torch.save({'state_dict': {'conv1.weight': torch.zeros(64, 3, 7, 7)}}, tmp_path / 'resnet.pth')
    model = DAT('tiny++', init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'resnet.pth')))
    with pytest.raises(ValueError, match='No weight of .*resnet.pth belongs to this DAT backbone'):
        model.init_weights()


def save_official_file(path, size='tiny'):
    torch.save({'model': official_state_dict(2, size), 'max_accuracy': 83.9}, path)


def tiny_from_official_file(tmp_path, **kwargs):
    """DAT-T++ (last output) initialised through ``init_cfg`` from a seeded official file."""
    save_official_file(tmp_path / 'official.pth')
    model = DAT('tiny++', out_indices=(3, ),
                init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'official.pth')), **kwargs)
    model.init_weights()
    return model


def test_init_cfg_loads_an_official_datpp_file(tmp_path):
    model = tiny_from_official_file(tmp_path)
    expected = dat_converter(official_state_dict(2, 'tiny'))
    loaded = model.state_dict()
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key


def test_init_cfg_resizes_the_tables_for_another_pretrain_size(tmp_path):
    model = tiny_from_official_file(tmp_path, pretrain_img_size=384)
    table = model.stages[0].blocks[1].attn.rpe_table
    assert table.shape == (2, 2 * 96 - 1, 2 * 96 - 1)
    assert table.std() > 1  # the seeded table (std 2), resized, not the initial one (std 0.01)


@pytest.mark.slow
def test_converter_cli_converts_datpp(tmp_path):
    save_official_file(tmp_path / 'official.pth')
    result = run_script('tools/model_converters/dat2mmdat.py', tmp_path / 'official.pth', tmp_path / 'mmdat.pth',
                        cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    assert 'DAT++' in result.stdout
    converted = torch.load(tmp_path / 'mmdat.pth')['state_dict']
    DAT('tiny++', out_indices=(3, )).load_state_dict(converted, strict=True)


def test_init_cfg_resizes_the_neighborhood_bias_for_another_kernel(tmp_path):
    model = tiny_from_official_file(tmp_path, window_size=9)
    rpb = model.stages[0].blocks[0].attn.rpb
    assert rpb.shape == (2, 17, 17)
    official = official_state_dict(2, 'tiny')['stages.0.attns.0.rpb']
    expected = torch.nn.functional.interpolate(official[None], size=(17, 17), mode='bicubic')[0]
    torch.testing.assert_close(rpb.detach(), expected)
