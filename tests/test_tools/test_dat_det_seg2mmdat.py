"""Official DAT++ detection/segmentation checkpoints (mmdet 2 / mmseg 0) -> mmdet 3 / mmseg 1."""
import functools

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope

from mmdat.models import DAT
from mmdat.models.utils import dat_det_seg_converter, is_official_dat_det_seg
from tests.conftest import (REPO_ROOT, TEST_CONFIGS, load_tool, run_script, official_features, official_input,
                            official_state_dict)


def build_model(config):
    cfg = Config.fromfile(REPO_ROOT / 'configs' / config)
    init_default_scope(cfg.default_scope)
    registry = __import__(f'{cfg.default_scope}.registry', fromlist=['MODELS']).MODELS
    return registry.build(cfg.model)


@functools.lru_cache()
def model_state(config):
    """The state dict of ``config``'s model, built once per test session (do not modify)."""
    return build_model(config).state_dict()


def assert_fits(state_dict, config):
    """What ``load_state_dict(strict=True)`` checks: the same keys, with the same shapes."""
    target = model_state(config)
    assert state_dict.keys() == target.keys()
    assert [k for k, v in state_dict.items() if v.shape != target[k].shape] == []


def official_checkpoint(config, out_indices):
    """An official DAT-Detection/-Segmentation style checkpoint for ``config``'s model.

    The backbone has the official DAT-T++ layout, with seeded weights and the per-output norms
    ``norms.i`` of the official detection/segmentation backbones (``norms.3`` set to the seeded
    ``cls_norm``); the neck and heads are the config's own keys (unchanged from mmdet 2 /
    mmseg 0), with random values.
    """
    weights = {k: v for k, v in official_state_dict(2, 'tiny').items() if not k.startswith('cls_head.')}
    state_dict = {f'backbone.{k}': v for k, v in weights.items() if not k.startswith('cls_norm.')}
    for i in out_indices:
        for name in ('weight', 'bias'):
            state_dict[f'backbone.norms.{i}.norm.{name}'] = (
                weights[f'cls_norm.norm.{name}'] if i == 3 else torch.randn(64 << i))
    torch.manual_seed(0)
    for key, value in model_state(config).items():
        if not key.startswith('backbone.'):
            state_dict[key] = torch.randn(value.shape) if value.is_floating_point() else value
    return {'meta': {'CLASSES': ('person', ), 'mmdet_version': '2.26.0'}, 'state_dict': state_dict,
            'optimizer': {'state': {}}}


@pytest.mark.slow
def test_mask_rcnn_checkpoint_converts_and_reproduces_the_official_backbone():
    checkpoint = official_checkpoint('mask_rcnn_datpp_t_3x_coco.py', out_indices=(0, 1, 2, 3))
    assert is_official_dat_det_seg(checkpoint['state_dict'])
    converted = dat_det_seg_converter(checkpoint['state_dict'])
    assert_fits(converted, 'mask_rcnn_datpp_t_3x_coco.py')
    for key in ('roi_head.mask_head.conv_logits.weight', 'neck.fpn_convs.4.conv.weight',
                'rpn_head.rpn_reg.bias'):
        assert torch.equal(converted[key], checkpoint['state_dict'][key])
    assert torch.equal(converted['backbone.norm1.weight'], checkpoint['state_dict']['backbone.norms.1.norm.weight'])
    backbone = DAT('tiny++', drop_path_rate=0.0).eval()
    backbone.load_state_dict({k[len('backbone.'):]: v for k, v in converted.items() if k.startswith('backbone.')},
                             strict=True)
    with torch.no_grad():
        features = backbone(official_input(2))[3]
    expected = official_features(2, 'tiny')
    assert ((features - expected).norm() / expected.norm()).item() <= 1e-4


def run_converter(*args):
    return run_script('tools/model_converters/dat_det_seg2mmdat.py', *args, cwd=REPO_ROOT)


@pytest.mark.slow
def test_cli_checks_the_result_against_the_config(tmp_path):
    """UperNet (mmseg): converted and checked; a checkpoint missing a head weight is refused."""
    checkpoint = official_checkpoint('upernet_datpp_t_ade20k.py', out_indices=(0, 1, 2, 3))
    torch.save(checkpoint, tmp_path / 'official.pth')
    result = run_converter(tmp_path / 'official.pth', tmp_path / 'mmseg.pth',
                           '--config', 'configs/upernet_datpp_t_ade20k.py')
    assert result.returncode == 0, result.stderr
    converted = torch.load(tmp_path / 'mmseg.pth')
    assert set(converted) == {'state_dict'}  # meta and optimizer dropped
    assert_fits(converted['state_dict'], 'upernet_datpp_t_ade20k.py')

    tool = load_tool('model_converters/dat_det_seg2mmdat.py')
    del converted['state_dict']['decode_head.conv_seg.weight']
    converted['state_dict']['decode_head.conv_seg.bias'] = torch.zeros(3)
    with pytest.raises(SystemExit, match=r'missing from the checkpoint: decode_head.conv_seg.weight\n'
                       r'decode_head.conv_seg.bias: \(3,\) in the checkpoint, \(150,\) in the model'):
        tool.check_against_config(converted['state_dict'], str(REPO_ROOT / 'configs/upernet_datpp_t_ade20k.py'))


@pytest.mark.slow
def test_cli_refuses_other_checkpoints(tmp_path):
    torch.save({'state_dict': {'backbone.conv1.weight': torch.zeros(1)}}, tmp_path / 'resnet.pth')
    result = run_converter(tmp_path / 'resnet.pth', tmp_path / 'out.pth')
    assert result.returncode == 1 and 'Traceback' not in result.stderr
    assert 'does not look like an official DAT detection or segmentation checkpoint' in result.stderr


