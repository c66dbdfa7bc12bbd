# ADE20K multi-scale + flip test, as the official `--aug-test` of mmseg 0.x that the published
# multi-scale mIoUs used: ratios 0.5..1.75 of the 2048x512 test scale (keeping the aspect ratio),
# each also flipped. (mmseg 1.x's own ADE20K `tta_pipeline` applies the ratios to the original
# image size instead.) Referenced as `_base_.dat_ade20k_tta_pipeline`; run with
# mmseg's own `tools/test.py CONFIG CHECKPOINT --tta`.
dat_ade20k_tta_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(
        type='TestTimeAug',
        transforms=[
            [
                dict(type='Resize', scale=(int(2048 * r), int(512 * r)), keep_ratio=True)
                for r in (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
            ],
            [dict(type='RandomFlip', prob=0., direction='horizontal'),
             dict(type='RandomFlip', prob=1., direction='horizontal')],
            [dict(type='LoadAnnotations')],
            [dict(type='PackSegInputs')],
        ])
]
