# Cascade Mask R-CNN with DAT-B on COCO, 3x (Swin's official recipe; see the DAT-T config).
_base_ = './cascade_mask_rcnn_dat_t_3x_coco.py'

pretrained = 'checkpoints/dat_base_in1k_224.pth'

model = dict(
    backbone=dict(arch='base', drop_path_rate=0.3), neck=dict(in_channels=[128, 256, 512, 1024]))
