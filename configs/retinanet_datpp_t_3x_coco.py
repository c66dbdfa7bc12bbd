# RetinaNet with DAT-T++ on COCO, 3x (36 epochs, lr steps at 27 and 33), the official
# DAT-Detection config rtn_tiny_3x_4n_dp02_lr2.py.
_base_ = './retinanet_datpp_t_coco.py'

model = dict(backbone=dict(drop_path_rate=0.2))
train_cfg = _base_.det_3x.train_cfg
param_scheduler = _base_.det_3x.param_scheduler
