# UperNet with DAT-B++ on ADE20K, 160k iterations (official upn_base_160k_dp07_lr6.py, which
# trained in float32: no --amp).
_base_ = './upernet_datpp_t_ade20k.py'

pretrained = 'checkpoints/dat_pp_base_in1k_224.pth'

# with_cp: gradient checkpointing, on as in the official DAT-Segmentation UperNet configs
# (use_checkpoint=True); see docs/configs.md for when to turn it off.
model = dict(
    backbone=dict(arch='base++', drop_path_rate=0.7, with_cp=True),
    decode_head=dict(in_channels=[128, 256, 512, 1024]),
    auxiliary_head=dict(in_channels=512))
