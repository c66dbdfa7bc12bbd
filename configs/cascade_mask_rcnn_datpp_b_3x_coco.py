# Cascade Mask R-CNN with DAT-B++ on COCO, 3x schedule (official cmrcn_base_3x_8n_dp08_lr4.py:
# float32, 1 image per GPU on 8 nodes x 8 GPUs, a total batch of 64 as for T and S).
_base_ = './cascade_mask_rcnn_datpp_t_3x_coco.py'

pretrained = None  # an official DAT++ ImageNet checkpoint or an mmdat one
arch = 'base++'
drop_path_rate = 0.8
embed_dims = [128, 256, 512, 1024]

model = dict(
    backbone=dict(
        arch=arch,
        drop_path_rate=drop_path_rate,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained) if pretrained else None),
    neck=dict(in_channels=embed_dims))
train_dataloader = dict(batch_size=1)
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer={{_base_.optim_wrapper.optimizer}},
    paramwise_cfg={{_base_.optim_wrapper.paramwise_cfg}})
