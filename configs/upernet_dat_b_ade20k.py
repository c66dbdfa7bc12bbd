# UperNet with DAT-B on ADE20K, 160k iterations (Swin's UperNet recipe; see the DAT-T config).
_base_ = './upernet_dat_t_ade20k.py'

pretrained = 'checkpoints/dat_base_in1k_224.pth'

model = dict(
    backbone=dict(arch='base'),
    decode_head=dict(in_channels=[128, 256, 512, 1024]),
    auxiliary_head=dict(in_channels=512))
