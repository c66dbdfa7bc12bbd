"""DAT inside unchanged mmdet / mmseg configs: build, loss step, predict step on CPU."""
import subprocess
import sys

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmengine.structures import InstanceData, PixelData

import mmdat
from tests.conftest import REPO_ROOT, SMALL_ARCHS, TEST_CONFIGS

# A small DAT keeps the loss steps fast; the configs' own 'tiny' is built in the subprocess tests.
SMALL = dict(arch=SMALL_ARCHS[1], drop_path_rate=0.1)
SMALL_CHANNELS = [16, 32, 64, 128]


def build(config_name, scope, **backbone):
    cfg = Config.fromfile(TEST_CONFIGS / config_name)  # imports mmdat through custom_imports
    init_default_scope(scope)
    cfg.model.backbone.update(backbone)
    if backbone:
        if scope == 'mmdet':
            cfg.model.neck.in_channels = SMALL_CHANNELS
        else:
            cfg.model.decode_head.in_channels = SMALL_CHANNELS
            cfg.model.auxiliary_head.in_channels = SMALL_CHANNELS[2]
            # pad to a multiple of 32, not to the 512x512 training crop: the 512-channel head on
            # the padded crop cost over 90% of the step
            cfg.model.data_preprocessor.update(size=None, size_divisor=32)
    registry = __import__(f'{scope}.registry', fromlist=['MODELS']).MODELS
    model = registry.build(cfg.model)
    model.init_weights()
    assert type(model.backbone) is mmdat.DAT
    return model


def backbone_grads_reached(model):
    dat = model.backbone
    for param in (dat.patch_embed.conv.weight, dat.stages[2].blocks[1].attn.offset_net.proj.weight,
                  dat.stages[2].blocks[1].attn.rpe_table):
        assert param.grad is not None and torch.isfinite(param.grad).all()
        assert param.grad.abs().sum() > 0


def det_batch():
    from mmdet.structures import DetDataSample
    torch.manual_seed(0)
    inputs, samples = [], []
    for h, w in [(203, 261), (187, 250)]:
        inputs.append(torch.randint(0, 256, (3, h, w), dtype=torch.uint8))
        sample = DetDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w),
                                             scale_factor=(1.0, 1.0)))
        sample.gt_instances = InstanceData(bboxes=torch.tensor([[10., 20., 120., 150.], [60., 30., 200., 90.]]),
                                           labels=torch.tensor([3, 17]))
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def seg_batch():
    from mmseg.structures import SegDataSample
    torch.manual_seed(0)
    inputs, samples = [], []
    for h, w in [(131, 97), (131, 97)]:
        inputs.append(torch.randint(0, 256, (3, h, w), dtype=torch.uint8))
        sample = SegDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w)))
        sample.gt_sem_seg = PixelData(data=torch.randint(0, 150, (1, h, w)))
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def loss_then_predict(model, batch):
    model.train()
    data = model.data_preprocessor(batch, training=True)
    loss, log_vars = model.parse_losses(model(**data, mode='loss'))
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    backbone_grads_reached(model)
    model.eval()
    with torch.no_grad():
        data = model.data_preprocessor(batch, training=False)
        return model(**data, mode='predict')


@pytest.mark.slow
def test_retinanet_loss_and_predict():
    model = build('retinanet_dat_t_swap.py', 'mmdet', **SMALL)
    results = loss_then_predict(model, det_batch())
    assert len(results) == 2
    for result in results:
        boxes = result.pred_instances.bboxes
        assert boxes.ndim == 2 and boxes.shape[1] == 4 and torch.isfinite(boxes).all()
        assert len(result.pred_instances.scores) == len(result.pred_instances.labels) == len(boxes)


@pytest.mark.slow
def test_mask_rcnn_loss_and_predict():
    from mmdet.structures.mask import BitmapMasks
    model = build('mask_rcnn_dat_t_swap.py', 'mmdet', **SMALL)
    model.train_cfg.rpn_proposal.max_per_img = 64  # fewer RoIs keep the CPU step short
    batch = det_batch()
    for inputs, sample in zip(batch['inputs'], batch['data_samples']):
        height, width = inputs.shape[1:]
        masks = torch.zeros(2, height, width, dtype=torch.uint8)
        for mask, (x0, y0, x1, y1) in zip(masks, sample.gt_instances.bboxes.int().tolist()):
            mask[y0:y1, x0:x1] = 1
        sample.gt_instances.masks = BitmapMasks(masks.numpy(), height, width)
    results = loss_then_predict(model, batch)
    for result, inputs in zip(results, batch['inputs']):
        instances = result.pred_instances
        assert instances.masks.shape[1:] == inputs.shape[1:]  # full-image masks
        assert len(instances.masks) == len(instances.bboxes) == len(instances.scores)


@pytest.mark.slow
def test_upernet_loss_and_predict():
    model = build('upernet_dat_t_swap.py', 'mmseg', **SMALL)
    results = loss_then_predict(model, seg_batch())
    assert len(results) == 2
    for result in results:
        assert result.pred_sem_seg.data.shape == (1, 131, 97)
        assert result.seg_logits.data.shape[0] == 150


@pytest.mark.slow
@pytest.mark.parametrize('config,scope', [('retinanet_dat_t_swap.py', 'mmdet'),
                                          ('mask_rcnn_dat_t_swap.py', 'mmdet'),
                                          ('upernet_dat_t_swap.py', 'mmseg')])
def test_custom_imports_alone_make_dat_buildable(config, scope):
    """A fresh process that never imports mmdat itself builds the config's tiny DAT model."""
    code = f'''
import sys, torch
from mmengine.config import Config
from mmengine.registry import init_default_scope
assert 'mmdat' not in sys.modules
cfg = Config.fromfile({str(TEST_CONFIGS / config)!r})  # runs the config's custom_imports
assert 'mmdat' in sys.modules
init_default_scope({scope!r})
from {scope}.registry import MODELS
model = MODELS.build(cfg.model).eval()
outs = model.extract_feat(torch.randn(1, 3, 96, 128))
print(type(model.backbone).__module__, sum(p.numel() for p in model.backbone.parameters()), len(outs))
'''
    result = subprocess.run([sys.executable, '-c', code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    module, params, outputs = result.stdout.split()
    assert module == 'mmdat.models.backbones.dat'
    assert int(params) == 27_551_482
    assert int(outputs) == (5 if scope == 'mmdet' else 4)  # FPN levels / backbone maps


@pytest.mark.slow
def test_adamw_steps_lower_the_loss():
    """The whole detector learns through DAT: a few AdamW steps on one batch lower its loss."""
    torch.manual_seed(0)
    model = build('retinanet_dat_t_swap.py', 'mmdet', arch=SMALL['arch'], drop_path_rate=0.0)
    model.train()
    data = model.data_preprocessor(det_batch(), training=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    losses = []
    for _ in range(6):
        loss, _ = model.parse_losses(model(**data, mode='loss'))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.9 * losses[0], losses
