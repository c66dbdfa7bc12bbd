import subprocess
import sys

import pytest

import mmdat
from mmdat.models import DAT
from tests.conftest import REPO_ROOT


def test_dat_is_registered_in_mmdet_and_mmseg():
    from mmdet.registry import MODELS as MMDET_MODELS
    from mmseg.registry import MODELS as MMSEG_MODELS
    assert MMDET_MODELS.get('DAT') is DAT
    assert MMSEG_MODELS.get('DAT') is DAT
    assert mmdat.DAT is DAT
    # `_scope_`: a runner built by an earlier test may have left another default scope behind.
    model = MMDET_MODELS.build(dict(type='DAT', _scope_='mmdet', arch='tiny', out_indices=(3, )))
    assert isinstance(model, DAT) and model.out_indices == [3]


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-c', code], cwd=REPO_ROOT, capture_output=True, text=True,
                          env={'PYTHONPATH': str(REPO_ROOT), 'PATH': '/usr/bin:/bin'})


@pytest.mark.slow
def test_import_without_mmdet_and_mmseg():
    """mmdat's model code needs only torch and mmengine (e.g. on a GPU box without mmcv)."""
    result = run_python(
        'import sys\n'
        'class NotInstalled:\n'
        '    def find_spec(self, name, path=None, target=None):\n'
        '        if name.partition(".")[0] in ("mmdet", "mmseg", "mmcv", "einops"):\n'
        '            raise ModuleNotFoundError(f"No module named {name!r}", name=name)\n'
        'sys.meta_path.insert(0, NotInstalled())\n'
        'import torch, mmdat\n'
        'outs = mmdat.DAT("tiny").eval()(torch.randn(1, 3, 64, 64))\n'
        'print(len(outs), "mmdet" in sys.modules and sys.modules["mmdet"] is not None)\n')
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ['4', 'False']


@pytest.mark.slow
def test_a_broken_install_is_not_hidden():
    result = run_python('import sys\nsys.modules["mmdet.registry"] = None\nimport mmdat\n')
    assert result.returncode != 0
    assert "ModuleNotFoundError: import of mmdet.registry halted" in result.stderr
