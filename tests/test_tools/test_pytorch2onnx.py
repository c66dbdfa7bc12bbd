"""tools/deployment/pytorch2onnx.py: dynamic-size ONNX exports checked by onnxruntime."""
import os

import pytest
import torch
import torch.nn as nn

from mmdat.deployment import build_predict_module
from mmdat.models.layers import DeformableAttention
from tests.conftest import (CASCADE_CONFIG, MASK_RCNN_CONFIG, MINIMAL_ARCHS, REPO_ROOT, TEST_CONFIGS, load_tool,
                            run_script, small_backbone, small_two_stage)

pytest.importorskip('onnxruntime')
pytest.importorskip('onnx')

TOOL = REPO_ROOT / 'tools' / 'deployment' / 'pytorch2onnx.py'
V1_ARCH, V2_ARCH = MINIMAL_ARCHS[1], MINIMAL_ARCHS[2]
pytorch2onnx = load_tool('deployment/pytorch2onnx.py')


def small_dat(arch, **kwargs):
    return small_backbone(arch=arch, **kwargs).eval()


class BakesTheWidth(nn.Module):
    """Multiplies by the width as a Python float: the TorchScript trace freezes it."""

    def forward(self, x):
        return x * float(x.shape[-1])


class BakesTheBatch(nn.Module):
    """Multiplies by the batch as a Python float: the TorchScript trace freezes it."""

    def forward(self, x):
        return x * float(x.shape[0])


