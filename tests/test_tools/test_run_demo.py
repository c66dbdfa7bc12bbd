"""tools/run_demo.py end to end with a shortened schedule: data, untrained and trained
evaluation of both models, results.json and the picture."""
import json
from pathlib import Path

import cv2
import pytest

from tests.conftest import REPO_ROOT, run_script


@pytest.mark.slow
def test_run_demo_short(tmp_path):
    # two detector iterations (16 images, the config's batch of 8); 5 segmenter iterations end
    # inside the config's 50-iteration warm-up, and its polynomial decay is dropped
    data_root, work_dir = tmp_path / 'shapes', tmp_path / 'work'
    result = run_script(REPO_ROOT / 'tools' / 'run_demo.py', '--data-root', data_root, '--work-dir', work_dir,
                        '--train-images', '16', '--det-epochs', '1', '--seg-iters', '5', '--num-pictures', '2',
                        cwd=REPO_ROOT, env={'OMP_NUM_THREADS': '1'}, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert len(json.loads((data_root / 'annotations' / 'instances_train.json').read_text())['images']) == 16

    results = json.loads((work_dir / 'results.json').read_text())
    det, seg = results['detection'], results['segmentation']
    # mmdet reports no metrics when no box scores above its threshold (an untrained RetinaNet)
    for metrics in (det['untrained'], det['trained']):
        assert set(metrics) in (set(), {'coco/bbox_mAP', 'coco/bbox_mAP_50', 'coco/bbox_mAP_75',
                                        'coco/bbox_mAP_s', 'coco/bbox_mAP_m', 'coco/bbox_mAP_l'})
        assert all(-1.0 <= value <= 1.0 for value in metrics.values())
    assert 0.0 <= seg['untrained']['mIoU'] <= 100.0 and 0.0 <= seg['trained']['mIoU'] <= 100.0
    for model in (det, seg):
        assert Path(model['checkpoint']).is_file()
    assert f'bbox mAP@[.5:.95] {det["trained"].get("coco/bbox_mAP", 0.0):.3f}' in result.stdout
    assert f'mIoU {seg["trained"]["mIoU"]:.1f}' in result.stdout

    picture = cv2.imread(str(work_dir / 'predictions.png'))
    assert picture.shape == (2 * 192, 2 * 256, 3)  # a detection row and a segmentation row
    assert picture.std() > 10  # images were drawn, not a blank canvas
