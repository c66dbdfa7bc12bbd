# COCO schedules of Swin's and the official DAT++ detection configs: AdamW steps (x0.1) after
# epochs 8 and 11 of 12 (1x) or 27 and 33 of 36 (3x), after 500 linear warm-up iterations from
# 0.001 of the learning rate (mmdet 2.x's schedule_1x, which both used; mmdet 3's ports of Swin
# warm up for 1000). Referenced as `_base_.det_1x` / `_base_.det_3x`: `train_cfg` and
# `param_scheduler` of a config.
__warmup = dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500)
det_1x = dict(
    train_cfg=dict(max_epochs=12),
    param_scheduler=[
        __warmup,
        dict(type='MultiStepLR', begin=0, end=12, by_epoch=True, milestones=[8, 11], gamma=0.1)
    ])
det_3x = dict(
    train_cfg=dict(max_epochs=36),
    param_scheduler=[
        __warmup,
        dict(type='MultiStepLR', begin=0, end=36, by_epoch=True, milestones=[27, 33], gamma=0.1)
    ])
