"""The requirement files resolve without replacing the user's torch.

pip resolves ``requirements/{mminstall,runtime,tests}.txt`` offline (``--dry-run --no-index``)
against stub wheels that carry only metadata: a "torch 2.13.0" that requires what PyPI's standard
(CUDA) torch 2.13.0 requires of the packages these files also name (``triton==3.7.1`` on Linux,
``setuptools>=77.0.3``), an older torch 1.13.1 without Triton (what pip fell back to when
``tests.txt`` pinned triton 3.9.0), both Tritons, and one stub for every other requirement. The
other stubs have no dependencies: the real mmcv, mmengine, mmdet, mmseg, numpy, matplotlib,
ftfy, regex, pytest, pytest-timeout, pytest-xdist, onnx, onnxruntime and onnxscript do not depend on torch
or Triton.
"""
import base64
import hashlib
import json
import re
import subprocess
import sys
import zipfile

import pytest

from tests.conftest import REPO_ROOT

REQUIREMENT_FILES = ('requirements/mminstall.txt', 'requirements/runtime.txt', 'requirements/tests.txt')
STANDARD_TORCH = '2.13.0'
# Requires-Dist of PyPI's torch 2.13.0 (manylinux x86_64 wheel) that touch these files' packages.
STANDARD_TORCH_REQUIRES = ('triton==3.7.1; platform_system == "Linux" and python_version < "3.15"',
                           'setuptools>=77.0.3')
# One version per requirement name, chosen inside every range the files allow today.
STUBS = {
    'torch': {STANDARD_TORCH: STANDARD_TORCH_REQUIRES, '1.13.1': ()},
    'triton': {'3.7.1': (), '3.9.0': ()},
    'setuptools': {'80.9.0': ()},
    'mmcv': {'2.1.0': ()},
    'mmdet': {'3.3.0': ()},
    'mmsegmentation': {'1.2.2': ()},
    'mmengine': {'0.10.7': ()},
    'numpy': {'2.2.6': ()},
    'matplotlib': {'3.10.0': ()},
    'ftfy': {'6.3.1': ()},
    'regex': {'2024.11.6': ()},
    'pytest': {'8.3.4': ()},
    'pytest-timeout': {'2.4.0': ()},
    'pytest-xdist': {'3.8.0': ()},
    'onnx': {'1.23.2': ()},
    'onnxruntime': {'1.32.0': ()},
    'onnxscript': {'0.7.2': ()},
}

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith('linux'),
    reason="torch's Triton pin, the conflict checked here, applies on Linux only")


def requirement_names(path):
    """Project names of a requirements file's lines, following ``-r`` includes."""
    names = []
    for line in path.read_text().splitlines():
        line = line.split('#', 1)[0].strip()
        if line.startswith('-r '):
            names += requirement_names(path.parent / line[3:].strip())
        elif line:
            names.append(re.match(r'[A-Za-z0-9._-]+', line).group(0).lower())
    return names


def write_stub_wheel(folder, name, version, requires):
    """A wheel holding only ``.dist-info`` metadata."""
    file_name = name.replace('-', '_')  # wheel and .dist-info names have no '-' in the project name
    dist_info = f'{file_name}-{version}.dist-info'
    files = {
        f'{dist_info}/METADATA': ''.join([f'Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n']
                                         + [f'Requires-Dist: {req}\n' for req in requires]),
        f'{dist_info}/WHEEL': 'Wheel-Version: 1.0\nGenerator: mmdat-tests\nRoot-Is-Purelib: true\n'
                              'Tag: py3-none-any\n',
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b'=').decode()
        record.append(f'{path},sha256={digest},{len(text.encode())}')
    files[f'{dist_info}/RECORD'] = '\n'.join(record + [f'{dist_info}/RECORD,,']) + '\n'
    with zipfile.ZipFile(folder / f'{file_name}-{version}-py3-none-any.whl', 'w') as wheel:
        for path, text in files.items():
            wheel.writestr(path, text)


