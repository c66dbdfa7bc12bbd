"""mmdat.utils.one_line_errors: the user's mistakes end a tool with one line; bugs keep their
traceback."""
import errno
import os

import pytest

from mmdat.engine import WorkDirInUseError
from mmdat.models.utils import CheckpointError
from mmdat.utils import ConfigError, ImageError, error_line, one_line_errors


def failing(error):

    @one_line_errors
    def main(argv=None):
        raise error

    return main


@pytest.mark.parametrize('error_type', [ConfigError, CheckpointError, ImageError,
                                        WorkDirInUseError])
def test_user_errors_become_their_message(error_type):
    with pytest.raises(SystemExit) as stop:
        failing(error_type('what went wrong, and what to do'))()
    assert stop.value.code == 'what went wrong, and what to do'


@pytest.mark.parametrize('number, advice', [
    (errno.ENOSPC, 'free some space or choose another --work-dir'),
    (errno.EROFS, 'choose a writable --work-dir or --out'),
    (errno.EACCES, 'check the permissions'),
])
def test_file_system_errors_the_user_can_fix(number, advice):
    with pytest.raises(SystemExit) as stop:
        failing(OSError(number, os.strerror(number), '/work/run/epoch_3.pth'))()
    assert stop.value.code.startswith(f'{os.strerror(number)}: /work/run/epoch_3.pth ({advice}')
    assert error_line(OSError(number, os.strerror(number))) == (
        f'{os.strerror(number)} ({advice}' + stop.value.code.split(f'({advice}')[1])


@pytest.mark.parametrize('error', [RuntimeError('a bug'), KeyError('meta'),
                                   FileNotFoundError(errno.ENOENT, 'No such file', 'x')])
def test_other_errors_keep_their_traceback(error):
    with pytest.raises(type(error)):
        failing(error)()


def test_a_tool_s_own_exit_passes_through():
    with pytest.raises(SystemExit, match='^--top-k must be >= 1$'):
        failing(SystemExit('--top-k must be >= 1'))()
