"""tools/analysis_tools/gpu_check.sh: its CPU dry run writes the whole report; bad arguments."""
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow  # every test here starts other processes

SCRIPT = REPO_ROOT / 'tools' / 'analysis_tools' / 'gpu_check.sh'


def run(*args, cwd=None):
    env = dict(os.environ, PYTHON=sys.executable)
    return subprocess.run(['bash', str(SCRIPT), *args], capture_output=True, text=True, env=env, cwd=cwd)


def test_dry_run_writes_one_report_with_every_step(tmp_path):
    # run from another folder, with a relative --out: the report lands where it was asked for
    result = run('--dry-run', '--out', 'report.md', cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    report = (tmp_path / 'report.md').read_text()
    assert report.startswith('# GPU check (dry run on CPU at tiny sizes')
    for line in ('- tests: ok', '- backbone: ok', '- op: ok'):
        assert line in report
    assert 'test_tiles_match_the_reference_on_gpu SKIPPED' in report  # the GPU-only tests, collected
    assert 'test_real_size_on_gpu' in report
    assert '| tiny++ | 64x64 | train | sdpa |' in report
    # 'fused' in bfloat16 on CPU: the Triton kernels in Triton's interpreter (DAT++ too)
    assert '| tiny | 64x64 | infer | fused |' in report and '| tiny++ | 64x64 | train | fused |' in report
    assert '| fused | skipped' not in report
    assert '| tiny | 64x64 | 16 | 16 | fwd+bwd | sdpa-no-bias |' in report
    assert f'Report written to {tmp_path / "report.md"}' in result.stdout


@pytest.mark.parametrize('args,message', [
    (['--out', '/nonexistent/folder/report.md'], 'does not exist'),
    (['--wheels', '/nonexistent/wheels'], 'is not a folder'),
    (['--fast'], 'unknown argument --fast'),
])
def test_bad_arguments(args, message):
    result = run(*args)
    assert result.returncode == 2 and message in result.stderr


@pytest.mark.skipif(__import__('torch').cuda.is_available(), reason='checks the refusal without a GPU')
def test_without_a_gpu_it_asks_for_a_dry_run(tmp_path):
    result = run('--out', str(tmp_path / 'r.md'))
    assert result.returncode == 2 and 'use --dry-run' in result.stderr
    assert not (tmp_path / 'r.md').exists()
