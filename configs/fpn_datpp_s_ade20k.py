# Semantic FPN with DAT-S++ on ADE20K, 512x512 crops, 40k iterations (official
# fpn_small_80k_dp04_lr2.py).
_base_ = './fpn_datpp_t_ade20k.py'

pretrained = None  # an official DAT++ ImageNet checkpoint or an mmdat one
arch = 'small++'
drop_path_rate = 0.4
embed_dims = [96, 192, 384, 768]

model = dict(
    backbone=dict(
        arch=arch,
        drop_path_rate=drop_path_rate,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained) if pretrained else None),
    neck=dict(in_channels=embed_dims))