class LargeDeformableAttention(nn.Module):
    """A DeformableAttention on a map where 'auto' runs the CPU kernel in eager mode (32 query
    rows of 32 x 1,024 scores), which no exporter can record."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Conv2d(3, 16, 1)
        self.attn = DeformableAttention(16, 4, 2, 3, table_size=5, attn_impl='auto')

    def forward(self, x):
        return self.attn(self.embed(x).permute(0, 2, 3, 1))


@pytest.mark.slow
@pytest.mark.parametrize('arch', [V1_ARCH, V2_ARCH], ids=['v1', 'v2'])
def test_torchscript_export_agrees_at_another_size(arch, tmp_path):
    output = tmp_path / 'model.onnx'
    # 100x84 pads every v1 stage to whole windows and leaves DAT++ a 4x3 last stage; 36x200
    # has a 2x7 last stage (DAT++ 1-pixel rows of reference points from stage 2 on)
    report = pytorch2onnx.export_checked(small_dat(arch), str(output), (100, 84), (36, 200))
    assert output.is_file()
    # exported at a batch of 2, checked at 1 and 2: the batch is dynamic too
    assert set(report) == {(1, 100, 84), (2, 36, 200)}
    assert all(len(errors) == 4 and max(errors) < 1e-4 for errors in report.values())


@pytest.mark.slow
@pytest.mark.parametrize('arch', [V1_ARCH, V2_ARCH], ids=['v1', 'v2'])
def test_dynamo_export_agrees_at_another_size(arch, tmp_path):
    pytest.importorskip('onnxscript')
    model = small_dat(arch, window_size=3 if arch is V1_ARCH else 7)
    # v1 at window 3: torch.export needs sizes of at least 32 * 3 + 1
    assert pytorch2onnx.dynamo_min_size(model) == (97 if arch is V1_ARCH else 33)
    output = tmp_path / 'model.onnx'
    report = pytorch2onnx.export_checked(model, str(output), (128, 112), (100, 260), dynamo=True)
    assert output.is_file()
    assert all(max(errors) < 1e-4 for errors in report.values())


def test_refuses_a_model_that_disagrees_and_writes_nothing(tmp_path):
    output = tmp_path / 'model.onnx'
    with pytest.raises(pytorch2onnx.ExportError, match='disagrees with PyTorch at 2x8x12'):
        pytorch2onnx.export_checked(BakesTheWidth(), str(output), (8, 8), (8, 12))
    assert os.listdir(tmp_path) == []  # neither the model nor the temporary file


def test_refuses_a_model_that_bakes_the_batch(tmp_path):
    with pytest.raises(pytorch2onnx.ExportError, match='disagrees with PyTorch at 1x8x8'):
        pytorch2onnx.export_checked(BakesTheBatch(), str(tmp_path / 'model.onnx'), (8, 8), (8, 12))


@pytest.mark.slow
@pytest.mark.parametrize('dynamo', [False, True], ids=['torchscript', 'dynamo'])
def test_exports_where_eager_mode_runs_the_kernel(dynamo, tmp_path):
    """Exports take SDPA where 'auto' would run a kernel (and 'fused' too): same results."""
    if dynamo:
        pytest.importorskip('onnxscript')
    model = LargeDeformableAttention().eval()
    for impl in ('auto', 'fused'):
        model.attn.attn_impl = impl
        report = pytorch2onnx.export_checked(model, str(tmp_path / 'attn.onnx'), (32, 32), (40, 24),
                                             dynamo=dynamo)
        assert all(max(errors) < 1e-4 for errors in report.values())


def test_cli_exits_with_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pytorch2onnx, 'build_model', lambda *args: BakesTheWidth())
    output = tmp_path / 'model.onnx'
    with pytest.raises(SystemExit) as exit_info:
        pytorch2onnx.main(['tiny', str(output), '--shape', '8', '--check-shape', '8', '12', '--torchscript'])
    message = str(exit_info.value.code)
    assert message.startswith('pytorch2onnx: the ONNX model disagrees') and '\n' not in message
    assert not output.exists()


@pytest.mark.parametrize('argv,match', [
    (['tiny', 'x.onnx', '--shape', '64', '--check-shape', '64'], 'must differ'),
    (['nano', 'x.onnx'], 'target must be one of'),
])
def test_cli_bad_arguments(argv, match, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=match):
        pytorch2onnx.main(argv)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize('argv', [['tiny', 'x.onnx', '--shape', '2'], ['tiny', 'x.onnx', '--tol', '0'],
                                  ['tiny', 'x.onnx', '--part', 'predict']])
def test_cli_rejects_bad_options(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        pytorch2onnx.parse_args(argv)
    assert exit_info.value.code == 2


def test_dynamo_export_below_the_minimum_size_is_refused(tmp_path):
    pytest.importorskip('onnxscript')
    model = small_dat(V2_ARCH)
    with pytest.raises(pytorch2onnx.ExportError, match='at least 33 a side'):
        pytorch2onnx.export_checked(model, str(tmp_path / 'm.onnx'), (32, 64), (64, 64), dynamo=True)
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_cli_exports_a_whole_detector(tmp_path):
    """A RetinaNet config (small DAT, FPN, head): the raw head outputs, checked at two sizes."""
    output = tmp_path / 'retinanet.onnx'
    config = TEST_CONFIGS / 'retinanet_dat_shapes_tiny.py'
    result = run_script(TOOL, config, output, '--part', 'tensor', '--shape', '64', '--check-shape', '96', '136',
                        '--torchscript', cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert output.is_file()
    # 3 FPN levels x (class scores, box deltas)
    assert 'at 2x96x136: max relative error' in result.stdout and 'over 6 outputs' in result.stdout


def test_cli_refuses_an_opset_without_half_pixel_roi_align_with_one_line(tmp_path, monkeypatch):
    """Two-stage detectors need ONNX RoiAlign's half-pixel mode (opset 16)."""
    monkeypatch.setattr(pytorch2onnx, 'build_model',
                        lambda *args: build_predict_module(small_two_stage(MASK_RCNN_CONFIG)))
    output = tmp_path / 'mask_rcnn.onnx'
    with pytest.raises(SystemExit) as exit_info:
        pytorch2onnx.main([str(MASK_RCNN_CONFIG), str(output), '--part', 'predict', '--opset', '15'])
    message = str(exit_info.value.code)
    assert message.startswith('pytorch2onnx: --opset 15: this model needs opset 16') and '\n' not in message
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_cascade_exports_whole_and_agrees(tmp_path):
    """Cascade Mask R-CNN's structure (three box heads refining the boxes, three mask heads) with a
    small DAT: TorchScript export, onnxruntime's boxes and masks against PyTorch's at two sizes."""
    model = build_predict_module(small_two_stage(CASCADE_CONFIG))
    report = pytorch2onnx.export_checked(model, str(tmp_path / 'cascade.onnx'), (192, 256), (161, 227))
    assert list(report.values()) == [[0.0], [0.0]]
