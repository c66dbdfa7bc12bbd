"""Every config under configs/ builds its model with a DAT backbone that fits its neck/head; one
loss step per model type; the training pipelines run on real (generated) images."""
import re
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.model import revert_sync_batchnorm
from mmengine.registry import init_default_scope
from mmengine.structures import InstanceData, PixelData

import mmdat
from mmdat.datasets import CLASSES, make_synthetic_dataset

CONFIG_DIR = Path(__file__).resolve().parents[2] / 'configs'
CONFIGS = sorted(p.name for p in CONFIG_DIR.glob('*.py'))
DEMO_CONFIGS = sorted(p.name for p in (CONFIG_DIR / 'demo').glob('*.py'))
SMALL_ARCH = dict(embed_dims=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), offset_groups=(0, 0, 2, 2))
SMALL_CHANNELS = [16, 32, 64, 128]


def load(path):
    cfg = Config.fromfile(path)
    init_default_scope(cfg.default_scope)
    return cfg


def build_model(cfg):
    registry = __import__(f'{cfg.default_scope}.registry', fromlist=['MODELS']).MODELS
    return registry.build(cfg.model)


#: DAT++ configs that follow official float32 recipes (the others train in mixed precision).
FP32_CONFIGS = {'cascade_mask_rcnn_datpp_s_3x_coco.py', 'cascade_mask_rcnn_datpp_b_3x_coco.py',
                'upernet_datpp_b_ade20k.py', 'fpn_datpp_t_ade20k.py', 'fpn_datpp_s_ade20k.py',
                'fpn_datpp_b_ade20k.py'}


def test_all_configs_are_found():
    assert len(CONFIGS) == 17 + 18, CONFIGS  # DAT v1 and DAT++
    assert DEMO_CONFIGS == ['fpn_dat_demo_shapes.py', 'retinanet_dat_demo_shapes.py']


@pytest.mark.parametrize('name', CONFIGS)
def test_config_builds_its_model(name):
    cfg = load(CONFIG_DIR / name)
    model = build_model(cfg)
    assert type(model.backbone) is mmdat.DAT
    version, size = re.search(r'_(dat|datpp)_([tsb])_', name).groups()
    first_dims = dict(t=96, s=96, b=128) if version == 'dat' else dict(t=64, s=96, b=128)
    assert model.backbone.num_features[0] == first_dims[size]
    assert model.backbone.arch['version'] == (1 if version == 'dat' else 2)
    assert model.backbone.init_cfg is None  # `pretrained = None` until the user sets it
    assert cfg.optim_wrapper.type == ('OptimWrapper' if name in FP32_CONFIGS else 'AmpOptimWrapper')
    assert cfg.optim_wrapper.optimizer.type == 'AdamW'
    for key in ('rpe_table', 'relative_position_bias_table', 'norm'):
        assert cfg.optim_wrapper.paramwise_cfg.custom_keys[key] == dict(decay_mult=0.)
    # the total batch the learning rate is given for: 16 for v1 (Swin's recipe); DAT++ as in
    # the official configs (detection 4 nodes x 8 GPUs x 2, FPN 8 x 4, UperNet 8 x 2)
    expected_batch = 16 if version == 'dat' or name.startswith('upernet') else \
        32 if name.startswith('fpn') else 64
    assert cfg.auto_scale_lr == dict(enable=True, base_batch_size=expected_batch)
    if '_3x_' in name:
        assert cfg.train_cfg.max_epochs == 36
        assert cfg.param_scheduler[-1].milestones == [27, 33]
    elif cfg.default_scope == 'mmdet':
        assert cfg.train_cfg.max_epochs == 12
        assert cfg.param_scheduler[-1].milestones == [8, 11]
    elif version == 'dat':
        assert cfg.train_cfg.max_iters == (160000 if name.startswith('upernet') else 80000)
    # the neck/head takes exactly what the backbone returns
    model.eval()
    with torch.no_grad():
        feats = model.extract_feat(torch.randn(1, 3, 64, 96))
        if cfg.default_scope == 'mmdet':
            assert len(feats) == 5
        else:
            assert model.decode_head(list(feats)).shape[:2] == (1, 150)


