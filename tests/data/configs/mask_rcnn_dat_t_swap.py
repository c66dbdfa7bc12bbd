# An unchanged mmdet Mask R-CNN config with the DAT backbone swapped in, as a user would write it.
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['mmdat'], allow_failed_imports=False)

model = dict(
    backbone=dict(_delete_=True, type='DAT', arch='tiny', drop_path_rate=0.1),
    neck=dict(in_channels=[96, 192, 384, 768]))
