# UperNet with DAT-S on ADE20K, 512x512 crops, 160k iterations.
_base_ = './upernet_dat_t_ade20k.py'

arch = 'small'
drop_path_rate = 0.3

model = dict(backbone=dict(arch=arch, drop_path_rate=drop_path_rate))