@pytest.mark.slow
def test_backbone_converter_points_whole_models_to_this_tool(tmp_path):
    torch.save({'state_dict': {'backbone.patch_proj.0.weight': torch.zeros(1)}}, tmp_path / 'det.pth')
    result = run_script('tools/model_converters/dat2mmdat.py', tmp_path / 'det.pth', tmp_path / 'out.pth',
                        cwd=REPO_ROOT)
    assert result.returncode == 1 and 'convert it with tools/model_converters/dat_det_seg2mmdat.py' in result.stderr


@pytest.mark.parametrize('config', ['retinanet_datpp_t_coco.py', 'cascade_mask_rcnn_datpp_t_3x_coco.py',
                                    'fpn_datpp_t_ade20k.py'])
def test_other_models_convert_to_their_configs(config):
    """RetinaNet has no norms.0 (its FPN starts at stride 8); cascade and Semantic FPN heads."""
    out_indices = (1, 2, 3) if config.startswith('retinanet') else (0, 1, 2, 3)
    assert_fits(dat_det_seg_converter(official_checkpoint(config, out_indices)['state_dict']), config)


@pytest.mark.parametrize('config,keys', [
    ('cascade_mask_rcnn_datpp_t_3x_coco.py', [
        'neck.lateral_convs.0.conv.weight', 'neck.fpn_convs.3.conv.bias', 'rpn_head.rpn_conv.weight',
        'rpn_head.rpn_cls.weight', 'rpn_head.rpn_reg.weight',
        'roi_head.bbox_head.0.shared_convs.3.conv.weight', 'roi_head.bbox_head.2.shared_convs.0.bn.running_var',
        'roi_head.bbox_head.1.shared_fcs.0.weight', 'roi_head.bbox_head.2.fc_cls.weight',
        'roi_head.bbox_head.0.fc_reg.bias', 'roi_head.mask_head.1.convs.3.conv.weight',
        'roi_head.mask_head.2.upsample.weight', 'roi_head.mask_head.0.conv_logits.weight']),
    ('retinanet_datpp_t_coco.py', [
        'neck.fpn_convs.4.conv.weight', 'bbox_head.cls_convs.3.conv.weight', 'bbox_head.reg_convs.0.conv.bias',
        'bbox_head.retina_cls.weight', 'bbox_head.retina_reg.bias']),
    ('upernet_datpp_t_ade20k.py', [
        'decode_head.psp_modules.3.1.conv.weight', 'decode_head.bottleneck.bn.weight',
        'decode_head.lateral_convs.2.conv.weight', 'decode_head.fpn_convs.0.bn.running_mean',
        'decode_head.fpn_bottleneck.conv.weight', 'decode_head.conv_seg.weight',
        'auxiliary_head.convs.0.conv.weight', 'auxiliary_head.conv_seg.bias']),
    ('fpn_datpp_t_ade20k.py', [
        'neck.lateral_convs.3.conv.weight', 'decode_head.scale_heads.3.2.conv.weight',
        'decode_head.scale_heads.0.0.bn.weight', 'decode_head.conv_seg.weight']),
])
def test_mmdet2_and_mmseg0_head_names_are_unchanged(config, keys):
    """Head weights named as in mmdet 2.26 / mmseg 0.29 (the official repos' versions) exist
    under the same names in the mmdet 3 / mmseg 1 models, so copying them is right."""
    assert [k for k in keys if k not in model_state(config)] == []


@pytest.mark.slow
def test_tools_test_evaluates_a_converted_checkpoint(tmp_path):
    """An official-layout DAT-T++ RetinaNet, converted, evaluated by tools/test.py end to end."""
    from mmdat.datasets import make_synthetic_dataset
    make_synthetic_dataset(str(tmp_path / 'shapes'), {'val': 2}, seed=0)
    config = TEST_CONFIGS / 'retinanet_datpp_shapes.py'
    cfg = Config.fromfile(config)
    init_default_scope('mmdet')
    from mmdet.registry import MODELS
    heads = {k: torch.randn(v.shape) if v.is_floating_point() else v
             for k, v in MODELS.build(cfg.model).state_dict().items() if not k.startswith('backbone.')}
    weights = {k: v for k, v in official_state_dict(2, 'tiny').items() if not k.startswith('cls_')}
    official = {f'backbone.{k}': v for k, v in weights.items()}
    official.update({f'backbone.norms.{i}.norm.{p}': torch.ones(64 << i) for i in (1, 2, 3) for p in ('weight', 'bias')})
    official.update(heads)
    torch.save({'meta': {'CLASSES': ('circle', 'square', 'triangle')}, 'state_dict': official},
               tmp_path / 'official.pth')
    result = run_converter(tmp_path / 'official.pth', tmp_path / 'converted.pth', '--config', config)
    assert result.returncode == 0, result.stderr

    result = run_script('tools/test.py', config, tmp_path / 'converted.pth', '--work-dir', tmp_path / 'work',
                        cwd=REPO_ROOT, env={'SHAPES_ROOT': f'{tmp_path / "shapes"}/'}, timeout=300)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert f'Load checkpoint from {tmp_path / "converted.pth"}' in log
    assert 'do not match exactly' not in log  # mmengine's warning for missing/unexpected keys
    assert 'Epoch(test) [1/1]' in log and 'Evaluating bbox' in log
