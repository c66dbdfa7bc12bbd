"""One training run per work dir, and the temporary files of its checkpoint saves.

Two runs saving to one folder would write the same ``epoch_N.pth`` names and ``last_checkpoint``,
and each would remove the other's checkpoints as superseded: :class:`WorkDirLock` lets the second
run stop with one line that names the first. A temporary file is named after the process that
writes it (:func:`temporary_name`), so that a run removes only temporary files whose writer is gone
(:func:`writer_is_gone`), never one that a live process is about to rename.
"""
import errno
import os
import os.path as osp
import re
import socket
import sys
import time
import warnings
from typing import Dict, Optional

try:
    import fcntl
except ImportError:  # Windows: no advisory locks here; the temporary-file rule still holds
    fcntl = None

#: Suffix of the temporary files of :func:`write_atomically`.
TMP_SUFFIX = '.mmdat-tmp'
#: The lock file a training run holds in its work dir (and checkpoint folder).
LOCK_NAME = '.mmdat-run.lock'

_HOST = re.sub(r'[^A-Za-z0-9-]', '-', socket.gethostname())[:64] or 'host'
# ``.NAME.PID-START-HOST.mmdat-tmp``; files of older mmdat versions are ``.NAME.PID.mmdat-tmp``.
_TMP_PATTERN = re.compile(r'\.(\d+)(?:-(\d+)-([A-Za-z0-9-]+))?' + re.escape(TMP_SUFFIX) + '$')


class WorkDirInUseError(RuntimeError):
    """Another live training run holds the folder; the message is one line naming it."""


def process_start_time(pid: int) -> Optional[str]:
    """When process ``pid`` started, in clock ticks since boot (Linux), or ``None``.

    With the pid it names one process: a pid can be reused after its process ended.
    """
    try:
        with open(f'/proc/{pid}/stat') as file:
            stat = file.read()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces; starttime is field 22.
    fields = stat[stat.rfind(')') + 2:].split()
    return fields[19] if len(fields) > 19 else None


def temporary_name(path: str) -> str:
    """A hidden name next to ``path`` that names this process (pid, start time and host)."""
    directory, name = osp.split(path)
    pid = os.getpid()
    return osp.join(directory, f'.{name}.{pid}-{process_start_time(pid) or 0}-{_HOST}{TMP_SUFFIX}')


def writer_is_gone(path: str) -> bool:
    """Whether the process that wrote the temporary file ``path`` has ended.

    ``False`` when that cannot be known: a file of another host, or a name without a pid.
    """
    match = _TMP_PATTERN.search(osp.basename(path))
    if match is None:
        return False
    pid, start, host = int(match[1]), match[2], match[3]
    if host is not None and host != _HOST:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        pass
    if start is not None and start != '0':
        current = process_start_time(pid)
        return current is not None and current != start  # the pid now names another process
    return False


def remove_abandoned_temporaries(folder: str) -> list:
    """Remove the temporary files in ``folder`` whose writing process has ended; return them."""
    removed = []
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return removed
    for name in names:
        path = osp.join(folder, name)
        if name.startswith('.') and name.endswith(TMP_SUFFIX) and writer_is_gone(path):
            try:
                os.remove(path)
            except FileNotFoundError:  # another run removed it first
                continue
            removed.append(path)
    return removed


#: Locks this process holds, by real path of the lock file: a later run in the same process
#: (after an earlier one raised) takes its lock over instead of stopping at it.
_HELD: Dict[str, object] = {}


class WorkDirLock:
    """An exclusive advisory lock (``flock``) on ``folder/.mmdat-run.lock``.

    The lock ends with the process, however it ends (``kill -9`` included), so a killed run never
    blocks the next one. The file holds the holder's pid, host, start time and command, for the
    message of a run that finds the folder taken.

    Args:
        folder (str): The folder to hold (created if missing).
    """

    def __init__(self, folder: str):
        self.folder = str(folder)
        self.path = osp.join(self.folder, LOCK_NAME)

    @property
    def held(self) -> bool:
        return osp.realpath(self.path) in _HELD

    def acquire(self) -> None:
        """Take the folder, or raise :class:`WorkDirInUseError` naming the run that has it."""
        if fcntl is None or self.held:
            return
        os.makedirs(self.folder, exist_ok=True)
        while True:
            handle = open(self.path, 'a+')
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                handle.seek(0)
                holder = handle.read().strip() or 'a process that has not written its name yet'
                handle.close()
                if error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    warnings.warn(f'{self.folder}: the file system has no locks '
                                  f'({error.strerror}); a second run here would not be stopped')
                    return
                if error.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise WorkDirInUseError(
                    f'{self.folder} is in use by another training run ({holder}): give this run '
                    'its own --work-dir, or wait until that run ends') from None
            # The holder before us may have removed the file between our open and our lock:
            # the lock then is on a file nobody else will open again. Try the new file.
            try:
                same = os.stat(self.path).st_ino == os.fstat(handle.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            handle.close()
        handle.seek(0)
        handle.truncate()
        command = ' '.join(sys.argv)
        handle.write(f'pid {os.getpid()} on {socket.gethostname()}, started '
                     f'{time.strftime("%Y-%m-%d %H:%M:%S")}: {command[:200]}')
        handle.flush()
        _HELD[osp.realpath(self.path)] = handle

    def release(self) -> None:
        """Give the folder back (and remove the lock file)."""
        handle = _HELD.pop(osp.realpath(self.path), None)
        if handle is None:
            return
        try:
            os.remove(self.path)  # while still locked: see acquire
        except FileNotFoundError:
            pass
        handle.close()
