"""tools/train.py and tools/test.py stop early, with a clear message, when inputs are missing."""
import subprocess

import pytest

from tests.conftest import REPO_ROOT, load_tool, run_script


def run_tool(*args, cwd):
    return run_script(REPO_ROOT / 'tools' / args[0], *args[1:], cwd=cwd)


@pytest.mark.slow
@pytest.mark.parametrize('config,expected', [
    ('retinanet_dat_t_coco.py', ['data/coco/annotations/instances_train2017.json', 'Download COCO 2017',
                                 '--cfg-options train_dataloader.dataset.data_root=DIR/']),
    ('upernet_dat_t_ade20k.py', ['data/ade/ADEChallengeData2016/images/training', 'Download ADE20K',
                                 '--cfg-options train_dataloader.dataset.data_root=DIR/']),
    ('demo/fpn_dat_demo_shapes.py', ['data/shapes/train/images',
                                     'python tools/dataset_converters/make_shapes.py data/shapes']),
])
def test_train_without_dataset(tmp_path, config, expected, monkeypatch):
    monkeypatch.delenv('SHAPES_ROOT', raising=False)
    result = run_tool('train.py', REPO_ROOT / 'configs' / config, cwd=tmp_path)
    assert result.returncode == 1
    assert 'Traceback' not in result.stderr
    for text in expected:
        assert text in result.stderr
    assert not (tmp_path / 'work_dirs').exists()


@pytest.mark.slow
def test_train_data_root_option_is_checked(tmp_path):
    (tmp_path / 'coco' / 'annotations').mkdir(parents=True)
    result = run_tool('train.py', REPO_ROOT / 'configs' / 'mask_rcnn_dat_t_coco.py', '--cfg-options',
                      f'train_dataloader.dataset.data_root={tmp_path}/coco/', cwd=tmp_path)
    assert result.returncode == 1
    assert f'{tmp_path}/coco/annotations/instances_train2017.json' in result.stderr


@pytest.mark.slow
def test_test_without_checkpoint(tmp_path):
    result = run_tool('test.py', REPO_ROOT / 'configs' / 'retinanet_dat_t_coco.py', 'missing.pth',
                      cwd=tmp_path)
    assert result.returncode == 1
    assert 'Checkpoint file not found: missing.pth' in result.stderr


@pytest.mark.slow
def test_config_of_another_library(tmp_path):
    config = tmp_path / 'plain.py'
    config.write_text("default_scope = 'mmpretrain'\n")
    result = run_tool('train.py', config, cwd=tmp_path)
    assert result.returncode == 1
    assert "default_scope must be one of ('mmdet', 'mmseg')" in result.stderr


def test_train_resume_from_a_missing_file(tmp_path, monkeypatch):
    """Stops before the dataset is checked or the model built."""
    train = load_tool('train.py')
    monkeypatch.setattr(train, 'Runner', None)  # building anything would fail
    monkeypatch.setattr(train, 'check_dataset_files', None)
    with pytest.raises(SystemExit, match='^--resume: Checkpoint file not found: missing.pth$'):
        train.main([str(REPO_ROOT / 'configs' / 'retinanet_dat_t_coco.py'), '--resume', 'missing.pth',
                    '--work-dir', str(tmp_path)])


@pytest.mark.slow
@pytest.mark.parametrize('script, usage', [
    ('dist_train.sh', 'CONFIG GPUS'), ('dist_test.sh', 'CONFIG CHECKPOINT GPUS'),
    ('slurm_train.sh', 'PARTITION JOB_NAME CONFIG'), ('slurm_test.sh', 'PARTITION JOB_NAME CONFIG CHECKPOINT'),
])
def test_launchers_without_arguments(script, usage):
    result = subprocess.run(['bash', str(REPO_ROOT / 'tools' / script)], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith('usage: bash ') and usage in result.stderr
