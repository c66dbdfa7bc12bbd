"""``mim search mmdat`` and ``mim train mmdat`` on a pip-installed (non-editable) mmdat.

Needs openmim, which is not in the requirement files: its dependency openxlab pins
``setuptools~=60.2``, which conflicts with torch 2.13 (``setuptools>=77.0.3``). docs/install.md
(OpenMMLab tools) says how to install it without that pin.
"""
import os
import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO_ROOT

pytest.importorskip('mim', reason='openmim is not installed (docs/install.md: "OpenMMLab tools: mim")')

pytestmark = pytest.mark.slow  # every test here starts other processes

MIM = [sys.executable, '-c', 'import sys; from mim.cli import cli; sys.argv[0] = "mim"; cli()']


@pytest.fixture(scope='module')
def installed(built, pip_env, tmp_path_factory):
    """The wheel installed into a folder of its own, and an environment that imports mmdat (and
    finds its distribution) there first."""
    site = tmp_path_factory.mktemp('site')
    subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '--no-deps', '--target', str(site), str(built[1])],
                   env=pip_env, check=True, capture_output=True)
    env = dict(os.environ, PYTHONPATH=str(site))
    return site, env


def test_mim_search_lists_every_model(installed, tmp_path):
    _, env = installed
    result = subprocess.run(MIM + ['search', 'mmdat'], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    listed = {line.split(':', 1)[1].strip() for line in result.stdout.splitlines() if line.startswith('config id:')}
    index = yaml.safe_load((REPO_ROOT / 'model-index.yml').read_text())
    expected = {m['Name'] for path in index['Import'] for m in yaml.safe_load((REPO_ROOT / path).read_text())['Models']}
    assert listed == expected
    assert len(expected) == len(list((REPO_ROOT / 'configs').glob('*.py')))


def test_mim_train_finds_config_and_tool_in_the_package(installed, tmp_path):
    """``mim train mmdat <config name>`` runs the packaged tools/train.py on the packaged demo
    config (one iteration on generated data, from a folder that is not a checkout)."""
    site, env = installed
    mim_dir = site / 'mmdat' / '.mim'
    subprocess.run([sys.executable, str(mim_dir / 'tools/dataset_converters/make_shapes.py'), 'data/shapes',
                    '--train', '8', '--val', '2', '--size', '64', '96'], cwd=tmp_path, env=env, check=True,
                   capture_output=True)
    result = subprocess.run(MIM + ['train', 'mmdat', 'retinanet_dat_demo_shapes.py', '--work-dir', 'work',
                                   '--cfg-options', 'train_cfg.max_epochs=1', 'train_cfg.val_interval=2',
                                   'default_hooks.checkpoint.interval=1'],
                            cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert f'{mim_dir}/tools/train.py {mim_dir}/configs/demo/retinanet_dat_demo_shapes.py' in result.stdout
    assert (tmp_path / 'work' / 'epoch_1.pth').is_file()
