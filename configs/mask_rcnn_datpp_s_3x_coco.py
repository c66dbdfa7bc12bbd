# Mask R-CNN with DAT-S++ on COCO, 3x (official mrcn_small_3x_4n_dp05_lr4.py).
_base_ = './mask_rcnn_datpp_t_3x_coco.py'

pretrained = 'checkpoints/dat_pp_small_in1k_224.pth'

# with_cp: gradient checkpointing, on as in the official DAT-Detection configs
# (use_checkpoint=True); see docs/configs.md for when to turn it off.
model = dict(backbone=dict(arch='small++', drop_path_rate=0.5, with_cp=True), neck=dict(in_channels=[96, 192, 384, 768]))
