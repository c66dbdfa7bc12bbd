"""Which checkpoint --resume (without a path) resumes from, and the --resume checks."""
import fractions
import zipfile

import pytest
import torch
from mmengine.config import Config

from mmdat.engine import checkpoint_problem, find_resume_checkpoint, set_up_resume
from mmdat.engine import resume as resume_module
from mmdat.models.utils import CheckpointError

TRUST_ADVICE = '--trust-checkpoint'


def save(path, epoch, **extra):
    """A checkpoint as training saves it (what mmengine's resume reads), plus ``extra``."""
    torch.save({'meta': {'epoch': epoch, 'iter': 2 * epoch}, 'message_hub': {},
                'state_dict': {'w': torch.zeros(64)}, **extra}, path)
    return str(path)


def save_unpicklable(path, epoch):
    """A zip whose every entry passes its CRC, but whose data.pkl is cut short (written so)."""
    save(path, epoch)
    with zipfile.ZipFile(path) as archive:
        entries = [(name, archive.read(name)) for name in archive.namelist()]
    with zipfile.ZipFile(path, 'w') as archive:
        for name, data in entries:
            archive.writestr(name, data[:len(data) // 2] if name.endswith('data.pkl') else data)
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None
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
    assert len(warnings) == 1
    assert f'skipping {tmp_path / "iter_200.pth"} is not a readable checkpoint: damaged' in warnings[0]
    assert TRUST_ADVICE not in warnings[0]


def test_falls_back_past_a_file_that_passes_its_checksums_but_cannot_be_unpickled(tmp_path,
                                                                                warnings):
    save(tmp_path / 'epoch_1.pth', 1)
    save_unpicklable(tmp_path / 'epoch_2.pth', 2)
    save_unpicklable(tmp_path / 'epoch_3.pth', 3)
    (tmp_path / 'last_checkpoint').write_text(str(tmp_path / 'epoch_3.pth'))
    assert find_resume_checkpoint(str(tmp_path)) == str(tmp_path / 'epoch_1.pth')
    # one warning per skipped file, naming it; damage is not a question of trust
    assert len(warnings) == 2
    for warning, epoch in zip(warnings, (3, 2)):
        assert f'skipping {tmp_path / f"epoch_{epoch}.pth"}' in warning
        assert 'damaged' in warning and TRUST_ADVICE not in warning


def test_a_file_refused_for_its_objects_is_skipped_with_the_trust_advice(tmp_path, warnings):
    save(tmp_path / 'epoch_1.pth', 1)
    save(tmp_path / 'epoch_2.pth', 2, extra=fractions.Fraction(1, 3))
    assert find_resume_checkpoint(str(tmp_path)) == str(tmp_path / 'epoch_1.pth')
    warning, = warnings
    assert 'refused to load fractions.Fraction' in warning and TRUST_ADVICE in warning
    # --trust-checkpoint: the user vouches for the work dir's files
    assert find_resume_checkpoint(str(tmp_path), trusted=True) == str(tmp_path / 'epoch_2.pth')


def test_weights_only_files_are_not_resume_points(tmp_path, warnings):
    save(tmp_path / 'epoch_1.pth', 1)
    torch.save({'state_dict': {'w': torch.zeros(64)}}, tmp_path / 'epoch_2.pth')
    assert find_resume_checkpoint(str(tmp_path)) == str(tmp_path / 'epoch_1.pth')
    assert 'holds weights only' in warnings[0] and TRUST_ADVICE not in warnings[0]
    # named with --resume PATH: one line, not mmengine's KeyError: 'meta'
    with pytest.raises(CheckpointError, match=r'^--resume: .*epoch_2.pth holds weights only .*'
                       r'use --cfg-options load_from=.*epoch_2.pth$'):
        set_up_resume(Config(dict(work_dir=str(tmp_path))), str(tmp_path / 'epoch_2.pth'))


def test_a_config_in_meta_is_not_run(tmp_path):
    """mmengine's Runner.resume runs ``meta['config']`` as Python (Config.fromstring)."""
    marker = tmp_path / 'CONFIG_RAN'
    path = save(tmp_path / 'epoch_1.pth', 1)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint['meta']['config'] = f"x = __import__('os').system('touch {marker}')\n"
    torch.save(checkpoint, path)
    cfg = Config(dict(work_dir=str(tmp_path)))
    with pytest.raises(CheckpointError, match='holds a config that resuming would run as Python '
                       r'code \(if you trust this file, pass --trust-checkpoint\)$'):
        set_up_resume(cfg, path)
    with pytest.raises(CheckpointError, match='holds a config'):  # config resume = True
        set_up_resume(Config(dict(work_dir=str(tmp_path), resume=True, load_from=path)), None)
    assert set_up_resume(cfg, path, trusted=True) == path
    assert not marker.exists()


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
    with pytest.raises(CheckpointError, match=r'no checkpoint in .* to resume from: .*epoch_2.pth '
                       r'.*; .*epoch_1.pth is not a readable checkpoint: the file is empty$'):
        find_resume_checkpoint(str(tmp_path))
    (tmp_path / 'epoch_1.pth').unlink()
    (tmp_path / 'epoch_2.pth').unlink()
    (tmp_path / 'last_checkpoint').write_text(str(tmp_path / 'epoch_1.pth'))
    with pytest.raises(CheckpointError, match='names .*epoch_1.pth, and no checkpoint is in'):
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
    with pytest.raises(CheckpointError, match='^--resume: Checkpoint file not found: .*missing.pth$'):
        set_up_resume(Config(dict(work_dir=str(tmp_path))), str(tmp_path / 'missing.pth'))
