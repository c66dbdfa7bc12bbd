"""mmdat's one checkpoint reader: no code from a file runs, broken files give one line, and
weights that do not fit are named or refused."""
import logging

import pytest
import torch
import torch.nn as nn
from mmengine.runner.checkpoint import CheckpointLoader, _load_checkpoint

from mmdat.models import DAT
from mmdat.models.utils import pretrained as pretrained_module
from mmdat.models.utils import (CheckpointError, check_weights_fit, load_checkpoint_file,
                                trust_checkpoint)

ARCH = dict(embed_dims=8, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4), offset_groups=(0, 0, 1, 2))


def assert_one_line_error(error, path):
    message = str(error.value)
    assert '\n' not in message and str(path) in message


@pytest.mark.parametrize('kind', ['raw_pickle', 'legacy', 'zip'])
def test_hostile_files_run_no_code(hostile_checkpoints, kind):
    hostile, _, marker = hostile_checkpoints
    path = hostile[kind]
    with pytest.raises(CheckpointError, match='refused to load posix.system') as error:
        load_checkpoint_file(str(path))
    assert_one_line_error(error, path)
    # the same file through mmengine (runner load_from/resume, inferencers) and DAT's init_cfg
    with pytest.raises(CheckpointError):
        _load_checkpoint(str(path))
    with pytest.raises(CheckpointError):
        DAT(ARCH, init_cfg=dict(type='Pretrained', checkpoint=str(path))).init_weights()
    assert not marker.exists()


@pytest.mark.parametrize('kind, reason', [
    ('empty', 'the file is empty'),
    ('text', 'not a readable checkpoint'),
    ('truncated_zip', 'a truncated or damaged zip archive'),
    ('truncated_legacy', 'not a readable checkpoint'),
])
def test_broken_files_give_one_line(hostile_checkpoints, kind, reason):
    path = hostile_checkpoints[1][kind]
    for load in (load_checkpoint_file, _load_checkpoint):
        with pytest.raises(CheckpointError, match=reason) as error:
            load(str(path))
        assert_one_line_error(error, path)
    assert issubclass(CheckpointError, ValueError)


def test_mmengine_reads_local_files_with_mmdat_loader():
    assert CheckpointLoader._get_checkpoint_loader('/some/file.pth').__module__ == \
        'mmdat.models.utils.checkpoint'


def test_legacy_format_of_plain_weights_still_loads(tmp_path):
    torch.save({'w': torch.arange(3.0)}, tmp_path / 'old.pth', _use_new_zipfile_serialization=False)
    assert torch.equal(load_checkpoint_file(str(tmp_path / 'old.pth'))['w'], torch.arange(3.0))


def test_a_file_of_something_else_than_a_dict(tmp_path):
    torch.save([torch.zeros(1)], tmp_path / 'list.pth')
    with pytest.raises(CheckpointError, match='holds a list, not a dict of weights'):
        load_checkpoint_file(str(tmp_path / 'list.pth'))


class Note:
    """A class a trusted file may hold (refused otherwise)."""


def test_trusting_a_file_is_explicit(tmp_path):
    torch.save({'w': torch.zeros(1), 'note': Note()}, tmp_path / 'own.pth')
    with pytest.raises(CheckpointError, match=f'refused to load {__name__}.Note.*--trust-checkpoint'):
        load_checkpoint_file(str(tmp_path / 'own.pth'))
    assert isinstance(load_checkpoint_file(str(tmp_path / 'own.pth'), trusted=True)['note'], Note)
    trust_checkpoint(str(tmp_path / 'own.pth'))
    assert isinstance(_load_checkpoint(str(tmp_path / 'own.pth'))['note'], Note)


def test_weights_that_do_not_fit_are_refused():
    model = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 1))  # 110 + 11 parameters
    first = {'0.weight': torch.zeros(10, 10), '0.bias': torch.zeros(10)}
    check_weights_fit(model, {'state_dict': first}, 'a.pth')  # 11 of 121 (9%) left at init
    with pytest.raises(CheckpointError, match=r'b.pth leaves 17% .*0.bias, 1.weight, 1.bias\).* '
                       '--allow-partial-weights'):
        check_weights_fit(model, {'0.weight': torch.zeros(10, 10)}, 'b.pth')
    # DDP prefixes are removed; a weight of another shape does not count
    check_weights_fit(model, {'module.0.weight': torch.zeros(10, 10), '0.bias': torch.zeros(10)}, 'c.pth')
    with pytest.raises(CheckpointError, match=r'd.pth leaves 100%'):
        check_weights_fit(model, {'0.weight': torch.zeros(5, 10)}, 'd.pth')
    check_weights_fit(model, {}, 'e.pth', allow_partial=True)


def test_backbone_partial_load_names_missing_blocks(tmp_path, monkeypatch):
    logged = []
    monkeypatch.setattr(pretrained_module, 'print_log', lambda msg, logger, level=logging.INFO:
                        logged.append((level, msg)))
    smaller = DAT(ARCH)
    torch.save({'state_dict': smaller.state_dict()}, tmp_path / 'small.pth')
    bigger = DAT(dict(ARCH, depths=(1, 1, 4, 1)),
                 init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'small.pth')))
    bigger.init_weights()
    assert (logging.WARNING, f'DAT: {tmp_path / "small.pth"} has no weights for stages.2.blocks.2, '
            'stages.2.blocks.3: they keep their random initialisation') in logged
    assert torch.equal(bigger.stages[2].blocks[1].mlp.fc1.weight, smaller.stages[2].blocks[1].mlp.fc1.weight)

    no_stage = {k: v for k, v in smaller.state_dict().items() if not k.startswith('stages.3.')}
    torch.save(no_stage, tmp_path / 'no_stage.pth')
    with pytest.raises(CheckpointError, match='no_stage.pth has no weights for stages.3 '):
        DAT(ARCH, init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'no_stage.pth'))).init_weights()
