# Semantic FPN with DAT-B++ on ADE20K, 40k iterations at batch 32 (official
# fpn_base_80k_dp07_lr2.py, which trains as the tiny one).
_base_ = './fpn_datpp_t_ade20k.py'

pretrained = 'checkpoints/dat_pp_base_in1k_224.pth'

model = dict(backbone=dict(arch='base++', drop_path_rate=0.7), neck=dict(in_channels=[128, 256, 512, 1024]))
