"""AtomicCheckpointHook: a crash during a save never leaves the run without a complete checkpoint,
keeps ``max_keep_ckpts`` whenever it is killed, and shares no work dir with another run."""
import builtins
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.registry import HOOKS

import mmdat  # noqa: F401  (registers the hook and the safe loader)
from mmdat.datasets import make_synthetic_dataset
from mmdat.engine import (AtomicCheckpointHook, AtomicLocalBackend, WorkDirInUseError,
                          find_resume_checkpoint)
from mmdat.engine import work_dir as work_dir_module
from mmdat.engine.hooks import atomic_checkpoint_hook
from mmdat.utils import error_line, use_atomic_checkpoints
from tests.conftest import REPO_ROOT, TEST_CONFIGS, run_script

sys.path.insert(0, str(Path(__file__).parent))
from test_resume import make_runner  # noqa: E402  (the tiny mmengine runner of those tests)

CONFIG = TEST_CONFIGS / 'retinanet_dat_shapes_tiny.py'


def atomic_runner(work_dir, max_epochs, custom_hooks=(), load_from=None, **hook):
    runner = make_runner(work_dir, max_epochs, resume=load_from is not None,
                         custom_hooks=custom_hooks, load_from=load_from)
    runner.register_hook(dict(type='AtomicCheckpointHook', interval=1, **hook), priority='VERY_LOW')
    runner._hooks = [h for h in runner._hooks if type(h).__name__ != 'CheckpointHook']
    return runner


@pytest.mark.parametrize('scope', ['mmdet', 'mmseg'])
def test_registered_for_both_libraries(scope):
    registry = __import__(f'{scope}.registry', fromlist=['HOOKS']).HOOKS
    with registry.switch_scope_and_registry(scope) as scoped:
        assert scoped.get('AtomicCheckpointHook') is AtomicCheckpointHook
    assert HOOKS.get('AtomicCheckpointHook') is AtomicCheckpointHook


def test_train_tool_uses_it_for_plain_checkpoint_hooks():
    cfg = Config(dict(default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=2))))
    use_atomic_checkpoints(cfg)
    assert cfg.default_hooks.checkpoint == dict(type='AtomicCheckpointHook', interval=2)
    custom = Config(dict(default_hooks=dict(checkpoint=dict(type='MyCheckpointHook'))))
    use_atomic_checkpoints(custom)
    assert custom.default_hooks.checkpoint.type == 'MyCheckpointHook'


def test_keeps_max_keep_ckpts_and_points_at_the_newest(tmp_path):
    runner = atomic_runner(tmp_path, max_epochs=3, max_keep_ckpts=2)
    runner.train()
    assert sorted(p.name for p in tmp_path.glob('*.pth')) == ['epoch_2.pth', 'epoch_3.pth']
    assert (tmp_path / 'last_checkpoint').read_text() == str(tmp_path / 'epoch_3.pth')
    saved = torch.load(tmp_path / 'epoch_3.pth', weights_only=True)
    assert saved['message_hub']['runtime_info']['keep_ckpt_ids'] == [2, 3]
    assert not list(tmp_path.glob('.*'))  # no temporary file left


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    real_replace = os.replace

    def fail_on_epoch_2(source, target):
        if str(target).endswith('epoch_2.pth'):
            raise OSError('disk full')
        real_replace(source, target)

    monkeypatch.setattr(atomic_checkpoint_hook.os, 'replace', fail_on_epoch_2)
    with pytest.raises(OSError, match='disk full'):
        atomic_runner(tmp_path, max_epochs=2, max_keep_ckpts=1).train()
    assert [p.name for p in tmp_path.glob('*.pth')] == ['epoch_1.pth']
    assert (tmp_path / 'last_checkpoint').read_text() == str(tmp_path / 'epoch_1.pth')
    assert not list(tmp_path.glob('.*.mmdat-tmp'))


