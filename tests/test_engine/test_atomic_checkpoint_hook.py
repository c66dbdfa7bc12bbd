"""AtomicCheckpointHook: a crash during a save never leaves the run without a complete checkpoint."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import HOOKS

import mmdat  # noqa: F401  (registers the hook and the safe loader)
from mmdat.datasets import make_synthetic_dataset
from mmdat.engine import AtomicCheckpointHook, AtomicLocalBackend
from mmdat.engine.hooks import atomic_checkpoint_hook
from mmdat.utils import use_atomic_checkpoints
from tests.conftest import REPO_ROOT, TEST_CONFIGS

sys.path.insert(0, str(Path(__file__).parent))
from test_resume import make_runner  # noqa: E402  (the tiny mmengine runner of those tests)

CONFIG = TEST_CONFIGS / 'retinanet_dat_shapes_tiny.py'


def atomic_runner(work_dir, max_epochs, **hook):
    runner = make_runner(work_dir, max_epochs)
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
    assert not list(tmp_path.glob('.*'))


@pytest.mark.slow
def test_training_killed_during_a_save_resumes(tmp_path):
    """kill -9 in the middle of writing epoch_2.pth (the last epoch), with max_keep_ckpts=1 as in
    the demo configs: epoch_1.pth survives, and --resume (here without last_checkpoint) trains
    epoch 2 again."""
    shapes = tmp_path / 'shapes'
    make_synthetic_dataset(str(shapes), {'train': 4, 'val': 2}, seed=0)  # 2 steps an epoch
    work = tmp_path / 'work'
    env = {**os.environ, 'PYTHONPATH': str(REPO_ROOT), 'SHAPES_ROOT': f'{shapes}/', 'OMP_NUM_THREADS': '1'}
    options = ['--work-dir', str(work), '--cfg-options', 'default_hooks.checkpoint.max_keep_ckpts=1']
    killed = subprocess.run([sys.executable, str(Path(__file__).parent / 'train_killed_during_save.py'),
                             '2', str(CONFIG), *options], env=env, capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert 'Saving checkpoint at 2 epochs' in killed.stdout + killed.stderr
    assert sorted(p.name for p in work.glob('*.pth')) == ['epoch_1.pth']
    assert (work / 'last_checkpoint').read_text() == str(work / 'epoch_1.pth')
    assert torch.load(work / 'epoch_1.pth', weights_only=True)['meta']['epoch'] == 1

    (work / 'last_checkpoint').unlink()
    resumed = subprocess.run([sys.executable, str(REPO_ROOT / 'tools' / 'train.py'), str(CONFIG),
                              '--resume', *options], env=env, capture_output=True, text=True,
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
