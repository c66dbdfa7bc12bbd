# Mask R-CNN with DAT-S on COCO, 3x (Swin's official 3x recipe; see mask_rcnn_dat_t_3x_coco.py).
_base_ = './mask_rcnn_dat_t_3x_coco.py'

pretrained = 'checkpoints/dat_small_in1k_224.pth'

model = dict(backbone=dict(arch='small', drop_path_rate=0.2))
