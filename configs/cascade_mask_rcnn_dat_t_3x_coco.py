# Cascade Mask R-CNN with DAT-T on COCO, 3x (36 epochs), Swin's official Cascade recipe: box
# heads with 4 convs + 1 fc (SyncBN) and GIoU losses, multi-scale resize and crop (from mmdet's
# ConvNeXt port of it), AdamW lr 1e-4 for a total batch of 16 (auto_scale_lr rescales it),
# 500 warm-up iterations. Per-field sources and the paper's numbers: README.
_base_ = [
    'mmdet::convnext/cascade-mask-rcnn_convnext-t-p4-w7_fpn_4conv1fc-giou_amp-ms-crop-3x_coco.py',
    '_base_/dat_backbone.py', '_base_/dat_optimizer.py', '_base_/det_schedules.py'
]
custom_imports = dict(imports=['mmdat'], allow_failed_imports=False)

pretrained = 'checkpoints/dat_tiny_in1k_224.pth'  # official DAT file or an mmdat checkpoint

model = dict(backbone=dict(_base_.dat_backbone, drop_path_rate=0.2))
train_cfg = _base_.det_3x.train_cfg
param_scheduler = _base_.det_3x.param_scheduler
optim_wrapper = _base_.dat_optim_wrapper
default_hooks = _base_.dat_default_hooks
auto_scale_lr = dict(enable=True, base_batch_size=16)
