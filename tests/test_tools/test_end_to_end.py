"""The training tools end to end on generated data: train, resume, test, two processes."""
import os
import socket
import subprocess
import sys

import pytest
import torch

import mmdat  # noqa: F401  (weights_only allow-list for mmengine checkpoints)
from mmdat.datasets import make_synthetic_dataset
from tests.conftest import REPO_ROOT, TEST_CONFIGS

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


def run(command, shapes_root, cwd):
    env = {**os.environ, 'PYTHONPATH': str(REPO_ROOT), 'SHAPES_ROOT': f'{shapes_root}/',
           'OMP_NUM_THREADS': '1', 'PORT': str(free_port()), 'PYTHON': sys.executable}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout + result.stderr


def test_train_kill_resume_and_test(shapes_root, tmp_path):
    work = tmp_path / 'work'
    run([sys.executable, 'tools/train.py', str(CONFIG), '--work-dir', str(work)], shapes_root, REPO_ROOT)
    first = torch.load(work / 'epoch_2.pth', weights_only=True)
    assert first['meta']['epoch'] == 2 and first['meta']['iter'] == 8

    # As if the run had been killed during epoch 2: only epoch 1 was saved.
    (work / 'epoch_2.pth').unlink()
    (work / 'last_checkpoint').write_text(str(work / 'epoch_1.pth'))
    log = run([sys.executable, 'tools/train.py', str(CONFIG), '--work-dir', str(work), '--resume'],
              shapes_root, REPO_ROOT)
    assert 'resumed epoch: 1, iter: 4' in log
    resumed = torch.load(work / 'epoch_2.pth', weights_only=True)
    assert resumed['meta']['iter'] == 8
    assert resumed['param_schedulers'] == first['param_schedulers']
    assert resumed['state_dict'].keys() == first['state_dict'].keys()

    log = run([sys.executable, 'tools/test.py', str(CONFIG), str(work / 'epoch_2.pth'), '--amp',
               '--work-dir', str(tmp_path / 'test')], shapes_root, REPO_ROOT)
    if not torch.cuda.is_available():
        assert 'No CUDA device: testing in float32.' in log
    # A model trained for 8 steps may predict nothing above the score threshold, so check that the
    # checkpoint was loaded and every test batch evaluated, not the mAP.
    assert f'Load checkpoint from {work / "epoch_2.pth"}' in log
    assert 'Epoch(test) [2/2]' in log and 'Evaluating bbox' in log


def test_dist_train_with_two_processes(shapes_root, tmp_path):
    work = tmp_path / 'dist'
    log = run(['bash', 'tools/dist_train.sh', str(CONFIG), '2', '--work-dir', str(work),
               '--cfg-options', 'train_cfg.max_epochs=1'], shapes_root, REPO_ROOT)
    assert 'Distributed launcher: pytorch' in log and 'Distributed training: True' in log
    checkpoint = torch.load(work / 'epoch_1.pth', weights_only=True)
    # 8 images, 2 per process and step, 2 processes: 2 iterations per epoch
    assert checkpoint['meta']['iter'] == 2
    assert any(k.startswith('backbone.stages.2.blocks.1.attn.offset_net') for k in checkpoint['state_dict'])
