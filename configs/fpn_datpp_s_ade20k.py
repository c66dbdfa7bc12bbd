# Semantic FPN with DAT-S++ on ADE20K, 40k iterations at batch 32 (official
# fpn_small_80k_dp04_lr2.py, which trains as the tiny one).
_base_ = './fpn_datpp_t_ade20k.py'

pretrained = 'checkpoints/dat_pp_small_in1k_224.pth'

model = dict(backbone=dict(arch='small++', drop_path_rate=0.4), neck=dict(in_channels=[96, 192, 384, 768]))
