# UperNet with DAT-T on ADE20K, 512x512 crops, 160k iterations, with Swin's official UperNet
# recipe (via mmseg's port): AdamW lr 6e-5, weight decay 0.01, 1500 linear warm-up iterations,
# then poly decay (power 1), for a total batch of 16 (8 GPUs x 2 images; auto_scale_lr rescales
# it); multi-scale test as the official --aug-test. Per-field sources and the paper's numbers:
# README, "Configs and results".
_base_ = [
    'mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py',
    '_base_/dat_backbone.py', '_base_/dat_optimizer.py', '_base_/ade20k_tta.py'
]
custom_imports = dict(imports=['mmdat'], allow_failed_imports=False)

pretrained = 'checkpoints/dat_tiny_in1k_224.pth'  # official DAT file or an mmdat checkpoint

model = dict(
    pretrained=None,  # mmseg's model-level weights; DAT loads its own through init_cfg
    backbone=dict(_base_.dat_backbone, drop_path_rate=0.3),
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384))
optim_wrapper = dict(
    _base_.dat_optim_wrapper, optimizer=dict(_base_.dat_optim_wrapper.optimizer, lr=6e-5, weight_decay=0.01))
tta_pipeline = _base_.dat_ade20k_tta_pipeline
default_hooks = _base_.dat_default_hooks
auto_scale_lr = dict(enable=True, base_batch_size=16)
