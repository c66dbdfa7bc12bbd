# Cascade Mask R-CNN with DAT-T++ on COCO, 1x schedule (12 epochs, lr steps at 8 and 11),
# following the official DAT-Detection config cmrcn_tiny_1x_4n_dp00_lr4.py.
_base_ = './cascade_mask_rcnn_datpp_t_3x_coco.py'

drop_path_rate = 0.0
max_epochs = 12

model = dict(backbone=dict(drop_path_rate=drop_path_rate))
train_cfg = dict(max_epochs=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[8, 11],
         gamma=0.1)
]
