import sys
import types

import pytest
import torch

from mmdat.models import DAT
from mmdat.models.utils import dat_converter, is_official_dat, load_checkpoint_file
from mmdat.models.utils.checkpoint import OmittedObject
from tests.conftest import REPO_ROOT, official_features, official_input, official_state_dict, run_script


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


# the small and base models take seconds each: in the slow tier
@pytest.mark.parametrize('arch', ['tiny', pytest.param('small', marks=pytest.mark.slow),
                                  pytest.param('base', marks=pytest.mark.slow)])
def test_converted_official_weights_match_the_official_model(arch):
    state_dict = official_state_dict(1, arch)
    assert is_official_dat(state_dict)
    converted = dat_converter(state_dict)
    model = DAT(arch, drop_path_rate=0.0).eval()
    missing, unexpected = model.load_state_dict(converted, strict=False)
    assert sorted(missing) == [f'norm{i}.{p}' for i in range(3) for p in ('bias', 'weight')]
    assert unexpected == []
    with torch.no_grad():
        features = model(official_input(1))[-1]
    expected = official_features(1, arch)
    assert relative_error(features, expected) <= 1e-4


def test_converter_drops_the_head_and_recomputed_buffers():
    state_dict = official_state_dict(1, 'tiny')
    state_dict['stages.0.attns.1.attn_mask'] = torch.zeros(64, 49, 49)
    state_dict['stages.0.attns.0.relative_position_index'] = torch.zeros(49, 49, dtype=torch.long)
    converted = dat_converter(state_dict)
    assert not any(k.startswith('cls_head') or 'attn_mask' in k or 'index' in k for k in converted)
    assert converted['stages.2.blocks.1.attn.proj_q.weight'].shape == (384, 384)  # 1x1 conv -> linear
    assert converted['stages.2.blocks.1.attn.offset_net.proj.weight'].shape == (2, 128)
    assert torch.equal(converted['norm3.weight'], state_dict['cls_norm.norm.weight'])
    assert not is_official_dat(converted)


class CfgNode(dict):
    """Stands for the yacs config the official training script pickles into its checkpoints."""


CfgNode.__module__ = 'yacs.config'  # pickled under yacs' name, as the official files are


def save_official_file(path, arch='tiny'):
    yacs = types.ModuleType('yacs')
    yacs.config = types.ModuleType('yacs.config')
    yacs.config.CfgNode = CfgNode
    saved_modules = {name: sys.modules.get(name) for name in ('yacs', 'yacs.config')}
    sys.modules.update({'yacs': yacs, 'yacs.config': yacs.config})  # pickle checks the name
    try:
        torch.save({'model': official_state_dict(1, arch), 'config': CfgNode(MODEL=CfgNode(NAME='dat')),
                    'max_accuracy': 82.0, 'epoch': 299}, path)
    finally:
        for name, module in saved_modules.items():
            if module is None:
                sys.modules.pop(name)
            else:
                sys.modules[name] = module


def test_official_file_is_read_without_its_config(tmp_path):
    save_official_file(tmp_path / 'official.pth')
    assert 'yacs' not in sys.modules
    checkpoint = load_checkpoint_file(str(tmp_path / 'official.pth'))
    assert isinstance(checkpoint['config'], OmittedObject) and checkpoint['epoch'] == 299
    assert torch.equal(checkpoint['model']['cls_norm.norm.weight'],
                       official_state_dict(1, 'tiny')['cls_norm.norm.weight'])


def test_init_cfg_loads_an_official_file_directly(tmp_path):
    save_official_file(tmp_path / 'official.pth')
    model = DAT('tiny', drop_path_rate=0.0, out_indices=(3, ),
                init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'official.pth')))
    model.init_weights()
    with torch.no_grad():
        features = model.eval()(official_input(1))[0]
    assert relative_error(features, official_features(1, 'tiny')) <= 1e-4


def test_missing_checkpoint_file():
    with pytest.raises(FileNotFoundError, match='no_such.pth'):
        load_checkpoint_file('no_such.pth')


def test_a_file_that_is_no_checkpoint(tmp_path):
    path = tmp_path / 'notes.pth'
    path.write_text('not a checkpoint')
    with pytest.raises(ValueError, match='notes.pth is not a readable checkpoint'):
        load_checkpoint_file(str(path))


def run_converter(*args):
    return run_script('tools/model_converters/dat2mmdat.py', *args, cwd=REPO_ROOT)


@pytest.mark.slow
def test_converter_cli(tmp_path):
    save_official_file(tmp_path / 'official.pth')
    result = run_converter(tmp_path / 'official.pth', tmp_path / 'mmdat.pth')
    assert result.returncode == 0, result.stderr
    converted = torch.load(tmp_path / 'mmdat.pth')['state_dict']
    assert converted.keys() == dat_converter(official_state_dict(1, 'tiny')).keys()

    torch.save({'state_dict': converted}, tmp_path / 'not_official.pth')
    result = run_converter(tmp_path / 'not_official.pth', tmp_path / 'again.pth')
    assert result.returncode != 0 and 'does not look like an official DAT checkpoint' in result.stderr

    result = run_converter(tmp_path / 'missing.pth', tmp_path / 'again.pth')
    assert result.returncode == 1 and 'Traceback' not in result.stderr
    assert f'Checkpoint file not found: {tmp_path / "missing.pth"}' in result.stderr

    (tmp_path / 'notes.txt').write_text('not a checkpoint')
    result = run_converter(tmp_path / 'notes.txt', tmp_path / 'again.pth')
    assert result.returncode == 1 and 'Traceback' not in result.stderr
    assert 'notes.txt is not a readable checkpoint' in result.stderr
