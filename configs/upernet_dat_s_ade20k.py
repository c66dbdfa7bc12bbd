# UperNet with DAT-S on ADE20K, 160k iterations (Swin's UperNet recipe; see the DAT-T config).
_base_ = './upernet_dat_t_ade20k.py'

pretrained = 'checkpoints/dat_small_in1k_224.pth'

model = dict(backbone=dict(arch='small'))
