from .engine import allow_mmengine_checkpoints
from .models import DAT
from .models.utils import use_safe_checkpoint_loader
from .version import __version__

# Resuming from an mmengine checkpoint needs this on torch >= 2.6 (see mmdat.engine.safe_globals);
# done at import so that configs with custom_imports=['mmdat'] resume with the stock tools.
allow_mmengine_checkpoints()
# mmengine's runner, init_cfgs and the inferencers then read local files with mmdat's loader.
use_safe_checkpoint_loader()

__all__ = ['DAT', '__version__']