@pytest.fixture(scope='module')
def stub_index(tmp_path_factory):
    folder = tmp_path_factory.mktemp('stub_wheels')
    for name, versions in STUBS.items():
        for version, requires in versions.items():
            write_stub_wheel(folder, name, version, requires)
    return folder


class NoResolution(Exception):
    """pip found no set of versions that satisfies everything."""


def resolve(env, stub_index, tmp_path, requirement_dir, constraints=()):
    """pip's resolution of the three requirement files in ``requirement_dir``: ``{name: version}``
    it would install.

    Raises:
        NoResolution: pip reports conflicting requirements (its message is the exception's).
    """
    args = [sys.executable, '-m', 'pip', 'install', '--dry-run', '--ignore-installed', '--quiet',
            '--no-index', '--find-links', str(stub_index), '--report', str(tmp_path / 'report.json')]
    for name in REQUIREMENT_FILES:
        args += ['-r', str(requirement_dir / name)]
    if constraints:
        (tmp_path / 'constraints.txt').write_text('\n'.join(constraints) + '\n')
        args += ['-c', str(tmp_path / 'constraints.txt')]
    # env: no pip config files, no PIP_* variables (find-links, indexes, constraints of the
    # machine running the tests), only the options given here.
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    if result.returncode:
        assert 'ResolutionImpossible' in result.stderr, result.stderr  # any other pip failure
        raise NoResolution(result.stderr)
    report = json.loads((tmp_path / 'report.json').read_text())
    return {item['metadata']['name'].lower(): item['metadata']['version'] for item in report['install']}


def test_every_requirement_has_a_stub():
    names = set()
    for name in REQUIREMENT_FILES:
        names.update(requirement_names(REPO_ROOT / name))
    assert names <= set(STUBS), f'add stub wheels for {sorted(names - set(STUBS))}'


@pytest.mark.slow
def test_standard_torch_is_kept(pip_env, stub_index, tmp_path):
    """What tools/setup_env.sh does: the installed torch pinned as a constraint."""
    installed = resolve(pip_env, stub_index, tmp_path, REPO_ROOT, constraints=[f'torch=={STANDARD_TORCH}'])
    assert installed['torch'] == STANDARD_TORCH
    assert installed['triton'] == '3.7.1'  # the one torch pins, not a newer one


@pytest.mark.slow
def test_newest_torch_is_chosen_without_constraints(pip_env, stub_index, tmp_path):
    """Without the pin, pip must still be able to take the standard torch (no downgrade)."""
    installed = resolve(pip_env, stub_index, tmp_path, REPO_ROOT)
    assert installed['torch'] == STANDARD_TORCH
    assert installed['triton'] == '3.7.1'


@pytest.mark.slow
def test_old_torch_is_refused(pip_env, stub_index, tmp_path):
    """runtime.txt's torch floor keeps a torch without SDPA out, so the check above is not
    passing only because 2.13.0 is the newest stub."""
    with pytest.raises(NoResolution):
        resolve(pip_env, stub_index, tmp_path, REPO_ROOT, constraints=['torch==1.13.1'])


@pytest.mark.slow
def test_a_conflicting_triton_pin_is_caught(pip_env, stub_index, tmp_path):
    """The check fails for requirement files that pin a Triton other than torch's (as
    requirements/tests.txt did with triton==3.9.0)."""
    broken = tmp_path / 'broken'
    (broken / 'requirements').mkdir(parents=True)
    for name in REQUIREMENT_FILES:
        (broken / name).write_text((REPO_ROOT / name).read_text())
    tests_txt = broken / 'requirements/tests.txt'
    tests_txt.write_text(re.sub(r'^triton\b', 'triton==3.9.0', tests_txt.read_text(), flags=re.M))
    with pytest.raises(NoResolution):
        resolve(pip_env, stub_index, tmp_path, broken, constraints=[f'torch=={STANDARD_TORCH}'])
    with pytest.raises(NoResolution):  # torch 1.13.1 is below runtime.txt's floor
        resolve(pip_env, stub_index, tmp_path, broken)
