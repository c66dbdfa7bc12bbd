# The project's RetinaNet config on generated shapes, with a small DAT and small images, so that
# the training tools can be run end to end in seconds. The data root comes from $SHAPES_ROOT.
_base_ = '../../../configs/retinanet_dat_t_coco.py'

data_root = '{{$SHAPES_ROOT:data/shapes/}}'
classes = ('circle', 'square', 'triangle')
image_scale = (320, 256)

model = dict(
    backbone=dict(
        arch=dict(_delete_=True, embed_dims=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), offset_groups=(0, 0, 2, 2)),
        drop_path_rate=0.0),
    neck=dict(in_channels=[32, 64, 128]),
    bbox_head=dict(num_classes=len(classes)))

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
train_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=dict(classes=classes), ann_file='annotations/instances_train.json',
                 data_prefix=dict(img='train/images/'), pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=dict(classes=classes), ann_file='annotations/instances_val.json',
                 data_prefix=dict(img='val/images/'), pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json')
test_evaluator = val_evaluator

train_cfg = dict(max_epochs=2, val_interval=2)
param_scheduler = [dict(type='MultiStepLR', by_epoch=True, milestones=[1], gamma=0.5)]
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=1))
