# COCO training pipelines with the multi-scale resize-and-crop policy of DETR that Swin's
# official detection configs (1x and 3x) and the official DAT++ ones use: either a resize to a
# short side of 480..800 (step 32, long side at most 1333), or a resize to 400/500/600, a random
# crop of 384..600 pixels and then the first resize. Referenced as `_base_.ms_crop_box_pipeline`
# (RetinaNet) and `_base_.ms_crop_mask_pipeline` (Mask R-CNN).
__short_sides = [480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800]
__resize = dict(type='RandomChoiceResize', scales=[(s, 1333) for s in __short_sides], keep_ratio=True)
ms_crop = dict(
    type='RandomChoice',
    transforms=[[__resize],
                [
                    dict(type='RandomChoiceResize', scales=[(400, 1333), (500, 1333), (600, 1333)],
                         keep_ratio=True),
                    dict(type='RandomCrop', crop_type='absolute_range', crop_size=(384, 600),
                         allow_negative_crop=True), __resize
                ]])
ms_crop_box_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='RandomFlip', prob=0.5), ms_crop,
    dict(type='PackDetInputs')
]
ms_crop_mask_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='RandomFlip', prob=0.5), ms_crop,
    dict(type='PackDetInputs')
]
