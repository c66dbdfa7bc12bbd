# The embedded demo, segmentation: Semantic FPN with the demo's small DAT, trained from scratch
# on the generated shapes dataset (tools/dataset_converters/make_shapes.py), in minutes on a CPU.
# Run it all with `bash tools/run_demo.sh`.
_base_ = '../fpn_dat_t_ade20k.py'

data_root = '{{$SHAPES_ROOT:data/shapes}}'  # or set $SHAPES_ROOT
pretrained = None  # trained from scratch on purpose
classes = ('background', 'circle', 'square', 'triangle')
palette = [[0, 0, 0], [230, 25, 75], [60, 180, 75], [0, 130, 200]]
# The same small DAT as configs/demo/retinanet_dat_demo_shapes.py.
demo_arch = dict(embed_dims=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), offset_groups=(0, 0, 2, 4))
embed_dims = [32, 64, 128, 256]
neck_channels = 64
batch_size = 8
randomness = dict(seed=0)
max_iters = 1000
lr = 1e-3

model = dict(
    # Label maps are padded with background (0), not mmseg's ignore value 255: with class_weight,
    # mmseg 1.2.2's cross entropy indexes the weights with every label and fails on 255 (images
    # whose sides are not multiples of 32). The padded pixels are black, and background.
    data_preprocessor=dict(size=None, size_divisor=32, seg_pad_val=0),
    backbone=dict(arch=dict(_delete_=True, **demo_arch), drop_path_rate=0.0),
    neck=dict(in_channels=embed_dims, out_channels=neck_channels),
    decode_head=dict(
        in_channels=[neck_channels] * 4,
        channels=neck_channels,
        num_classes=len(classes),
        # Background is ~95% of the pixels; weighting it down makes the shapes' classes learn
        # within the demo's few iterations (without it squares and triangles stay at 0 IoU).
        loss_decode=dict(class_weight=[0.1, 1.0, 1.0, 1.0])))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs')
]
loader = dict(num_workers=0, persistent_workers=False)  # single process: fastest on a CPU
dataset = dict(
    _delete_=True,  # not ADE20K's
    type='BaseSegDataset',
    data_root=data_root,
    metainfo=dict(classes=classes, palette=palette),
    img_suffix='.png',
    seg_map_suffix='.png')
train_dataloader = dict(
    batch_size=batch_size,
    dataset=dict(data_prefix=dict(img_path='train/images', seg_map_path='train/labels'),
                 pipeline=train_pipeline, **dataset),
    **loader)
val_dataloader = dict(
    batch_size=1,
    dataset=dict(data_prefix=dict(img_path='val/images', seg_map_path='val/labels'),
                 pipeline=test_pipeline, **dataset),
    **loader)
test_dataloader = val_dataloader

optim_wrapper = dict(optimizer=dict(lr=lr, weight_decay=0.01))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=50),
    dict(type='PolyLR', eta_min=0.0, power=0.9, begin=50, end=max_iters, by_epoch=False)
]
train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
auto_scale_lr = dict(enable=False, base_batch_size=batch_size)
default_hooks = dict(logger=dict(interval=20), checkpoint=dict(interval=max_iters, max_keep_ckpts=1))
dataset_help = 'Generate the demo data with: python tools/dataset_converters/make_shapes.py data/shapes'