@pytest.mark.parametrize('errno_, message', [(28, 'No space left on device'),
                                             (30, 'Read-only file system')])
def test_a_full_disk_or_read_only_folder_names_the_checkpoint(tmp_path, monkeypatch, errno_,
                                                              message):
    """The tools print it as one line (mmdat.utils.error_line), naming the file being saved."""

    def fail(file_descriptor):
        raise OSError(errno_, os.strerror(errno_))

    monkeypatch.setattr(atomic_checkpoint_hook.os, 'fsync', fail)
    with pytest.raises(OSError) as raised:
        atomic_runner(tmp_path, max_epochs=1).train()
    assert raised.value.filename == str(tmp_path / 'epoch_1.pth')
    line = error_line(raised.value)
    assert line.startswith(f'{message}: {tmp_path / "epoch_1.pth"} (') and '\n' not in line
    assert not list(tmp_path.glob('.*.mmdat-tmp')) and not list(tmp_path.glob('*.pth'))


class Killed(BaseException):
    """The process dies here (nothing after it runs: no clean-up, no except clause)."""


class ArmAtEpoch(Hook):
    """Arms the file-system spy when the given epoch (0-based) starts."""

    def __init__(self, spy, epoch):
        self.spy, self.epoch = spy, epoch

    def before_train_epoch(self, runner):
        if runner.epoch == self.epoch:
            self.spy.armed = True


class FileSystemSpy:
    """Counts the file-system steps of the hook's saves once armed; dies at step ``kill_at``."""
    STEPS = ('replace', 'remove', 'fsync')

    def __init__(self, monkeypatch, kill_at=None):
        self.armed, self.kill_at, self.steps = False, kill_at, []
        for name in self.STEPS:
            monkeypatch.setattr(os, name, self._wrap(name, getattr(os, name)))
        monkeypatch.setattr(shutil, 'rmtree', self._wrap('rmtree', shutil.rmtree))
        monkeypatch.setattr(atomic_checkpoint_hook, 'open',
                            self._wrap('open', builtins.open), raising=False)

    def _wrap(self, name, function):

        def step(*args, **kwargs):
            if self.armed:
                if self.kill_at is not None and len(self.steps) >= self.kill_at:
                    raise Killed(f'killed before {name}{args}')
                self.steps.append((name, args))
            return function(*args, **kwargs)

        return step


def test_max_keep_ckpts_holds_after_a_kill_at_any_step_of_a_save(tmp_path, monkeypatch):
    """Killed at each file-system step of saving epoch_2.pth (limit 1), the run resumed as
    tools/train.py --resume does ends with epoch_3.pth only."""
    with monkeypatch.context() as patch:  # the steps of one save, counted
        spy = FileSystemSpy(patch)
        atomic_runner(tmp_path / 'count', 2, [ArmAtEpoch(spy, 1)], max_keep_ckpts=1).train()
    names = [name for name, _ in spy.steps]
    # the checkpoint and the pointer each written, synced and renamed; then epoch_1.pth removed
    assert names.count('replace') == 2 and names[-1] == 'remove', names
    for kill_at in range(len(spy.steps) + 1):
        work = tmp_path / f'kill_{kill_at}'
        with monkeypatch.context() as patch:
            spy = FileSystemSpy(patch, kill_at)
            with pytest.raises(Killed):
                atomic_runner(work, 2, [ArmAtEpoch(spy, 1)], max_keep_ckpts=1).train()
                raise Killed('after the save')  # kill_at == number of steps: the save completed
        resume_from = find_resume_checkpoint(str(work))
        assert resume_from in (str(work / 'epoch_1.pth'), str(work / 'epoch_2.pth'))
        atomic_runner(work, 3, load_from=resume_from, max_keep_ckpts=1).train()
        assert sorted(p.name for p in work.glob('*.pth')) == ['epoch_3.pth'], kill_at
        assert (work / 'last_checkpoint').read_text() == str(work / 'epoch_3.pth')


