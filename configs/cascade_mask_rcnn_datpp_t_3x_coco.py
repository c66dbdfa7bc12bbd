# Cascade Mask R-CNN with DAT-T++ on COCO, 3x schedule (36 epochs, lr steps at 27 and 33),
# following the official DAT-Detection config cmrcn_tiny_3x_4n_dp01_lr4.py: box heads with 4
# convs and 1 fc (SyncBN) and GIoU losses, multi-scale training with random crops (the DETR
# recipe), AdamW lr 4e-4 for a total batch of 64 (4 nodes x 8 GPUs x 2 images; auto_scale_lr
# rescales it to the real batch), 500 warm-up iterations, mixed precision. The heads, the
# pipeline and the schedule come from mmdet's ConvNeXt config of the same recipe.
_base_ = 'mmdet::convnext/cascade-mask-rcnn_convnext-t-p4-w7_fpn_4conv1fc-giou_amp-ms-crop-3x_coco.py'
custom_imports = dict(imports=['mmdat'], allow_failed_imports=False)

pretrained = None  # an official DAT++ ImageNet checkpoint or an mmdat one
arch = 'tiny++'
drop_path_rate = 0.1
embed_dims = [64, 128, 256, 512]
max_epochs = 36

model = dict(
    backbone=dict(
        _delete_=True,
        type='DAT',
        arch=arch,
        out_indices=(0, 1, 2, 3),
        drop_path_rate=drop_path_rate,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained) if pretrained else None),
    neck=dict(in_channels=embed_dims))

train_cfg = dict(max_epochs=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[27, 33],
         gamma=0.1)
]

optim_wrapper = dict(
    _delete_=True,
    type='AmpOptimWrapper',
    loss_scale='dynamic',
    optimizer=dict(type='AdamW', lr=4e-4, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(
        norm_decay_mult=0.,
        custom_keys={
            'rpe_table': dict(decay_mult=0.),
            'relative_position_bias_table': dict(decay_mult=0.),
            'norm': dict(decay_mult=0.)
        }))
auto_scale_lr = dict(enable=True, base_batch_size=64)
