from .engine import allow_mmengine_checkpoints
from .models import DAT
from .version import __version__

# Resuming from an mmengine checkpoint needs this on torch >= 2.6 (see mmdat.engine.safe_globals);
# done at import so that configs with custom_imports=['mmdat'] resume with the stock tools.
allow_mmengine_checkpoints()

__all__ = ['DAT', '__version__']
