# AdamW without weight decay on the position-bias tables and the norms (Swin's and the official
# DAT/DAT++ configs' rule), referenced as `_base_.dat_optim_wrapper`. Plain `OptimWrapper`:
# mixed precision is the command line's choice (`tools/train.py --amp`, as in mmdet and mmseg).
dat_optim_wrapper = dict(
    _delete_=True,  # drops the inherited optimizer, constructor and loss scale
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(
        custom_keys={
            'rpe_table': dict(decay_mult=0.),
            'relative_position_bias_table': dict(decay_mult=0.),
            'norm': dict(decay_mult=0.)
        }))
