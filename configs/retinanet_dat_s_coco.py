# RetinaNet with DAT-S on COCO, 1x schedule.
_base_ = './retinanet_dat_t_coco.py'

arch = 'small'
drop_path_rate = 0.3

model = dict(backbone=dict(arch=arch, drop_path_rate=drop_path_rate))
