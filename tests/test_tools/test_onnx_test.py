"""tools/deployment/onnx_test.py and onnx_demo.py: a detector and a segmenter exported whole
(--part predict), evaluated in onnxruntime with the config's evaluator and compared with
PyTorch; bad inputs get one line."""
import importlib
import os
import re

import pytest
import torch
from mmengine.config import Config

from mmdat.datasets import make_synthetic_dataset
from mmdat.utils import register_scope
from tests.conftest import REPO_ROOT, load_module, run_script

pytest.importorskip('onnxruntime')
pytest.importorskip('onnxscript')

EXPORT = REPO_ROOT / 'tools' / 'deployment' / 'pytorch2onnx.py'
TEST = REPO_ROOT / 'tools' / 'deployment' / 'onnx_test.py'
DEMO = REPO_ROOT / 'tools' / 'deployment' / 'onnx_demo.py'
DETECTOR = REPO_ROOT / 'tests' / 'data' / 'configs' / 'retinanet_dat_shapes_tiny.py'
SEGMENTER = REPO_ROOT / 'configs' / 'demo' / 'fpn_dat_demo_shapes.py'
MASK_RCNN = REPO_ROOT / 'tests' / 'data' / 'configs' / 'mask_rcnn_dat_shapes_tiny.py'


@pytest.fixture(scope='module')
def shapes_root(tmp_path_factory):
    root = tmp_path_factory.mktemp('shapes')
    make_synthetic_dataset(str(root), {'train': 4, 'val': 4}, seed=0)
    return root


def random_checkpoint(config, path, shapes_root):
    """Seeded random weights: an untrained head scores many boxes (and pixels of every class)
    near 0.5, which tests the comparison harder than a model trained for a few steps, whose
    scores all lie under the thresholds."""
    os.environ['SHAPES_ROOT'] = f'{shapes_root}/'
    cfg = Config.fromfile(str(config))
    scope = register_scope(cfg)
    cfg.model.backbone.pop('init_cfg', None)
    torch.manual_seed(0)
    model = importlib.import_module(f'{scope}.registry').MODELS.build(cfg.model)
    torch.save({'state_dict': model.state_dict(), 'meta': {}}, path)
    return path


def run(args, shapes_root, expect=0):
    """A tool's command line (in a child of the preloaded process: see ``run_script``)."""
    result = run_script(*args, cwd=REPO_ROOT, env={'SHAPES_ROOT': f'{shapes_root}/'}, timeout=900)
    assert result.returncode == expect, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def export_whole(config, name, tmp_path, shapes_root, *args):
    """A seeded random checkpoint of ``config`` (``NAME.pth``) and its whole-model export
    (``--part predict``, ``NAME.onnx``) with the export's further ``args``: both paths and the
    export's output."""
    checkpoint = random_checkpoint(config, tmp_path / f'{name}.pth', shapes_root)
    model = tmp_path / f'{name}.onnx'
    result = run([EXPORT, config, model, '--part', 'predict', '--checkpoint', checkpoint, *args], shapes_root)
    return checkpoint, model, result.stdout


def metrics_line(stdout, prefix):
    line = next(line for line in stdout.splitlines() if line.startswith(prefix))
    return re.findall(r'(\S+): (-?[\d.]+)', line.split(': ', 1)[1])


@pytest.mark.slow
def test_detector_exported_whole_gives_pytorchs_boxes_and_metrics(shapes_root, tmp_path):
    # the test images are 240x192 after resizing, padded to 256x192 in batches
    checkpoint, model, exported = export_whole(DETECTOR, 'det', tmp_path, shapes_root, '--torchscript',
                                               '--shape', '192', '256', '--check-shape', '160', '224')
    assert '0.0% of the predictions missed' in exported
    # one evaluation of the fp32 model for both the comparison with PyTorch and the int8 copy
    result = run([TEST, DETECTOR, model, '--checkpoint', checkpoint, '--work-dir', tmp_path / 'work',
                  '--quantize', 'dynamic'], shapes_root)
    compared = re.search(r'score > 0.3 without an ONNX box of the same class at IoU >= 0.99: (\d+) of (\d+)',
                         result.stdout)
    assert compared and int(compared[1]) == 0 and int(compared[2]) > 50
    onnx_metrics = metrics_line(result.stdout, 'ONNX (onnxruntime fp32)')
    assert onnx_metrics[0][0] == 'coco/bbox_mAP'
    assert onnx_metrics == metrics_line(result.stdout, 'PyTorch')
    assert (tmp_path / 'det_int8_dynamic.onnx').is_file()
    assert metrics_line(result.stdout, 'int8 - fp32')[0][0] == 'coco/bbox_mAP'

    image = next((shapes_root / 'val' / 'images').iterdir())
    result = run([DEMO, image, DETECTOR, model, '--out', tmp_path / 'demo.png'], shapes_root)
    assert (tmp_path / 'demo.png').is_file() and 'detections with score > 0.3' in result.stdout


