# RetinaNet with DAT-T on COCO, 1x (12 epochs), with Swin's official 1x recipe (the DAT paper
# follows Swin; Swin published no RetinaNet, so its Mask R-CNN recipe): multi-scale resize and
# crop, AdamW lr 1e-4 for a total batch of 16 (auto_scale_lr rescales it), 500 warm-up
# iterations. Per-field sources and the paper's numbers: README, "Configs and results".
_base_ = [
    'mmdet::swin/retinanet_swin-t-p4-w7_fpn_1x_coco.py', '_base_/dat_backbone.py',
    '_base_/dat_optimizer.py', '_base_/coco_ms_crop.py', '_base_/det_schedules.py'
]
custom_imports = dict(imports=['mmdat'], allow_failed_imports=False)

pretrained = 'checkpoints/dat_tiny_in1k_224.pth'  # official DAT file or an mmdat checkpoint

model = dict(
    # RetinaNet's FPN starts at stride 8 (an unused stride-4 norm would trouble DDP)
    backbone=dict(_base_.dat_backbone, out_indices=(1, 2, 3), drop_path_rate=0.1),
    neck=dict(in_channels=[192, 384, 768]))
train_pipeline = _base_.ms_crop_box_pipeline
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))
train_cfg = _base_.det_1x.train_cfg
param_scheduler = _base_.det_1x.param_scheduler
optim_wrapper = _base_.dat_optim_wrapper
default_hooks = _base_.dat_default_hooks
auto_scale_lr = dict(enable=True, base_batch_size=16)
