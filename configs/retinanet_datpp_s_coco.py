# RetinaNet with DAT-S++ on COCO, 1x (official rtn_small_1x_4n_dp01_lr2.py).
_base_ = './retinanet_datpp_t_coco.py'

pretrained = 'checkpoints/dat_pp_small_in1k_224.pth'

# with_cp: gradient checkpointing, on as in the official DAT-Detection configs
# (use_checkpoint=True); see docs/configs.md for when to turn it off.
model = dict(backbone=dict(arch='small++', drop_path_rate=0.1, with_cp=True), neck=dict(in_channels=[192, 384, 768]))
