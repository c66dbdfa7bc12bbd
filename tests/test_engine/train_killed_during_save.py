"""tools/train.py, killed (SIGKILL) halfway through writing its N-th checkpoint file.

Usage: python tests/test_engine/train_killed_during_save.py N [tools/train.py arguments]

Every file opened for binary writing whose name contains ``.pth`` counts, whatever writes it
(mmengine's file backend or mmdat's hook): the N-th one gets half of its first write, then the
process kills itself, as ``kill -9`` would at that moment. Not a test module: the crash tests run it.
"""
import builtins
import os
import os.path as osp
import runpy
import signal
import sys

REPO_ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


class _KilledHalfwayFile:

    def __init__(self, file):
        self._file = file

    def write(self, data):
        self._file.write(data[:len(data) // 2])
        self._file.flush()
        os.fsync(self._file.fileno())
        os.kill(os.getpid(), signal.SIGKILL)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self._file.close()

    def __getattr__(self, name):
        return getattr(self._file, name)


def main():
    kill_at = int(sys.argv.pop(1))
    real_open = builtins.open
    opened = 0

    def open_and_count(file, mode='r', *args, **kwargs):
        nonlocal opened
        handle = real_open(file, mode, *args, **kwargs)
        if 'w' in mode and 'b' in mode and '.pth' in osp.basename(str(file)):
            opened += 1
            if opened == kill_at:
                return _KilledHalfwayFile(handle)
        return handle

    builtins.open = open_and_count
    train = osp.join(REPO_ROOT, 'tools', 'train.py')
    sys.argv[0] = train
    runpy.run_path(train, run_name='__main__')


if __name__ == '__main__':
    main()
