"""mmdat.deployment.ops.roi_align: mmcv's RoIAlign in PyTorch, ONNX RoiAlign in onnxruntime, and
the two agree (both exporters, dynamic sizes, boxes of size 0 and outside the map)."""
import numpy as np
import pytest
import torch
from mmcv.ops import roi_align as mmcv_roi_align

from mmdat.deployment.ops import ONNX_TRANSLATIONS, register_torchscript_symbolics, roi_align

ort = pytest.importorskip('onnxruntime')


class RoiAlign(torch.nn.Module):

    def __init__(self, sampling_ratio, aligned):
        super().__init__()
        self.sampling_ratio, self.aligned = sampling_ratio, aligned

    def forward(self, features, rois):
        return roi_align(features, rois, 7, 5, 0.25, self.sampling_ratio, self.aligned)


def random_rois(count, seed):
    generator = torch.Generator().manual_seed(seed)
    corner = torch.rand(count, 2, generator=generator) * 80 - 8  # some outside the map
    size = torch.rand(count, 2, generator=generator) * 50
    size[:4] *= 0.01  # under a feature pixel
    size[4] = 0  # the size-0 box of the other levels in roi_features
    index = torch.randint(0, 2, (count, 1), generator=generator).float()
    return torch.cat([index, corner, corner + size], 1)


@pytest.mark.parametrize('sampling_ratio', [0, 2])
@pytest.mark.parametrize('aligned', [True, False], ids=['aligned', 'legacy'])
@pytest.mark.parametrize('dynamo', [True, False], ids=['dynamo', 'torchscript'])
def test_roi_align_is_mmcvs_and_exports_as_onnx_roi_align(sampling_ratio, aligned, dynamo, tmp_path):
    model = RoiAlign(sampling_ratio, aligned)
    features, rois = torch.randn(2, 3, 13, 17), random_rois(20, 0)
    torch.testing.assert_close(model(features, rois),
                               mmcv_roi_align(features, rois, (7, 5), 0.25, sampling_ratio, 'avg', aligned),
                               rtol=0, atol=0)
    path = str(tmp_path / 'roi_align.onnx')
    if dynamo:
        pytest.importorskip('onnxscript')
        from torch.export import Dim
        torch.onnx.export(model, (features, rois), path, dynamo=True, opset_version=18,
                          input_names=['features', 'rois'], custom_translation_table=ONNX_TRANSLATIONS,
                          dynamic_shapes=({0: Dim('batch'), 2: Dim('height'), 3: Dim('width')}, {0: Dim('count')}))
    else:
        register_torchscript_symbolics(18)
        torch.onnx.export(model, (features, rois), path, dynamo=False, opset_version=18,
                          input_names=['features', 'rois'],
                          dynamic_axes={'features': {0: 'batch', 2: 'height', 3: 'width'}, 'rois': {0: 'count'}})
    import onnx
    assert 'RoiAlign' in {node.op_type for node in onnx.load(path).graph.node}
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    features, rois = torch.randn(2, 3, 11, 19), random_rois(31, 1)
    actual = session.run(None, {'features': features.numpy(), 'rois': rois.numpy()})[0]
    np.testing.assert_allclose(actual, model(features, rois).numpy(), rtol=0, atol=1e-6)
