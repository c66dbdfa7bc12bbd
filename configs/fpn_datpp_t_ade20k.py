# Semantic FPN with DAT-T++ on ADE20K, the official DAT-Segmentation config
# fpn_tiny_80k_dp04_lr2.py, which trains as PVT's released Semantic FPN configs: 8 GPUs x 4 images
# (a total of 32; auto_scale_lr rescales the learning rate), lr 2e-4, 40k iterations; float32.
_base_ = './fpn_dat_t_ade20k.py'

pretrained = 'checkpoints/dat_pp_tiny_in1k_224.pth'  # official DAT++ file or an mmdat checkpoint
max_iters = 40000
interval = 4000

model = dict(backbone=dict(arch='tiny++', drop_path_rate=0.4), neck=dict(in_channels=[64, 128, 256, 512]))
optim_wrapper = dict(optimizer=dict(lr=2e-4))
param_scheduler = [dict(type='PolyLR', eta_min=0.0, power=0.9, begin=0, end=max_iters, by_epoch=False)]
train_cfg = dict(max_iters=max_iters, val_interval=interval)
default_hooks = dict(checkpoint=dict(interval=interval))
auto_scale_lr = dict(base_batch_size=32)
