# Semantic FPN with DAT-T on ADE20K, 512x512 crops, 80k iterations, with PVT's recipe (which the
# DAT paper follows): AdamW lr 1e-4, weight decay 1e-4, poly decay (power 0.9), for a total
# batch of 16 (4 GPUs x 4 images; auto_scale_lr rescales it); multi-scale test as the official
# --aug-test. Per-field sources and the paper's numbers: README, "Configs and results".
_base_ = [
    'mmseg::sem_fpn/fpn_r50_4xb4-160k_ade20k-512x512.py', '_base_/dat_backbone.py',
    '_base_/dat_optimizer.py', '_base_/ade20k_tta.py'
]
custom_imports = dict(imports=['mmdat'], allow_failed_imports=False)

pretrained = 'checkpoints/dat_tiny_in1k_224.pth'  # official DAT file or an mmdat checkpoint
max_iters = 80000
interval = 8000

model = dict(
    pretrained=None,  # mmseg's model-level weights (ResNet in the base); DAT loads its own
    backbone=dict(_base_.dat_backbone, drop_path_rate=0.3),
    neck=dict(in_channels=[96, 192, 384, 768]))
optim_wrapper = dict(_base_.dat_optim_wrapper, optimizer=dict(_base_.dat_optim_wrapper.optimizer, weight_decay=1e-4))
param_scheduler = [dict(type='PolyLR', eta_min=0.0, power=0.9, begin=0, end=max_iters, by_epoch=False)]
train_cfg = dict(max_iters=max_iters, val_interval=interval)
tta_pipeline = _base_.dat_ade20k_tta_pipeline
default_hooks = dict(
    _base_.dat_default_hooks, checkpoint=dict(_base_.dat_default_hooks.checkpoint, interval=interval))
auto_scale_lr = dict(enable=True, base_batch_size=16)
