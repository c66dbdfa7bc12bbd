# Semantic FPN with DAT-S on ADE20K, 80k iterations (PVT's recipe; see the DAT-T config).
_base_ = './fpn_dat_t_ade20k.py'

pretrained = 'checkpoints/dat_small_in1k_224.pth'

model = dict(backbone=dict(arch='small'))
