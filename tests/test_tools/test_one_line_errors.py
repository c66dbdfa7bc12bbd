"""Every tool ends a user's mistake with one line and exit status 1, never a traceback.

The shared mechanism (mmdat.utils.one_line_errors) is tested in tests/test_utils; here each tool's
``main`` runs in this process, and once as a command (slow: one process per tool).
"""
import os
import re
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from tests.conftest import REPO_ROOT, TEST_CONFIGS, load_tool, run_script

TINY_DETECTOR = TEST_CONFIGS / 'retinanet_dat_shapes_tiny.py'


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp('inputs')
    cv2.imwrite(str(root / 'image.png'), np.zeros((40, 50, 3), np.uint8))
    (root / 'syntax_error.py').write_text('model = dict(type="DAT",\n')
    (root / 'missing_base.py').write_text("_base_ = ['./not_there.py']\n")
    torch.save({'state_dict': {'w': torch.zeros(1)}}, root / 'weights.pth')
    return root


def tool_commands(root, config):
    """Each tool's arguments with ``config`` as its config (files from ``root``)."""
    image, out = str(root / 'image.png'), str(root / 'out.png')
    return {
        'train.py': [config, '--work-dir', str(root / 'work')],
        'test.py': [config, str(root / 'weights.pth'), '--work-dir', str(root / 'work')],
        'analysis_tools/get_flops.py': [config],
        'deployment/pytorch2onnx.py': [config, str(root / 'out.onnx')],
        'demo.py': [image, config, '--out', out],
        'visualize_deformable.py': [image, '--config', config, '--out', out],
        'model_converters/dat_det_seg2mmdat.py': [str(root / 'weights.pth'), str(root / 'o.pth'),
                                                  '--config', config],
    }


def run_main(tool, args, monkeypatch):
    """The SystemExit message of the tool's main, run in this process."""
    module = load_tool(tool)
    monkeypatch.setattr(sys, 'argv', [tool, *args])  # the converters read sys.argv
    with pytest.raises(SystemExit) as stop:
        module.main() if 'model_converters' in tool else module.main(args)
    return str(stop.value.code)


TOOLS = list(tool_commands(Path('.'), 'x'))


@pytest.mark.parametrize('tool', TOOLS)
@pytest.mark.parametrize('config, expected', [
    ('syntax_error.py', r'Cannot read config .*syntax_error.py: SyntaxError: '),
    ('missing_base.py', r'Cannot read config .*missing_base.py: .*not_there.py'),
])
def test_a_config_it_cannot_read(files, tool, config, expected, monkeypatch):
    message = run_main(tool, tool_commands(files, str(files / config))[tool], monkeypatch)
    assert '\n' not in message
    assert re.search(expected, message), message


@pytest.mark.parametrize('tool', [t for t in TOOLS if 'get_flops' not in t and 'onnx' not in t])
def test_a_missing_config(files, tool, monkeypatch):
    """(get_flops and pytorch2onnx take an arch name or a config: their own message says so.)"""
    message = run_main(tool, tool_commands(files, str(files / 'absent.py'))[tool], monkeypatch)
    assert message == f'Config file not found: {files / "absent.py"}'


def test_train_resume_of_a_weights_only_file(files, monkeypatch):
    """Was mmengine's ``KeyError: 'meta'`` after the model and data were built."""
    message = run_main('train.py', [str(TINY_DETECTOR), '--resume', str(files / 'weights.pth'),
                                    '--work-dir', str(files / 'work')], monkeypatch)
    assert message.startswith(f'--resume: {files / "weights.pth"} holds weights only')
    assert '\n' not in message


@pytest.mark.slow
@pytest.mark.parametrize('tool', TOOLS)
def test_as_a_command(files, tool):
    result = run_script(REPO_ROOT / 'tools' / tool, *tool_commands(files, str(files / 'syntax_error.py'))[tool],
                        cwd=files)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert 'Traceback' not in result.stderr and len(lines) == 1, result.stderr[-2000:]
    assert 'syntax_error.py: SyntaxError' in lines[0]


@pytest.mark.slow  # trains an epoch
@pytest.mark.parametrize('number', [28, 30])  # ENOSPC, EROFS
def test_train_on_a_full_disk_or_read_only_folder(tmp_path, monkeypatch, number):
    """The first checkpoint cannot be written: one line naming it, as the tool prints it."""
    from mmdat.datasets import make_synthetic_dataset
    from mmdat.engine.hooks import atomic_checkpoint_hook
    make_synthetic_dataset(str(tmp_path / 'shapes'), {'train': 2, 'val': 1}, seed=0)
    monkeypatch.setenv('SHAPES_ROOT', f'{tmp_path / "shapes"}/')

    def fail(file_descriptor):
        raise OSError(number, os.strerror(number))

    monkeypatch.setattr(atomic_checkpoint_hook.os, 'fsync', fail)
    work = tmp_path / 'work'
    message = run_main('train.py', [str(TINY_DETECTOR), '--work-dir', str(work)], monkeypatch)
    assert message.startswith(f'{os.strerror(number)}: {work / "epoch_1.pth"} (')
    assert '\n' not in message
