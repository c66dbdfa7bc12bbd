# The embedded demo: RetinaNet with a small DAT, trained from scratch on the generated shapes
# dataset (tools/dataset_converters/make_shapes.py) in minutes on a CPU. Run it all with
# `bash tools/run_demo.sh`. The backbone is the project's DAT with a smaller arch dict (same
# blocks: window, shifted-window and deformable attention), and a lighter FPN and head.
# Learning rate for the batch of 8 below, single process (auto_scale_lr off).
_base_ = '../retinanet_dat_t_coco.py'

data_root = '{{$SHAPES_ROOT:data/shapes}}'  # or set $SHAPES_ROOT
pretrained = None  # trained from scratch on purpose
classes = ('circle', 'square', 'triangle')
image_scale = (256, 192)  # (w, h), the size the data is generated at
# DAT with 32 channels in stage 1 (doubling per stage), one block in stages 1, 2 and 4, and a
# window + deformable pair in stage 3.
demo_arch = dict(embed_dims=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), offset_groups=(0, 0, 2, 4))
embed_dims = [32, 64, 128, 256]
neck_channels = 64
batch_size = 8
randomness = dict(seed=0)
max_epochs = 8  # 1,600 iterations on the demo's 1,600 training images
lr = 1e-3

model = dict(
    backbone=dict(arch=dict(_delete_=True, **demo_arch), drop_path_rate=0.0),
    neck=dict(in_channels=embed_dims[1:], out_channels=neck_channels, num_outs=3),
    bbox_head=dict(
        num_classes=len(classes),
        in_channels=neck_channels,
        feat_channels=neck_channels,
        stacked_convs=2,
        anchor_generator=dict(strides=[8, 16, 32]),
        # GroupNorm in the head and a GIoU box loss: from scratch, this reaches the same mAP in
        # about half the iterations of the plain head and L1 loss.
        norm_cfg=dict(type='GN', num_groups=16, requires_grad=True),
        reg_decoded_bbox=True,
        loss_bbox=dict(_delete_=True, type='GIoULoss', loss_weight=2.0)))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=image_scale, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=image_scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'))
]
loader = dict(num_workers=0, persistent_workers=False)  # single process: fastest on a CPU
dataset = dict(data_root=data_root, metainfo=dict(classes=classes))
train_dataloader = dict(
    batch_size=batch_size,
    dataset=dict(
        ann_file='annotations/instances_train.json', data_prefix=dict(img='train/images/'),
        pipeline=train_pipeline, **dataset),
    **loader)
val_dataloader = dict(
    batch_size=8,
    dataset=dict(
        ann_file='annotations/instances_val.json', data_prefix=dict(img='val/images/'),
        pipeline=test_pipeline, **dataset),
    **loader)
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root.rstrip('/') + '/annotations/instances_val.json')
test_evaluator = val_evaluator

optim_wrapper = dict(optimizer=dict(lr=lr), clip_grad=dict(max_norm=10.0))
train_cfg = dict(max_epochs=max_epochs, val_interval=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=100),
    dict(type='CosineAnnealingLR', by_epoch=True, begin=0, end=max_epochs, eta_min=lr * 0.01,
         convert_to_iter_based=True)
]
auto_scale_lr = dict(enable=False, base_batch_size=batch_size)
default_hooks = dict(logger=dict(interval=10), checkpoint=dict(interval=max_epochs, max_keep_ckpts=1))
dataset_help = 'Generate the demo data with: python tools/dataset_converters/make_shapes.py data/shapes'
