# Semantic FPN with DAT-B on ADE20K, 80k iterations (PVT's recipe; see the DAT-T config).
_base_ = './fpn_dat_t_ade20k.py'

pretrained = 'checkpoints/dat_base_in1k_224.pth'

model = dict(backbone=dict(arch='base', drop_path_rate=0.5), neck=dict(in_channels=[128, 256, 512, 1024]))
