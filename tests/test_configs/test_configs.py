"""Every config under configs/ builds its model with a DAT backbone that fits its neck/head and
follows its recipe; its backbone weights can be set in each documented way; one loss step per
model type; the training pipelines run on real (generated) images; mmdet's and mmseg's own
tools/train.py run the demo configs unchanged."""
import copy
import functools
import re
from pathlib import Path

import mmengine.config.config as mmengine_config
import mmengine.config.utils as mmengine_config_utils
import pytest
import torch
from mmengine.config import Config
from mmengine.model import revert_sync_batchnorm
from mmengine.registry import init_default_scope
from mmengine.structures import InstanceData, PixelData

import mmdat
from mmdat.datasets import CLASSES, make_synthetic_dataset
from mmdat.models.utils import resolve_pretrained
from mmdat.utils import load_tool_config
from tests.conftest import REPO_ROOT, run_script

CONFIG_DIR = REPO_ROOT / 'configs'
CONFIGS = sorted(p.name for p in CONFIG_DIR.glob('*.py'))
DEMO_CONFIGS = sorted(p.name for p in (CONFIG_DIR / 'demo').glob('*.py'))
ALL_CONFIGS = CONFIGS + [f'demo/{name}' for name in DEMO_CONFIGS]
SMALL_ARCH = dict(embed_dims=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), offset_groups=(0, 0, 2, 2))
SMALL_CHANNELS = [16, 32, 64, 128]


