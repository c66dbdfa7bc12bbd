# UperNet with DAT-T++ on ADE20K, 160k iterations, the official DAT-Segmentation config
# upn_tiny_160k_dp03_lr6.py: the same recipe as upernet_dat_t_ade20k.py (Swin's). The official
# run used mixed precision: add --amp.
_base_ = './upernet_dat_t_ade20k.py'

pretrained = 'checkpoints/dat_pp_tiny_in1k_224.pth'  # official DAT++ file or an mmdat checkpoint

# with_cp: gradient checkpointing, on as in the official DAT-Segmentation UperNet configs
# (use_checkpoint=True); see docs/configs.md for when to turn it off.
model = dict(
    backbone=dict(arch='tiny++', drop_path_rate=0.3, with_cp=True),
    decode_head=dict(in_channels=[64, 128, 256, 512]),
    auxiliary_head=dict(in_channels=256))
