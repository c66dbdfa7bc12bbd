"""The training tools end to end on generated data: train, resume, test, two processes."""
import os
import socket
import subprocess
import sys

import pytest
import torch

import mmdat  # noqa: F401  (weights_only allow-list for mmengine checkpoints)
from mmdat.datasets import make_synthetic_dataset
from tests.conftest import REPO_ROOT, TEST_CONFIGS, run_script

pytestmark = pytest.mark.slow  # every test here starts other processes

CONFIG = TEST_CONFIGS / 'retinanet_dat_shapes_tiny.py'


@pytest.fixture(scope='module')
def shapes_root(tmp_path_factory):
    root = tmp_path_factory.mktemp('shapes')
    make_synthetic_dataset(str(root), {'train': 8, 'val': 4}, seed=0)
    return root


def free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def checked(result):
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout + result.stderr


def run_tool(tool, *args, shapes_root):
    """A tool's command line (in a child of the preloaded process: see ``run_script``)."""
    return checked(run_script(REPO_ROOT / 'tools' / tool, *args, cwd=REPO_ROOT, timeout=300,
                              env={'SHAPES_ROOT': f'{shapes_root}/', 'OMP_NUM_THREADS': '1'}))


def test_train_kill_resume_and_test(shapes_root, tmp_path):
    work = tmp_path / 'work'
    run_tool('train.py', CONFIG, '--work-dir', work, shapes_root=shapes_root)
    first = torch.load(work / 'epoch_2.pth', weights_only=True)
    assert first['meta']['epoch'] == 2 and first['meta']['iter'] == 8

    # As if the run had been killed during epoch 2: only epoch 1 was saved.
    (work / 'epoch_2.pth').unlink()
    (work / 'last_checkpoint').write_text(str(work / 'epoch_1.pth'))
    log = run_tool('train.py', CONFIG, '--work-dir', work, '--resume', shapes_root=shapes_root)
    assert 'resumed epoch: 1, iter: 4' in log
    resumed = torch.load(work / 'epoch_2.pth', weights_only=True)
    assert resumed['meta']['iter'] == 8
    assert resumed['param_schedulers'] == first['param_schedulers']
    assert resumed['state_dict'].keys() == first['state_dict'].keys()

    log = run_tool('test.py', CONFIG, work / 'epoch_2.pth', '--amp', '--work-dir', tmp_path / 'test',
                   shapes_root=shapes_root)
    if not torch.cuda.is_available():
        assert 'No CUDA device: testing in float32.' in log
    # A model trained for 8 steps may predict nothing above the score threshold, so check that the
    # checkpoint was loaded and every test batch evaluated, not the mAP.
    assert f'Load checkpoint from {work / "epoch_2.pth"}' in log
    assert 'Epoch(test) [2/2]' in log and 'Evaluating bbox' in log


def test_dist_train_with_two_processes(shapes_root, tmp_path):
    work = tmp_path / 'dist'
    # two fresh processes (the launcher's), one thread each on the 2-core machine
    env = {**os.environ, 'PYTHONPATH': str(REPO_ROOT), 'SHAPES_ROOT': f'{shapes_root}/',
           'OMP_NUM_THREADS': '1', 'PORT': str(free_port()), 'PYTHON': sys.executable}
    log = checked(subprocess.run(['bash', 'tools/dist_train.sh', str(CONFIG), '2', '--work-dir', str(work),
                                  '--cfg-options', 'train_cfg.max_epochs=1'], cwd=REPO_ROOT, env=env,
                                 capture_output=True, text=True, timeout=300))
    assert 'Distributed launcher: pytorch' in log and 'Distributed training: True' in log
    checkpoint = torch.load(work / 'epoch_1.pth', weights_only=True)
    # 8 images, 2 per process and step, 2 processes: 2 iterations per epoch
    assert checkpoint['meta']['iter'] == 2
    assert any(k.startswith('backbone.stages.2.blocks.1.attn.offset_net') for k in checkpoint['state_dict'])