@pytest.fixture(autouse=True, scope='module')
def fast_config_loading():
    """mmengine reloads pkg_resources and parses every metafile of mmdet/mmseg for each
    ``mmdet::`` base it reads, half a second each time; the answers do not change here."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mmengine_config, 'is_installed', functools.lru_cache(mmengine_config.is_installed))
        # the metafiles, read to look a config up (also when it is not listed, e.g. a base)
        patch.setattr(mmengine_config_utils, 'load', functools.lru_cache(mmengine_config_utils.load))
        yield


def load(path):
    cfg = Config.fromfile(path)
    init_default_scope(cfg.default_scope)
    return cfg


def build_model(cfg):
    registry = __import__(f'{cfg.default_scope}.registry', fromlist=['MODELS']).MODELS
    return registry.build(cfg.model)


def test_all_configs_are_found():
    assert len(CONFIGS) == 17 + 18, CONFIGS  # DAT v1 and DAT++
    assert DEMO_CONFIGS == ['fpn_dat_demo_shapes.py', 'retinanet_dat_demo_shapes.py']


# Building a full-size model takes seconds: the fast tier builds each tiny model once (the 3x
# schedules build the same models), the slow tier every config.
@pytest.mark.parametrize('name', [name if '_t_' in name and '_3x_' not in name else
                                  pytest.param(name, marks=pytest.mark.slow) for name in CONFIGS])
def test_config_builds_its_model(name):
    cfg = load(CONFIG_DIR / name)
    model = build_model(cfg)
    assert type(model.backbone) is mmdat.DAT
    version, size = re.search(r'_(dat|datpp)_([tsb])_', name).groups()
    first_dims = dict(t=96, s=96, b=128) if version == 'dat' else dict(t=64, s=96, b=128)
    assert model.backbone.num_features[0] == first_dims[size]
    assert model.backbone.arch['version'] == (1 if version == 'dat' else 2)
    # the weights file is chosen by the top-level `pretrained`, resolved by the tools
    assert model.backbone.init_cfg == dict(type='Pretrained', checkpoint=None)
    names = dict(t='tiny', s='small', b='base')
    assert cfg.pretrained == f'checkpoints/dat_{"pp_" if version == "datpp" else ""}{names[size]}_in1k_224.pth'
    # plain OptimWrapper: mixed precision is --amp's choice, so stock tools run anywhere
    assert cfg.optim_wrapper.type == 'OptimWrapper' and 'loss_scale' not in cfg.optim_wrapper
    assert cfg.optim_wrapper.optimizer.type == 'AdamW'
    for key in ('rpe_table', 'relative_position_bias_table', 'norm'):
        assert cfg.optim_wrapper.paramwise_cfg.custom_keys[key] == dict(decay_mult=0.)
    assert cfg.default_hooks.backbone_weights == dict(type='BackboneWeightsHook')
    # gradient checkpointing as the official configs have it: on in DAT++ detection and
    # UperNet (use_checkpoint=True), off in DAT++ Semantic FPN; the DAT v1 configs follow
    # Swin's recipe, whose mmdet configs have with_cp=False
    expected_cp = version == 'datpp' and not name.startswith('fpn')
    assert cfg.model.backbone.get('with_cp', False) is expected_cp
    assert all(block.with_cp is expected_cp for stage in model.backbone.stages for block in stage.blocks)
    # the total batch the learning rate is given for: 16 for v1 (Swin's recipe); DAT++ as in
    # the official configs (detection 4 nodes x 8 GPUs x 2, FPN 8 x 4, UperNet 8 x 2)
    expected_batch = 16 if version == 'dat' or name.startswith('upernet') else \
        32 if name.startswith('fpn') else 64
    assert cfg.auto_scale_lr == dict(enable=True, base_batch_size=expected_batch)
    if cfg.default_scope == 'mmdet':
        # Swin's and the official DAT++ schedules: 500 warm-up iterations, multi-scale crops
        assert cfg.param_scheduler[0] == dict(type='LinearLR', start_factor=0.001, by_epoch=False,
                                              begin=0, end=500)
        assert cfg.train_dataloader.dataset.pipeline[3].type == 'RandomChoice'
        epochs, steps = (36, [27, 33]) if '_3x_' in name else (12, [8, 11])
        assert cfg.train_cfg.max_epochs == epochs == cfg.param_scheduler[-1].end
        assert cfg.param_scheduler[-1].milestones == steps
    else:
        assert cfg.train_cfg.max_iters == (160000 if name.startswith('upernet') else
                                           80000 if version == 'dat' else 40000)
        assert cfg.param_scheduler[-1].end == cfg.train_cfg.max_iters
        # the official multi-scale test: ratios of the 2048x512 test scale
        resizes = cfg.tta_pipeline[1].transforms[0]
        assert [r.scale for r in resizes][::2] == [(1024, 256), (2048, 512), (3072, 768)]
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


@pytest.mark.slow
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
    cfg.model.backbone.update(arch=SMALL_ARCH, init_cfg=None)  # no ImageNet weights for it
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
    # sides that are not multiples of 32: the batches are padded (the demo segmenter's labels too)
    make_synthetic_dataset(str(root), dict(train=3, val=2), image_size=(120, 150))
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


WEIGHTS = 'elsewhere/my_weights.pth'


def resolved_backbone_init_cfg(config, cfg_options=None):
    """``model.backbone.init_cfg`` as mmdat's tools resolve it (``pretrained`` handed over).

    ``config`` is a path, or a loaded config (copied, then changed as ``--cfg-options`` does).
    """
    if not isinstance(config, Config):
        return load_tool_config(str(config), cfg_options, 'none', None).model.backbone.init_cfg
    cfg = copy.deepcopy(config)
    cfg.merge_from_dict(cfg_options or {})
    resolve_pretrained(cfg)
    return cfg.model.backbone.init_cfg


@pytest.fixture(scope='module')
def config_copy(tmp_path_factory):
    """A copy of configs/ to edit, with its relative ``_base_`` paths intact."""
    root = tmp_path_factory.mktemp('configs')
    for path in CONFIG_DIR.rglob('*.py'):
        target = root / path.relative_to(CONFIG_DIR)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(path.read_text())
    return root


@pytest.mark.parametrize('name', ALL_CONFIGS)
def test_weights_reach_the_backbone_each_documented_way(name, config_copy, tmp_path):
    """Every config's backbone loads the file set by (a) an edit of `pretrained` at the top of the
    config, (b) `pretrained` in a child config, (c) --cfg-options pretrained=... and (d)
    --cfg-options model.backbone.init_cfg.checkpoint=...; `pretrained=None` trains from scratch."""
    expected = dict(type='Pretrained', checkpoint=WEIGHTS)
    cfg = load(CONFIG_DIR / name)
    assert resolved_backbone_init_cfg(cfg) == (
        None if name.startswith('demo/') else dict(type='Pretrained', checkpoint=cfg.pretrained))
    # (a): the `pretrained` line (or, in a config that inherits it, a new one) at the top
    edited = config_copy / name
    text = (CONFIG_DIR / name).read_text()
    line = f"pretrained = '{WEIGHTS}'"
    text, count = re.subn(r'^pretrained = .*$', line, text, flags=re.M)
    if not count:
        text = re.sub(r"^(_base_ = .*)$", rf'\1\n{line}', text, count=1, flags=re.M)
    edited.write_text(text)
    assert resolved_backbone_init_cfg(edited) == expected
    # (b): a child config of the shipped one
    child = tmp_path / 'child.py'
    child.write_text(f"_base_ = '{CONFIG_DIR / name}'\n{line}\n")
    assert resolved_backbone_init_cfg(child) == expected
    # (c) and (d): on the command line
    assert resolved_backbone_init_cfg(cfg, dict(pretrained=WEIGHTS)) == expected
    assert resolved_backbone_init_cfg(cfg, {'model.backbone.init_cfg.checkpoint': WEIGHTS}) == expected
    # init_cfg.checkpoint, the more specific setting, wins over `pretrained`
    assert resolved_backbone_init_cfg(
        cfg, {'pretrained': 'other.pth', 'model.backbone.init_cfg.checkpoint': WEIGHTS}) == expected
    # from scratch, on purpose
    assert resolved_backbone_init_cfg(cfg, dict(pretrained=None)) is None


@pytest.mark.slow
def test_train_stops_at_once_without_backbone_weights(tmp_path):
    """An ADE20K config whose weights file is missing does not train from random weights:
    tools/train.py stops with one line that names the file and how to set it."""
    for folder in ('images/training', 'annotations/training', 'images/validation',
                   'annotations/validation'):  # the dataset check comes first
        (tmp_path / 'ade' / folder).mkdir(parents=True)
    result = run_script(
        REPO_ROOT / 'tools' / 'train.py', CONFIG_DIR / 'upernet_datpp_s_ade20k.py',
        '--cfg-options', f'train_dataloader.dataset.data_root={tmp_path / "ade"}',
        f'val_dataloader.dataset.data_root={tmp_path / "ade"}', cwd=tmp_path)
    assert result.returncode == 1 and 'Traceback' not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("Backbone weights file 'checkpoints/dat_pp_small_in1k_224.pth' not found")
    assert '--cfg-options pretrained=PATH' in message and 'pretrained=None' in message
    assert not (tmp_path / 'work_dirs').exists()


@pytest.mark.slow
@pytest.mark.parametrize('library, name, length', [
    ('mmdet', 'retinanet_dat_demo_shapes.py', 'train_cfg.max_epochs=1'),
    ('mmseg', 'fpn_dat_demo_shapes.py', 'train_cfg.max_iters=2'),
])
def test_stock_train_tool_runs_the_demo_config(library, name, length, shapes_root, tmp_path):
    """mmdet's and mmseg's own tools/train.py train the demo configs unchanged on a CPU (plain
    OptimWrapper, `pretrained = None` resolved by the config's hook, $SHAPES_ROOT without a
    trailing '/'), here for two iterations on the generated images."""
    tool = Path(__import__(library).__file__).parent / '.mim' / 'tools' / 'train.py'
    work_dir = tmp_path / 'work'
    result = run_script(
        tool, CONFIG_DIR / 'demo' / name, '--work-dir', work_dir,
        '--cfg-options', length, 'train_dataloader.batch_size=2', 'default_hooks.logger.interval=1',
        'default_hooks.checkpoint.interval=1',
        cwd=tmp_path, timeout=300, env={'SHAPES_ROOT': str(shapes_root).rstrip('/')})
    assert result.returncode == 0, result.stderr[-3000:]
    logs = result.stdout + result.stderr
    assert re.search(r'Iter\(train\) \[2/2\]|Epoch\(train\) +\[1\]\[2/2\]', logs), logs[-3000:]
    assert list(work_dir.glob('*_[12].pth'))  # the checkpoint hook ran
