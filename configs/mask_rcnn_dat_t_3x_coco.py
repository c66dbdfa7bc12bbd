# Mask R-CNN with DAT-T on COCO, 3x (36 epochs), Swin's official 3x recipe: as the 1x one with
# lr steps at 27 and 33 and Swin-T's 3x drop-path rate.
_base_ = './mask_rcnn_dat_t_coco.py'

model = dict(backbone=dict(drop_path_rate=0.2))
train_cfg = _base_.det_3x.train_cfg
param_scheduler = _base_.det_3x.param_scheduler
