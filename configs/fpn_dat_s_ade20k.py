# Semantic FPN with DAT-S on ADE20K, 512x512 crops, 80k iterations.
_base_ = './fpn_dat_t_ade20k.py'

arch = 'small'

model = dict(backbone=dict(arch=arch))