@pytest.mark.slow
def test_mask_rcnn_exported_whole_gives_pytorchs_boxes_masks_and_metrics(shapes_root, tmp_path):
    checkpoint, model, exported = export_whole(MASK_RCNN, 'mask_rcnn', tmp_path, shapes_root, '--shape', '256',
                                               '--check-shape', '233', '301')  # torch.export
    assert 'torch.export' in exported and exported.count('0.0% of the predictions missed') == 2
    result = run([TEST, MASK_RCNN, model, '--checkpoint', checkpoint, '--work-dir', tmp_path / 'work'], shapes_root)
    compared = re.search(r'score > 0.3 without an ONNX box of the same class at IoU >= 0.99 and mask IoU '
                         r'>= 0.9: (\d+) of (\d+)', result.stdout)
    assert compared and int(compared[1]) == 0 and int(compared[2]) > 50
    onnx_metrics = metrics_line(result.stdout, 'ONNX (onnxruntime fp32)')
    assert {'coco/bbox_mAP', 'coco/segm_mAP'} <= {key for key, _ in onnx_metrics}
    assert onnx_metrics == metrics_line(result.stdout, 'PyTorch')

    image = next((shapes_root / 'val' / 'images').iterdir())
    result = run([DEMO, image, MASK_RCNN, model, '--out', tmp_path / 'demo.png'], shapes_root)
    assert (tmp_path / 'demo.png').is_file() and 'detections with score > 0.3' in result.stdout


@pytest.mark.slow
def test_segmenter_exported_whole_gives_pytorchs_class_maps(shapes_root, tmp_path):
    checkpoint, model, exported = export_whole(SEGMENTER, 'seg', tmp_path, shapes_root, '--shape', '256',
                                               '--check-shape', '256', '320')  # torch.export
    assert 'torch.export' in exported
    result = run([TEST, SEGMENTER, model, '--checkpoint', checkpoint, '--work-dir', tmp_path / 'work',
                  '--quantize', 'static', '--calib-images', '2'], shapes_root)
    compared = re.search(r'pixels of another class in ONNX than in PyTorch: (\d+) of (\d+)', result.stdout)
    assert compared and int(compared[2]) > 0 and int(compared[1]) <= 1e-4 * int(compared[2])
    assert metrics_line(result.stdout, 'ONNX (onnxruntime fp32)')[0][0] == 'aAcc'
    assert (tmp_path / 'seg_int8_static.onnx').is_file()
    assert 'int8 - fp32: aAcc' in result.stdout


def test_bad_inputs_get_one_line(shapes_root, tmp_path, monkeypatch):
    monkeypatch.setenv('SHAPES_ROOT', f'{shapes_root}/')
    not_predict = tmp_path / 'features.onnx'
    load_module(EXPORT).main([str(DETECTOR), str(not_predict), '--torchscript', '--shape', '64',
                              '--check-shape', '96'])
    image = next((shapes_root / 'val' / 'images').iterdir())
    text_file = tmp_path / 'notes.png'
    text_file.write_text('not an image')
    onnx_test, onnx_demo = load_module(TEST), load_module(DEMO)
    # an earlier segmenter in the process leaves mmseg's scope current; the detector's config
    # must still build in mmdet's
    from mmengine.registry import init_default_scope
    init_default_scope('mmseg')
    cases = [
        (onnx_test, [DETECTOR, tmp_path / 'missing.onnx'], 'ONNX model not found'),
        (onnx_test, [DETECTOR, not_predict, '--checkpoint', tmp_path / 'missing.pth'], 'Checkpoint not found'),
        (onnx_test, [DETECTOR, not_predict], 'not a --part predict export'),
        (onnx_demo, [image, DETECTOR, not_predict, '--out', tmp_path / 'x.png'], 'not a --part predict export'),
        (onnx_demo, [image, SEGMENTER, not_predict, '--out', tmp_path / 'x.png'], 'not a --part predict export'),
        (onnx_demo, [text_file, DETECTOR, not_predict, '--out', tmp_path / 'x.png'], 'Cannot read image'),
    ]
    for tool, args, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            tool.main([str(a) for a in args])
        text = str(exit_info.value.code)
        assert message in text and '\n' not in text, (args, text)
