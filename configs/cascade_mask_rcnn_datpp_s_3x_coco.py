# Cascade Mask R-CNN with DAT-S++ on COCO, 3x schedule (official cmrcn_small_3x_4n_dp05_lr4.py,
# which trains in float32).
_base_ = './cascade_mask_rcnn_datpp_t_3x_coco.py'

pretrained = None  # an official DAT++ ImageNet checkpoint or an mmdat one
arch = 'small++'
drop_path_rate = 0.5
embed_dims = [96, 192, 384, 768]

model = dict(
    backbone=dict(
        arch=arch,
        drop_path_rate=drop_path_rate,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained) if pretrained else None),
    neck=dict(in_channels=embed_dims))
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer={{_base_.optim_wrapper.optimizer}},
    paramwise_cfg={{_base_.optim_wrapper.paramwise_cfg}})