def test_no_checkpoint_has_its_final_name_while_it_is_written(tmp_path, monkeypatch):
    """Whatever writes a checkpoint, the folder never shows epoch_N.pth before it is complete."""
    seen = []
    real_open = builtins.open

    def open_and_look(file, mode='r', *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        step = re.search(r'epoch_(\d+)\.pth', os.path.basename(str(file)))
        if 'w' in mode and step:
            seen.append((int(step[1]), sorted(os.listdir(os.path.dirname(str(file))))))
        return handle

    monkeypatch.setattr(builtins, 'open', open_and_look)
    atomic_runner(tmp_path, max_epochs=2, max_keep_ckpts=2).train()
    assert [step for step, _ in seen] == [1, 2]
    for step, listing in seen:
        assert f'epoch_{step}.pth' not in listing, listing
    assert sorted(p.name for p in tmp_path.glob('*.pth')) == ['epoch_1.pth', 'epoch_2.pth']


@pytest.mark.slow
def test_training_killed_during_a_save_resumes(tmp_path):
    """kill -9 in the middle of writing epoch_2.pth (the last epoch), with max_keep_ckpts=1 as in
    the demo configs: epoch_1.pth survives, and --resume (here without last_checkpoint) trains
    epoch 2 again."""
    shapes = tmp_path / 'shapes'
    make_synthetic_dataset(str(shapes), {'train': 4, 'val': 2}, seed=0)  # 2 steps an epoch
    work = tmp_path / 'work'
    # each run is a process of its own (a child of the preloaded process: see ``run_script``)
    env = {'SHAPES_ROOT': f'{shapes}/', 'OMP_NUM_THREADS': '1'}
    options = ['--work-dir', str(work), '--cfg-options', 'default_hooks.checkpoint.max_keep_ckpts=1']
    killed = run_script(Path(__file__).parent / 'train_killed_during_save.py', '2', CONFIG, *options,
                        cwd=REPO_ROOT, env=env, timeout=300)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert 'Saving checkpoint at 2 epochs' in killed.stdout + killed.stderr
    assert sorted(p.name for p in work.glob('*.pth')) == ['epoch_1.pth']
    assert (work / 'last_checkpoint').read_text() == str(work / 'epoch_1.pth')
    assert torch.load(work / 'epoch_1.pth', weights_only=True)['meta']['epoch'] == 1

    (work / 'last_checkpoint').unlink()
    resumed = run_script(REPO_ROOT / 'tools' / 'train.py', CONFIG, '--resume', *options, cwd=REPO_ROOT, env=env,
                         timeout=300)
    log = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, log[-3000:]
    assert 'resumed epoch: 1, iter: 2' in log
    assert sorted(p.name for p in work.glob('*.pth')) == ['epoch_2.pth']  # the config's last epoch
    meta = torch.load(work / 'epoch_2.pth', weights_only=True)['meta']
    assert (meta['epoch'], meta['iter']) == (2, 4)
    assert not list(work.glob('.*'))  # the killed run's temporary file was cleaned up


def test_backend_holds_removals_until_the_save_completes(tmp_path):
    """What the hook wraps CheckpointHook's best-checkpoint save in (it removes the old best first)."""
    backend = AtomicLocalBackend()
    (tmp_path / 'best_1.pth').write_bytes(b'old')
    with pytest.raises(OSError):
        with backend.removals_held():
            backend.remove(tmp_path / 'best_1.pth')
            raise OSError('the new best could not be written')
    assert (tmp_path / 'best_1.pth').exists()  # a failed save removes nothing
    with backend.removals_held():
        backend.remove(tmp_path / 'best_1.pth')
        backend.put(b'new', tmp_path / 'best_2.pth')
        assert (tmp_path / 'best_1.pth').exists()
    assert not (tmp_path / 'best_1.pth').exists() and (tmp_path / 'best_2.pth').read_bytes() == b'new'
