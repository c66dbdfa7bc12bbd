# The project's DAT-T++ RetinaNet config on generated shapes with small images, to run
# tools/test.py end to end on a converted official checkpoint. The data root comes from
# $SHAPES_ROOT.
_base_ = '../../../configs/retinanet_datpp_t_coco.py'
pretrained = None  # no ImageNet file: the whole model comes from the tested checkpoint

data_root = '{{$SHAPES_ROOT:data/shapes}}'
classes = ('circle', 'square', 'triangle')
image_scale = (160, 128)

model = dict(bbox_head=dict(num_classes=len(classes)))

test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=image_scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'))
]
val_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=dict(classes=classes), ann_file='annotations/instances_val.json',
                 data_prefix=dict(img='val/images/'), pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root.rstrip('/') + '/annotations/instances_val.json')
test_evaluator = val_evaluator
