# RetinaNet with DAT-S on COCO, 3x schedule with multi-scale training.
_base_ = './retinanet_dat_t_3x_coco.py'

arch = 'small'
drop_path_rate = 0.4  # 0.3 in 1x

model = dict(backbone=dict(arch=arch, drop_path_rate=drop_path_rate))
