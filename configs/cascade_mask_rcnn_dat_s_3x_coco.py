# Cascade Mask R-CNN with DAT-S on COCO, 3x (Swin's official recipe; see the DAT-T config).
_base_ = './cascade_mask_rcnn_dat_t_3x_coco.py'

pretrained = 'checkpoints/dat_small_in1k_224.pth'

model = dict(backbone=dict(arch='small', drop_path_rate=0.2))
