# Cascade Mask R-CNN with DAT-B on COCO, 3x schedule with multi-scale training.
_base_ = './cascade_mask_rcnn_dat_t_3x_coco.py'

arch = 'base'
drop_path_rate = 0.5
embed_dims = [128, 256, 512, 1024]

model = dict(backbone=dict(arch=arch, drop_path_rate=drop_path_rate), neck=dict(in_channels=embed_dims))
