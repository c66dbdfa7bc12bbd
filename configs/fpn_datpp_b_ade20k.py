# Semantic FPN with DAT-B++ on ADE20K, 512x512 crops, 40k iterations (official
# fpn_base_80k_dp07_lr2.py).
_base_ = './fpn_datpp_t_ade20k.py'

pretrained = None  # an official DAT++ ImageNet checkpoint or an mmdat one
arch = 'base++'
drop_path_rate = 0.7
embed_dims = [128, 256, 512, 1024]

model = dict(
    backbone=dict(
        arch=arch,
        drop_path_rate=drop_path_rate,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained) if pretrained else None),
    neck=dict(in_channels=embed_dims))
