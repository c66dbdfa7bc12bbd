"""A work dir shared by two runs: the second stops with one line naming the first, and no run
removes a temporary file that a live process is writing."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmdat.engine import WorkDirInUseError, WorkDirLock
from mmdat.engine import work_dir as work_dir_module
from mmdat.engine.work_dir import process_start_time, temporary_name, writer_is_gone
from mmdat.utils import error_line

sys.path.insert(0, str(Path(__file__).parent))
from test_atomic_checkpoint_hook import atomic_runner  # noqa: E402

HOST = work_dir_module._HOST
# Takes the lock of a folder in another process (the module needs only the standard library)
# and holds it until its stdin closes.
HOLDER = f'''
import importlib.util, sys
spec = importlib.util.spec_from_file_location('work_dir', {work_dir_module.__file__!r})
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
module.WorkDirLock(sys.argv[1]).acquire()
print('locked', flush=True)
sys.stdin.read()
'''


@pytest.fixture
def dead_pid():
    process = subprocess.Popen([sys.executable, '-c', ''])
    process.wait()
    return process.pid


@pytest.fixture
def live_process():
    process = subprocess.Popen([sys.executable, '-c', 'import sys; sys.stdin.read()'],
                               stdin=subprocess.PIPE)
    yield process
    process.stdin.close()
    process.wait()


def test_temporary_names_name_their_writer(tmp_path, dead_pid, live_process):
    mine = temporary_name(str(tmp_path / 'epoch_1.pth'))
    assert Path(mine).name.startswith('.epoch_1.pth.') and mine.endswith('.mmdat-tmp')
    assert not writer_is_gone(mine)
    live = f'.epoch_1.pth.{live_process.pid}-{process_start_time(live_process.pid)}-{HOST}.mmdat-tmp'
    assert not writer_is_gone(live)
    assert writer_is_gone(f'.epoch_1.pth.{dead_pid}-123-{HOST}.mmdat-tmp')
    assert writer_is_gone(f'.epoch_1.pth.{dead_pid}.mmdat-tmp')  # named by an older mmdat
    # the pid of a live process, but another start time: the pid was reused, the writer is gone
    assert writer_is_gone(f'.epoch_1.pth.{live_process.pid}-1-{HOST}.mmdat-tmp')
    # another host's process cannot be checked from here: left alone
    assert not writer_is_gone(f'.epoch_1.pth.{dead_pid}-123-otherhost.mmdat-tmp')
    assert not writer_is_gone('.epoch_1.pth.mmdat-tmp')


def test_a_run_removes_only_temporary_files_whose_writer_is_gone(tmp_path, dead_pid,
                                                                 live_process):
    """Seen: starting a second run deleted the first run's temporary file mid-write."""
    start = process_start_time(live_process.pid)
    kept = [f'.epoch_3.pth.{live_process.pid}-{start}-{HOST}.mmdat-tmp',  # being written
            f'.epoch_3.pth.{dead_pid}-1-otherhost.mmdat-tmp']
    gone = [f'.epoch_1.pth.{dead_pid}-{start}-{HOST}.mmdat-tmp', f'.epoch_1.pth.{dead_pid}.mmdat-tmp']
    for name in kept + gone:
        (tmp_path / name).write_bytes(b'partial')
    atomic_runner(tmp_path, max_epochs=1).train()
    assert sorted(p.name for p in tmp_path.glob('.*.mmdat-tmp')) == sorted(kept)


def test_a_second_run_in_a_work_dir_stops_naming_the_first(tmp_path):
    holder = subprocess.Popen([sys.executable, '-c', HOLDER, str(tmp_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'locked'
        with pytest.raises(WorkDirInUseError) as raised:
            atomic_runner(tmp_path, max_epochs=1).train()
        line = error_line(raised.value)  # what the tools print
        assert line.startswith(f'{tmp_path} is in use by another training run (pid {holder.pid} '
                               f'on ') and '\n' not in line
        assert not list(tmp_path.glob('*.pth'))
    finally:
        holder.stdin.close()
        holder.wait()
    # the first run has ended (a killed one too: the lock ends with its process)
    atomic_runner(tmp_path, max_epochs=1).train()
    assert [p.name for p in tmp_path.glob('*.pth')] == ['epoch_1.pth']
    assert not (tmp_path / work_dir_module.LOCK_NAME).exists()  # released at the end of the run


def test_the_checkpoint_folder_is_held_too(tmp_path):
    """With the hook's out_dir, checkpoints go to out_dir/<work dir name>: that folder is held."""
    out_dir = tmp_path / 'out'
    lock = WorkDirLock(str(out_dir / 'run'))
    holder = subprocess.Popen([sys.executable, '-c', HOLDER, lock.folder], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'locked'
        with pytest.raises(WorkDirInUseError, match=f'^{out_dir / "run"} is in use'):
            atomic_runner(tmp_path / 'run', max_epochs=1, out_dir=str(out_dir)).train()
    finally:
        holder.stdin.close()
        holder.wait()


def test_a_later_run_in_the_same_process_takes_the_lock_over(tmp_path):
    """A run that raised keeps its lock until the process ends; the next run in that process
    (a notebook, a test) is not stopped by it."""
    first = WorkDirLock(str(tmp_path))
    first.acquire()
    assert first.held and os.path.isfile(first.path)
    atomic_runner(tmp_path, max_epochs=1).train()
    assert not first.held
