# Semantic FPN with DAT-T++ on ADE20K, 512x512 crops, following the official DAT-Segmentation
# config fpn_tiny_80k_dp04_lr2.py: 40k iterations with 4 images on each of 8 GPUs (a total batch
# of 32; auto_scale_lr rescales the learning rate to the real batch), AdamW lr 2e-4, weight
# decay 1e-4, poly decay (power 0.9) to 0, float32.
_base_ = 'mmseg::sem_fpn/fpn_r50_4xb4-160k_ade20k-512x512.py'
custom_imports = dict(imports=['mmdat'], allow_failed_imports=False)

pretrained = None  # an official DAT++ ImageNet checkpoint or an mmdat one
arch = 'tiny++'
drop_path_rate = 0.4
embed_dims = [64, 128, 256, 512]
max_iters = 40000
interval = 4000

model = dict(
    pretrained=None,
    backbone=dict(
        _delete_=True,
        type='DAT',
        arch=arch,
        out_indices=(0, 1, 2, 3),
        drop_path_rate=drop_path_rate,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained) if pretrained else None),
    neck=dict(in_channels=embed_dims))

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=2e-4, betas=(0.9, 0.999), weight_decay=1e-4),
    paramwise_cfg=dict(
        custom_keys={
            'rpe_table': dict(decay_mult=0.),
            'relative_position_bias_table': dict(decay_mult=0.),
            'norm': dict(decay_mult=0.)
        }))
param_scheduler = [
    dict(type='PolyLR', eta_min=0.0, power=0.9, begin=0, end=max_iters, by_epoch=False)
]
train_cfg = dict(max_iters=max_iters, val_interval=interval)
default_hooks = dict(checkpoint=dict(interval=interval))
auto_scale_lr = dict(enable=True, base_batch_size=32)
