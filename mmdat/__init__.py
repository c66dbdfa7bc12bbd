from .models import DAT
from .version import __version__

__all__ = ['DAT', '__version__']
