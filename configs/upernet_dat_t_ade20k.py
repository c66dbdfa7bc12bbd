# UperNet with DAT-T on ADE20K, 512x512 crops, 160k iterations.
# AdamW lr 6e-5, weight decay 0.01, 1500 linear warm-up iterations, then poly decay,
# for a total batch of 16 (8 GPUs x 2 images); auto_scale_lr rescales it.
_base_ = 'mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py'
custom_imports = dict(imports=['mmdat'], allow_failed_imports=False)

pretrained = None  # an official DAT ImageNet checkpoint or an mmdat one
arch = 'tiny'
drop_path_rate = 0.3
embed_dims = [96, 192, 384, 768]

model = dict(
    pretrained=None,
    backbone=dict(
        _delete_=True,
        type='DAT',
        arch=arch,
        out_indices=(0, 1, 2, 3),
        drop_path_rate=drop_path_rate,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained) if pretrained else None),
    decode_head=dict(in_channels=embed_dims),
    auxiliary_head=dict(in_channels=embed_dims[2]))

optim_wrapper = dict(
    type='AmpOptimWrapper',
    loss_scale='dynamic',
    paramwise_cfg=dict(
        custom_keys={
            'rpe_table': dict(decay_mult=0.),
            'relative_position_bias_table': dict(decay_mult=0.),
            'norm': dict(decay_mult=0.)
        }))
auto_scale_lr = dict(enable=True, base_batch_size=16)
