# Cascade Mask R-CNN with DAT-T on COCO, 3x schedule (36 epochs, lr steps at 27 and 33) with
# multi-scale training. Heads as in Swin's and ConvNeXt's recipe: 4 convs + 1 fc per box head
# with SyncBN and a GIoU loss. Learning rate for a total batch of 16; auto_scale_lr rescales it.
_base_ = 'mmdet::convnext/cascade-mask-rcnn_convnext-t-p4-w7_fpn_4conv1fc-giou_amp-ms-crop-3x_coco.py'
custom_imports = dict(imports=['mmdat'], allow_failed_imports=False)

pretrained = None  # an official DAT ImageNet checkpoint or an mmdat one
arch = 'tiny'
drop_path_rate = 0.3
embed_dims = [96, 192, 384, 768]

model = dict(
    backbone=dict(
        _delete_=True,
        type='DAT',
        arch=arch,
        out_indices=(0, 1, 2, 3),
        drop_path_rate=drop_path_rate,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained) if pretrained else None),
    neck=dict(in_channels=embed_dims))

optim_wrapper = dict(
    _delete_=True,
    type='AmpOptimWrapper',
    loss_scale='dynamic',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(
        custom_keys={
            'rpe_table': dict(decay_mult=0.),
            'relative_position_bias_table': dict(decay_mult=0.),
            'norm': dict(decay_mult=0.)
        }))
auto_scale_lr = dict(enable=True, base_batch_size=16)
