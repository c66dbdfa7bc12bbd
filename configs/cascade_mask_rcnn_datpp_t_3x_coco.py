# Cascade Mask R-CNN with DAT-T++ on COCO, 3x, the official DAT-Detection config
# cmrcn_tiny_3x_4n_dp01_lr4.py: Swin's cascade heads (4 convs + 1 fc, SyncBN, GIoU), multi-scale
# resize and crop, AdamW lr 4e-4 for a total batch of 64 (4 nodes x 8 GPUs x 2 images;
# auto_scale_lr rescales it), no weight decay on any norm, 500 warm-up iterations. The official
# run used mixed precision: add --amp.
_base_ = './cascade_mask_rcnn_dat_t_3x_coco.py'

pretrained = 'checkpoints/dat_pp_tiny_in1k_224.pth'  # official DAT++ file or an mmdat checkpoint

# with_cp: gradient checkpointing, on as in the official DAT-Detection configs
# (use_checkpoint=True); see docs/configs.md for when to turn it off.
model = dict(backbone=dict(arch='tiny++', drop_path_rate=0.1, with_cp=True), neck=dict(in_channels=[64, 128, 256, 512]))
optim_wrapper = dict(optimizer=dict(lr=4e-4), paramwise_cfg=dict(norm_decay_mult=0.))
auto_scale_lr = dict(base_batch_size=64)
