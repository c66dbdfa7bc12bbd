# RetinaNet with DAT-T++ on COCO, 1x schedule (12 epochs, lr steps at 8 and 11), following the
# official DAT-Detection config rtn_tiny_1x_4n_dp00_lr2.py: multi-scale training with random
# crops (the DETR recipe), AdamW lr 2e-4 for a total batch of 64 (4 nodes x 8 GPUs x 2 images;
# auto_scale_lr rescales it to the real batch), 500 warm-up iterations, mixed precision.
_base_ = './retinanet_dat_t_coco.py'

pretrained = None  # an official DAT++ ImageNet checkpoint or an mmdat one
arch = 'tiny++'
drop_path_rate = 0.0
embed_dims = [64, 128, 256, 512]

model = dict(
    backbone=dict(
        _delete_=True,
        type='DAT',
        arch=arch,
        out_indices=(1, 2, 3),  # RetinaNet's FPN starts at stride 8
        drop_path_rate=drop_path_rate,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained) if pretrained else None),
    neck=dict(in_channels=embed_dims[1:]))

# augmentation strategy originates from DETR / Sparse RCNN
train_pipeline = [
    dict(type='LoadImageFromFile', backend_args={{_base_.backend_args}}),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='RandomFlip', prob=0.5),
    dict(
        type='RandomChoice',
        transforms=[[
            dict(
                type='RandomChoiceResize',
                scales=[(480, 1333), (512, 1333), (544, 1333), (576, 1333), (608, 1333),
                        (640, 1333), (672, 1333), (704, 1333), (736, 1333), (768, 1333),
                        (800, 1333)],
                keep_ratio=True)
        ], [
            dict(type='RandomChoiceResize', scales=[(400, 1333), (500, 1333), (600, 1333)],
                 keep_ratio=True),
            dict(type='RandomCrop', crop_type='absolute_range', crop_size=(384, 600),
                 allow_negative_crop=True),
            dict(
                type='RandomChoiceResize',
                scales=[(480, 1333), (512, 1333), (544, 1333), (576, 1333), (608, 1333),
                        (640, 1333), (672, 1333), (704, 1333), (736, 1333), (768, 1333),
                        (800, 1333)],
                keep_ratio=True)
        ]]),
    dict(type='PackDetInputs')
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))

optim_wrapper = dict(
    _delete_=True,
    type='AmpOptimWrapper',
    loss_scale='dynamic',
    optimizer=dict(type='AdamW', lr=2e-4, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(
        norm_decay_mult=0.,
        custom_keys={
            'rpe_table': dict(decay_mult=0.),
            'relative_position_bias_table': dict(decay_mult=0.),
            'norm': dict(decay_mult=0.)
        }))
auto_scale_lr = dict(enable=True, base_batch_size=64)
