"""Hands a config's top-level ``pretrained`` to the backbone under any tool that builds a Runner."""
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

from mmdat.models.utils import resolved_init_cfg


@HOOKS.register_module()
class BackboneWeightsHook(Hook):
    """Apply :func:`mmdat.models.utils.resolved_init_cfg` to the built model's backbone.

    mmdat's tools resolve ``pretrained`` when they load a config; mmdet's and mmseg's own
    ``tools/train.py`` (and ``mim train``) do not, so every mmdat config lists this hook in its
    ``default_hooks``. ``before_run`` comes before the runner initialises the weights, so a
    ``pretrained`` set in a child config or with ``--cfg-options`` is what the backbone loads.
    """

    priority = 'VERY_HIGH'

    def before_run(self, runner) -> None:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        backbone = getattr(model, 'backbone', None)
        if backbone is None or 'pretrained' not in runner.cfg:
            return
        backbone.init_cfg = resolved_init_cfg(backbone.init_cfg, runner.cfg.pretrained)
