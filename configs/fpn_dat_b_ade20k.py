# Semantic FPN with DAT-B on ADE20K, 512x512 crops, 80k iterations.
_base_ = './fpn_dat_t_ade20k.py'

arch = 'base'
drop_path_rate = 0.5
embed_dims = [128, 256, 512, 1024]

model = dict(backbone=dict(arch=arch, drop_path_rate=drop_path_rate), neck=dict(in_channels=embed_dims))
