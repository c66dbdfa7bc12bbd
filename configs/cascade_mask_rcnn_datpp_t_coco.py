# Cascade Mask R-CNN with DAT-T++ on COCO, 1x (12 epochs, lr steps at 8 and 11), the official
# DAT-Detection config cmrcn_tiny_1x_4n_dp00_lr4.py.
_base_ = './cascade_mask_rcnn_datpp_t_3x_coco.py'

model = dict(backbone=dict(drop_path_rate=0.0))
train_cfg = _base_.det_1x.train_cfg
param_scheduler = _base_.det_1x.param_scheduler
