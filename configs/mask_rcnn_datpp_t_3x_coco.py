# Mask R-CNN with DAT-T++ on COCO, 3x schedule (36 epochs, lr steps at 27 and 33), following the
# official DAT-Detection config mrcn_tiny_3x_4n_dp03_lr4.py.
_base_ = './mask_rcnn_datpp_t_coco.py'

drop_path_rate = 0.3
max_epochs = 36

model = dict(backbone=dict(drop_path_rate=drop_path_rate))
train_cfg = dict(max_epochs=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[27, 33],
         gamma=0.1)
]