def det_batch(with_mask):
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    torch.manual_seed(0)
    inputs, samples = [], []
    for h, w in [(150, 211), (170, 190)]:
        inputs.append(torch.randint(0, 256, (3, h, w), dtype=torch.uint8))
        sample = DetDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w),
                                             scale_factor=(1.0, 1.0)))
        instances = InstanceData(bboxes=torch.tensor([[30., 20., 140., 120.]]), labels=torch.tensor([5]))
        if with_mask:
            masks = torch.zeros(1, h, w, dtype=torch.uint8)
            masks[0, 20:120, 30:140] = 1
            instances.masks = BitmapMasks(masks.numpy(), h, w)
        sample.gt_instances = instances
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def seg_batch():
    from mmseg.structures import SegDataSample
    torch.manual_seed(0)
    inputs, samples = [], []
    for _ in range(2):
        inputs.append(torch.randint(0, 256, (3, 96, 128), dtype=torch.uint8))
        sample = SegDataSample(metainfo=dict(img_shape=(96, 128), ori_shape=(96, 128)))
        sample.gt_sem_seg = PixelData(data=torch.randint(0, 150, (1, 96, 128)))
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


@pytest.mark.parametrize('name, expected_losses', [
    ('retinanet_dat_t_3x_coco.py', {'loss_cls', 'loss_bbox'}),
    ('mask_rcnn_dat_t_coco.py', {'loss_rpn_cls', 'loss_cls', 'loss_bbox', 'loss_mask'}),
    ('cascade_mask_rcnn_dat_t_3x_coco.py', {'s0.loss_cls', 's2.loss_bbox', 's2.loss_mask'}),
    ('upernet_dat_t_ade20k.py', {'decode.loss_ce', 'aux.loss_ce'}),
    ('fpn_dat_t_ade20k.py', {'decode.loss_ce'}),
])
def test_each_model_type_trains_one_step(name, expected_losses):
    """One loss step of the project's config for each detector/segmenter type, with a small DAT."""
    cfg = load(CONFIG_DIR / name)
    cfg.model.backbone.arch = SMALL_ARCH
    if cfg.default_scope == 'mmdet':
        cfg.model.neck.in_channels = SMALL_CHANNELS[-len(cfg.model.neck.in_channels):]
        batch = det_batch(with_mask='mask' in name)
        if 'rcnn' in name:  # fewer RoIs: RoI heads (4 convs each in Cascade) are slow on a CPU
            cfg.model.train_cfg.rpn_proposal.max_per_img = 64
            stages = cfg.model.train_cfg.rcnn
            for stage in stages if isinstance(stages, list) else [stages]:
                stage.sampler.num = 32
    else:
        cfg.model.data_preprocessor.update(size=None, size_divisor=32)
        if name.startswith('fpn'):
            cfg.model.neck.in_channels = SMALL_CHANNELS
        else:
            cfg.model.decode_head.in_channels = SMALL_CHANNELS
            cfg.model.auxiliary_head.in_channels = SMALL_CHANNELS[2]
        batch = seg_batch()
    model = revert_sync_batchnorm(build_model(cfg))  # SyncBN heads need a process group
    model.init_weights()
    model.train()
    data = model.data_preprocessor(batch, training=True)
    losses = model(**data, mode='loss')
    assert expected_losses <= set(losses)
    loss, _ = model.parse_losses(losses)
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    grad = model.backbone.stages[2].blocks[1].attn.offset_net.proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0


@pytest.fixture(scope='module')
def shapes_root(tmp_path_factory):
    root = tmp_path_factory.mktemp('shapes')
    make_synthetic_dataset(str(root), dict(train=3, val=2), image_size=(120, 160))
    return root


@pytest.mark.parametrize('name', ['retinanet_dat_t_3x_coco.py', 'mask_rcnn_dat_t_3x_coco.py',
                                  'cascade_mask_rcnn_dat_t_3x_coco.py'])
def test_multi_scale_training_pipeline_runs(name, shapes_root):
    """The 3x configs' multi-scale resize/crop pipeline on generated COCO-format images."""
    from mmdet.registry import DATASETS
    cfg = load(CONFIG_DIR / name)
    dataset_cfg = cfg.train_dataloader.dataset
    dataset_cfg.update(data_root=str(shapes_root), ann_file='annotations/instances_train.json',
                       data_prefix=dict(img='train/images/'), metainfo=dict(classes=CLASSES),
                       filter_cfg=None)
    dataset = DATASETS.build(dataset_cfg)
    torch.manual_seed(0)
    for index in range(len(dataset)):
        sample = dataset[index]['data_samples']
        height, width = sample.img_shape
        # every scale of the policy has a short side of 480..800 (crops are resized back up)
        assert 480 <= min(height, width) <= 800 and max(height, width) <= 1333
        assert ('masks' in sample.gt_instances) == ('mask' in name)


@pytest.mark.parametrize('name', DEMO_CONFIGS)
def test_demo_config_builds_a_small_dat(name):
    cfg = load(CONFIG_DIR / 'demo' / name)
    model = build_model(cfg)
    assert type(model.backbone) is mmdat.DAT
    assert model.backbone.num_features == [32, 64, 128, 256]
    assert 'make_shapes.py' in cfg.dataset_help
