# UperNet with DAT-S++ on ADE20K, 160k iterations (official upn_small_160k_dp05_lr6.py, mixed
# precision: add --amp).
_base_ = './upernet_datpp_t_ade20k.py'

pretrained = 'checkpoints/dat_pp_small_in1k_224.pth'

# with_cp: gradient checkpointing, on as in the official DAT-Segmentation UperNet configs
# (use_checkpoint=True); see docs/configs.md for when to turn it off.
model = dict(
    backbone=dict(arch='small++', drop_path_rate=0.5, with_cp=True),
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384))
