"""Fixtures for the packaging tests: a copy of the checkout and the sdist and wheel built from it."""
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

# What a checkout holds besides the project's files (environments, build and run outputs).
NOT_SOURCE = ('.git', '.venv', 'build', 'dist', 'work_dirs', 'data', '*.egg-info', '.mim', '__pycache__',
              '.pytest_cache')


def copy_checkout(dst):
    shutil.copytree(REPO_ROOT, dst, ignore=shutil.ignore_patterns(*NOT_SOURCE), symlinks=True)


def isolated_pip_env():
    """The environment for a pip that must use nothing but the local files given to it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith('PIP_')}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK='1', PIP_NO_INDEX='1')
    return env


@pytest.fixture(scope='session')
def pip_env():
    """Environment variables for a pip that uses no index, config file or PIP_* setting."""
    return isolated_pip_env()


@pytest.fixture
def checkout_copy(tmp_path):
    """A copy of the checkout's project files in a temporary folder."""
    copy_checkout(tmp_path / 'src')
    return tmp_path / 'src'


@pytest.fixture(scope='session')
def built(tmp_path_factory):
    """An sdist made from a copy of the checkout, and the wheel pip builds from that sdist (so the
    wheel has only what the sdist carries): ``(sdist, wheel)`` paths."""
    tmp = tmp_path_factory.mktemp('build')
    copy_checkout(tmp / 'src')
    subprocess.run([sys.executable, 'setup.py', '-q', 'sdist', '-d', str(tmp / 'dist')], cwd=tmp / 'src',
                   check=True, capture_output=True)
    sdist, = (tmp / 'dist').glob('mmdat-*.tar.gz')
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '-q', '--no-deps', '--no-build-isolation', '-w',
                    str(tmp / 'wheels'), str(sdist)], env=isolated_pip_env(), check=True, capture_output=True)
    wheel, = (tmp / 'wheels').glob('mmdat-*.whl')
    return sdist, wheel
