# UperNet with DAT-T++ on ADE20K, 512x512 crops, 160k iterations, following the official
# DAT-Segmentation config upn_tiny_160k_dp03_lr6.py: AdamW lr 6e-5, weight decay 0.01,
# 1500 linear warm-up iterations, then poly decay (power 1), for a total batch of 16 (8 GPUs x
# 2 images; auto_scale_lr rescales it), mixed precision.
_base_ = './upernet_dat_t_ade20k.py'

pretrained = None  # an official DAT++ ImageNet checkpoint or an mmdat one
arch = 'tiny++'
drop_path_rate = 0.3
embed_dims = [64, 128, 256, 512]

model = dict(
    backbone=dict(
        _delete_=True,
        type='DAT',
        arch=arch,
        out_indices=(0, 1, 2, 3),
        drop_path_rate=drop_path_rate,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained) if pretrained else None),
    decode_head=dict(in_channels=embed_dims),
    auxiliary_head=dict(in_channels=embed_dims[2]))
