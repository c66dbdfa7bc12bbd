from .engine import allow_mmengine_checkpoints
from .models import DAT
from .models.utils import use_safe_checkpoint_loader
from .version import __version__

# torch.load(weights_only=True) of an mmengine checkpoint needs this on torch >= 2.6 (see
# mmdat.engine.safe_globals); it also makes unpickling mmengine's HistoryBuffer safe.
allow_mmengine_checkpoints()
# mmengine's runner, init_cfgs and the inferencers then read every checkpoint source with mmdat's
# reader (done at import, so configs with custom_imports=['mmdat'] are covered under the stock
# tools too).
use_safe_checkpoint_loader()

__all__ = ['DAT', '__version__']
