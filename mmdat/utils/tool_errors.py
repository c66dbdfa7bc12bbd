"""One line and exit status 1 for the user's mistakes, in every tool.

The library raises exceptions (:class:`ConfigError`, :class:`CheckpointError`, ...) and the tools
wrap their ``main`` in :func:`one_line_errors`, which turns those into ``SystemExit(message)``:
Python prints the message alone and exits with status 1. Anything else is a bug and keeps its
traceback.
"""
import errno
import functools
from typing import Callable

from mmdat.engine.work_dir import WorkDirInUseError
from mmdat.models.utils import CheckpointError
from .image import ImageError
from .tool_config import ConfigError

#: Exceptions whose message is written for the user: one line (a few for a list of files).
USER_ERRORS = (ConfigError, CheckpointError, ImageError, WorkDirInUseError)

#: File-system errors that the user, not the code, can fix, with what to do.
_OS_ADVICE = {
    errno.ENOSPC: 'free some space or choose another --work-dir',
    errno.EDQUOT: 'free some space or choose another --work-dir',
    errno.EROFS: 'choose a writable --work-dir or --out',
    errno.EACCES: 'check the permissions, or choose another --work-dir or --out',
    errno.EPERM: 'check the permissions, or choose another --work-dir or --out',
}


def error_line(error: BaseException) -> str:
    """The message the tools print for ``error``, if it is the user's to fix; else ``None``."""
    if isinstance(error, USER_ERRORS):
        return str(error)
    if isinstance(error, OSError) and error.errno in _OS_ADVICE:
        where = f': {error.filename}' if error.filename else ''
        return f'{error.strerror or error}{where} ({_OS_ADVICE[error.errno]})'
    return None


def one_line_errors(main: Callable) -> Callable:
    """Decorate a tool's ``main``: the user's mistakes end it with one line and status 1.

    ``SystemExit`` passes through, so ``main`` may still stop with its own message.
    """

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except Exception as error:
            line = error_line(error)
            if line is None:
                raise
            raise SystemExit(line) from None

    return wrapped
