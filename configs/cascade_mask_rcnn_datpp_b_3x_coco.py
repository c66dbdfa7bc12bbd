# Cascade Mask R-CNN with DAT-B++ on COCO, 3x (official cmrcn_base_3x_8n_dp08_lr4.py: float32,
# so no --amp; 1 image per GPU on 8 nodes x 8 GPUs, the same total batch of 64).
_base_ = './cascade_mask_rcnn_datpp_t_3x_coco.py'

pretrained = 'checkpoints/dat_pp_base_in1k_224.pth'

# with_cp: gradient checkpointing, on as in the official DAT-Detection configs
# (use_checkpoint=True); see docs/configs.md for when to turn it off.
model = dict(backbone=dict(arch='base++', drop_path_rate=0.8, with_cp=True), neck=dict(in_channels=[128, 256, 512, 1024]))
train_dataloader = dict(batch_size=1)
