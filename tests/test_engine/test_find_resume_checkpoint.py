"""Which checkpoint --resume (without a path) resumes from, and the --resume checks."""
import os

import pytest
import torch
from mmengine.config import Config

from mmdat.engine import checkpoint_problem, find_resume_checkpoint
from mmdat.engine import resume as resume_module
from mmdat.utils import set_up_resume


def save(path, epoch):
    torch.save({'meta': {'epoch': epoch}, 'state_dict': {'w': torch.zeros(64)}}, path)
    return str(path)


@pytest.fixture
def warnings(monkeypatch):
    logged = []
    monkeypatch.setattr(resume_module, 'print_log', lambda msg, **kwargs: logged.append(msg))
    return logged


def test_newest_complete_checkpoint_without_a_pointer(tmp_path, warnings):
    for epoch in (1, 2, 10):
        save(tmp_path / f'epoch_{epoch}.pth', epoch)
    (tmp_path / 'best_coco_bbox_mAP_epoch_12.pth').write_bytes(b'')  # not a resume point
    assert find_resume_checkpoint(str(tmp_path)) == str(tmp_path / 'epoch_10.pth')
    (tmp_path / 'last_checkpoint').write_text('')  # an empty pointer
    assert find_resume_checkpoint(str(tmp_path)) == str(tmp_path / 'epoch_10.pth')
    assert warnings == []


def test_a_corrupt_newest_checkpoint_falls_back_with_a_warning(tmp_path, warnings):
    save(tmp_path / 'iter_100.pth', 1)
    data = open(save(tmp_path / 'iter_200.pth', 2), 'rb').read()
    (tmp_path / 'iter_200.pth').write_bytes(data[:len(data) // 2])  # killed while writing
    (tmp_path / 'last_checkpoint').write_text(str(tmp_path / 'iter_200.pth'))
    assert find_resume_checkpoint(str(tmp_path)) == str(tmp_path / 'iter_100.pth')
    assert any(f'skipping {tmp_path / "iter_200.pth"}' in w and 'previous checkpoint' in w
               for w in warnings)


def test_a_checkpoint_with_a_damaged_entry_is_not_complete(tmp_path):
    path = save(tmp_path / 'epoch_1.pth', 1)
    data = bytearray(open(path, 'rb').read())
    start = data.index(b'\0' * 64)  # the zeros of the tensor
    data[start:start + 8] = b'\1' * 8
    open(path, 'wb').write(bytes(data))
    assert 'corrupt entry' in checkpoint_problem(path)


def test_refuses_when_no_checkpoint_is_complete(tmp_path):
    (tmp_path / 'epoch_1.pth').write_bytes(b'')
    (tmp_path / 'epoch_2.pth').write_text('text')
    with pytest.raises(SystemExit, match=r'no complete checkpoint in .*epoch_2.pth \(.*\); '
                       r'.*epoch_1.pth \(the file is empty\)'):
        find_resume_checkpoint(str(tmp_path))
    (tmp_path / 'epoch_1.pth').unlink()
    (tmp_path / 'epoch_2.pth').unlink()
    (tmp_path / 'last_checkpoint').write_text(str(tmp_path / 'epoch_1.pth'))
    with pytest.raises(SystemExit, match='names .*epoch_1.pth, and no checkpoint is in'):
        find_resume_checkpoint(str(tmp_path))


def test_an_empty_work_dir_starts_from_the_beginning(tmp_path):
    cfg = Config(dict(work_dir=str(tmp_path / 'new'), default_hooks=dict(checkpoint=dict())))
    assert set_up_resume(cfg, True) is None
    assert cfg.resume is False and cfg.load_from is None


def test_set_up_resume(tmp_path):
    save(tmp_path / 'iter_4.pth', 1)
    out_dir = tmp_path / 'out'
    (out_dir / 'run').mkdir(parents=True)
    save(out_dir / 'run' / 'iter_8.pth', 2)
    # checkpoints under the hook's out_dir, and its own file names
    cfg = Config(dict(work_dir=str(tmp_path / 'run'), default_hooks=dict(
        checkpoint=dict(out_dir=str(out_dir), filename_tmpl='iter_{}.pth'))))
    assert set_up_resume(cfg, True) == str(out_dir / 'run' / 'iter_8.pth')
    assert cfg.resume is True and cfg.load_from == str(out_dir / 'run' / 'iter_8.pth')
    # a config's own resume = True is the same as --resume
    cfg = Config(dict(work_dir=str(tmp_path), resume=True, load_from=None))
    assert set_up_resume(cfg, None) == str(tmp_path / 'iter_4.pth')
    with pytest.raises(SystemExit, match='--resume: checkpoint file not found: .*missing.pth'):
        set_up_resume(Config(dict(work_dir=str(tmp_path))), str(tmp_path / 'missing.pth'))
