"""Every config under configs/ builds its model with a DAT backbone that fits its neck/head."""
import re
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope

import mmdat

CONFIG_DIR = Path(__file__).resolve().parents[2] / 'configs'
CONFIGS = sorted(p.name for p in CONFIG_DIR.glob('*.py'))


#: DAT++ configs that follow official float32 recipes (the others train in mixed precision).
FP32_CONFIGS = {'cascade_mask_rcnn_datpp_s_3x_coco.py', 'cascade_mask_rcnn_datpp_b_3x_coco.py',
                'upernet_datpp_b_ade20k.py', 'fpn_datpp_t_ade20k.py', 'fpn_datpp_s_ade20k.py',
                'fpn_datpp_b_ade20k.py'}


def test_all_configs_are_found():
    assert len(CONFIGS) == 7 + 18, CONFIGS


@pytest.mark.parametrize('name', CONFIGS)
def test_config_builds_its_model(name):
    cfg = Config.fromfile(CONFIG_DIR / name)
    scope = cfg.default_scope
    init_default_scope(scope)
    registry = __import__(f'{scope}.registry', fromlist=['MODELS']).MODELS
    model = registry.build(cfg.model)
    assert type(model.backbone) is mmdat.DAT
    version, size = re.search(r'_(dat|datpp)_([tsb])_', name).groups()
    first_dims = dict(t=96, s=96, b=128) if version == 'dat' else dict(t=64, s=96, b=128)
    assert model.backbone.num_features[0] == first_dims[size]
    assert model.backbone.arch['version'] == (1 if version == 'dat' else 2)
    assert cfg.optim_wrapper.type == ('OptimWrapper' if name in FP32_CONFIGS else 'AmpOptimWrapper')
    assert cfg.optim_wrapper.paramwise_cfg.custom_keys['rpe_table'] == dict(decay_mult=0.)
    # the total batch the learning rate is given for: 16 for v1 (Swin's recipe); DAT++ as in
    # the official configs (detection 4 nodes x 8 GPUs x 2, FPN 8 x 4, UperNet 8 x 2)
    expected_batch = 16 if version == 'dat' or name.startswith('upernet') else \
        32 if name.startswith('fpn') else 64
    assert cfg.auto_scale_lr.base_batch_size == expected_batch
    # the neck/head takes exactly what the backbone returns
    model.eval()
    with torch.no_grad():
        feats = model.backbone(torch.randn(1, 3, 64, 96))
        if scope == 'mmdet':
            outs = model.neck(feats)
            assert len(outs) == 5
        else:
            if model.with_neck:  # Semantic FPN
                feats = model.neck(feats)
            assert model.decode_head(list(feats)).shape[:2] == (1, 150)


def test_mask_rcnn_config_trains_one_step():
    """One AMP-configured loss step of the project's Mask R-CNN config (with a small DAT)."""
    from mmdet.registry import MODELS
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    from mmengine.structures import InstanceData
    cfg = Config.fromfile(CONFIG_DIR / 'mask_rcnn_dat_t_coco.py')
    init_default_scope('mmdet')
    cfg.model.backbone.arch = dict(embed_dims=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4),
                                   offset_groups=(0, 0, 2, 2))
    cfg.model.neck.in_channels = [16, 32, 64, 128]
    model = MODELS.build(cfg.model)
    model.init_weights()
    torch.manual_seed(0)
    inputs, samples = [], []
    for h, w in [(150, 211), (170, 190)]:
        inputs.append(torch.randint(0, 256, (3, h, w), dtype=torch.uint8))
        sample = DetDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w),
                                             scale_factor=(1.0, 1.0)))
        masks = torch.zeros(1, h, w, dtype=torch.uint8)
        masks[0, 20:120, 30:140] = 1
        sample.gt_instances = InstanceData(bboxes=torch.tensor([[30., 20., 140., 120.]]),
                                           labels=torch.tensor([5]), masks=BitmapMasks(masks.numpy(), h, w))
        samples.append(sample)
    data = model.data_preprocessor(dict(inputs=inputs, data_samples=samples), training=True)
    losses = model(**data, mode='loss')
    assert {'loss_rpn_cls', 'loss_cls', 'loss_bbox', 'loss_mask'} <= set(losses)
    loss, _ = model.parse_losses(losses)
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    grad = model.backbone.stages[2].blocks[1].attn.offset_net.proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0
