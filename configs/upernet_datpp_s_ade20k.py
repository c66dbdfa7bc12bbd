# UperNet with DAT-S++ on ADE20K, 512x512 crops, 160k iterations (official
# upn_small_160k_dp05_lr6.py).
_base_ = './upernet_datpp_t_ade20k.py'

pretrained = None  # an official DAT++ ImageNet checkpoint or an mmdat one
arch = 'small++'
drop_path_rate = 0.5
embed_dims = [96, 192, 384, 768]

model = dict(
    backbone=dict(
        arch=arch,
        drop_path_rate=drop_path_rate,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained) if pretrained else None),
    decode_head=dict(in_channels=embed_dims),
    auxiliary_head=dict(in_channels=embed_dims[2]))
