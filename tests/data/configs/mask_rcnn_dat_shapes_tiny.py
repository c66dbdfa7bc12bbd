# Mask R-CNN of configs/mask_rcnn_dat_t_coco.py (RPN, Shared2FC box head, FCN mask head,
# RoIAlign) with a small DAT and narrow heads on the tests' few generated shape images (with
# polygon masks), for the --part predict export and onnx_test in seconds.
_base_ = '../../../configs/mask_rcnn_dat_t_coco.py'

data_root = '{{$SHAPES_ROOT:data/shapes}}'
pretrained = None
classes = ('circle', 'square', 'triangle')
image_scale = (256, 192)
channels = 32
arch = dict(embed_dims=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4), offset_groups=(0, 0, 2, 2))

model = dict(
    backbone=dict(arch=dict(_delete_=True, **arch), drop_path_rate=0.0),
    neck=dict(in_channels=[16, 32, 64, 128], out_channels=channels),
    rpn_head=dict(in_channels=channels, feat_channels=channels),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=channels),
        bbox_head=dict(in_channels=channels, fc_out_channels=64, num_classes=len(classes)),
        mask_roi_extractor=dict(out_channels=channels),
        mask_head=dict(in_channels=channels, conv_out_channels=channels, num_classes=len(classes))))

test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=image_scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'))
]
dataset = dict(data_root=data_root, metainfo=dict(classes=classes), pipeline=test_pipeline)
loader = dict(batch_size=2, num_workers=0, persistent_workers=False)
train_dataloader = dict(
    dataset=dict(ann_file='annotations/instances_train.json', data_prefix=dict(img='train/images/'), **dataset),
    **loader)
val_dataloader = dict(
    dataset=dict(ann_file='annotations/instances_val.json', data_prefix=dict(img='val/images/'), **dataset),
    **loader)
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root.rstrip('/') + '/annotations/instances_val.json', metric=['bbox', 'segm'])
test_evaluator = val_evaluator
