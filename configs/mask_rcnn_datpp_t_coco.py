# Mask R-CNN with DAT-T++ on COCO, 1x, the official DAT-Detection config
# mrcn_tiny_1x_4n_dp00_lr4.py: FPN with an extra conv on the last backbone output for P6
# (add_extra_convs='on_input'), multi-scale resize and crop, AdamW lr 4e-4 for a total batch of
# 64 (4 nodes x 8 GPUs x 2 images; auto_scale_lr rescales it), no weight decay on any norm,
# 500 warm-up iterations. The official run used mixed precision: add --amp.
_base_ = './mask_rcnn_dat_t_coco.py'

pretrained = 'checkpoints/dat_pp_tiny_in1k_224.pth'  # official DAT++ file or an mmdat checkpoint

# with_cp: gradient checkpointing, on as in the official DAT-Detection configs
# (use_checkpoint=True); see docs/configs.md for when to turn it off.
model = dict(
    backbone=dict(arch='tiny++', drop_path_rate=0.0, with_cp=True),
    neck=dict(in_channels=[64, 128, 256, 512], add_extra_convs='on_input'))
optim_wrapper = dict(optimizer=dict(lr=4e-4), paramwise_cfg=dict(norm_decay_mult=0.))
auto_scale_lr = dict(base_batch_size=64)
