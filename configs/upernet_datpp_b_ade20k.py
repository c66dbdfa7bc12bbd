# UperNet with DAT-B++ on ADE20K, 512x512 crops, 160k iterations (official
# upn_base_160k_dp07_lr6.py, which trains in float32).
_base_ = './upernet_datpp_t_ade20k.py'

pretrained = None  # an official DAT++ ImageNet checkpoint or an mmdat one
arch = 'base++'
drop_path_rate = 0.7
embed_dims = [128, 256, 512, 1024]

model = dict(
    backbone=dict(
        arch=arch,
        drop_path_rate=drop_path_rate,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained) if pretrained else None),
    decode_head=dict(in_channels=embed_dims),
    auxiliary_head=dict(in_channels=embed_dims[2]))
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer={{_base_.optim_wrapper.optimizer}},
    paramwise_cfg={{_base_.optim_wrapper.paramwise_cfg}})
