# The DAT backbone piece that every mmdat config starts from (referenced as
# `_base_.dat_backbone`; a config picks `arch` and `drop_path_rate` and sets `pretrained`).
# Weights: every config names its ImageNet file in a top-level `pretrained`; `init_cfg` stays
# `checkpoint=None` here and mmdat hands `pretrained` over when the config is used (mmdat's
# tools, and `BackboneWeightsHook` below under mmdet's and mmseg's own tools), so that editing
# `pretrained` at the top of a config, in a child config or with `--cfg-options pretrained=PATH`
# all reach the backbone. `--cfg-options model.backbone.init_cfg.checkpoint=PATH` wins over
# `pretrained`. A missing file stops training with a one-line error; `pretrained = None` trains
# the backbone from scratch on purpose. See mmdat/models/utils/pretrained.py.
dat_backbone = dict(
    _delete_=True,  # replaces the backbone of the mmdet/mmseg config it is put into
    type='DAT',
    arch='tiny',
    out_indices=(0, 1, 2, 3),
    drop_path_rate=0.1,
    init_cfg=dict(type='Pretrained', checkpoint=None))

# Merged into the default_hooks of every mmdat config: checkpoints written atomically, and
# `pretrained` resolved before the runner initialises the weights.
dat_default_hooks = dict(
    checkpoint=dict(type='AtomicCheckpointHook'),
    backbone_weights=dict(type='BackboneWeightsHook'))
