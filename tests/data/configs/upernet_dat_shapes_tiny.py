# The project's UperNet config on generated shapes (semantic labels), with a small DAT, small
# heads and small images, so that tools can be run end to end on a CPU in seconds.
# The data root comes from $SHAPES_ROOT.
_base_ = '../../../configs/upernet_dat_t_ade20k.py'
pretrained = None  # a small arch, randomly initialised

data_root = '{{$SHAPES_ROOT:data/shapes}}'
classes = ('background', 'circle', 'square', 'triangle')
image_scale = (320, 256)
norm_cfg = dict(type='BN', requires_grad=True)  # SyncBN needs a process group; BN runs anywhere

model = dict(
    data_preprocessor=dict(size=(256, 320)),
    backbone=dict(
        arch=dict(_delete_=True, embed_dims=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), offset_groups=(0, 0, 2, 2)),
        drop_path_rate=0.0),
    decode_head=dict(in_channels=[16, 32, 64, 128], channels=32, num_classes=len(classes), norm_cfg=norm_cfg),
    auxiliary_head=dict(in_channels=64, channels=16, num_classes=len(classes), norm_cfg=norm_cfg))

test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=image_scale, keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=False),
    dict(type='PackSegInputs')
]
val_dataloader = dict(
    batch_size=1, num_workers=0, persistent_workers=False,
    dataset=dict(type='BaseSegDataset', data_root=data_root, metainfo=dict(classes=classes),
                 img_suffix='.png', seg_map_suffix='.png', reduce_zero_label=False,
                 data_prefix=dict(img_path='val/images', seg_map_path='val/labels'), pipeline=test_pipeline))
test_dataloader = val_dataloader
