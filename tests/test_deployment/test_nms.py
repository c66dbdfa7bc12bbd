"""mmdat.deployment.ops.nms_indices and the batched per-class NMS: mmcv's results, in PyTorch and in ONNX."""
import numpy as np
import pytest
import torch
import torch.nn as nn
from mmcv.ops import batched_nms

from mmdat.deployment import batched_class_nms, nms_indices
from mmdat.deployment.ops import ONNX_TRANSLATIONS, register_torchscript_symbolics

ort = pytest.importorskip('onnxruntime')


def random_boxes(batch, count, seed=0):
    generator = torch.Generator().manual_seed(seed)
    corner = torch.rand(batch, count, 2, generator=generator) * 100
    size = torch.rand(batch, count, 2, generator=generator) * 40 + 1
    return torch.cat([corner, corner + size], -1)


class ClassNms(nn.Module):

    def forward(self, boxes, scores, labels):
        return batched_class_nms(boxes, scores, labels, 0.5, 0.2, 7)


def test_batched_class_nms_keeps_what_mmcv_keeps_per_image():
    boxes = random_boxes(3, 60)
    scores = torch.rand(3, 60, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 3, (3, 60), generator=torch.Generator().manual_seed(2))
    scores[2] = 0.1  # an image with nothing above the score threshold
    out_boxes, out_scores, out_labels = ClassNms()(boxes, scores, labels)
    assert out_boxes.shape == (3, 7, 4) and out_labels.dtype == torch.int64
    for image in range(3):
        valid = scores[image] > 0.2
        if not valid.any():  # mmdet skips NMS then (mmcv's fails on no boxes)
            assert (out_labels[image] == -1).all()
            continue
        dets, keep = batched_nms(boxes[image][valid], scores[image][valid], labels[image][valid],
                                 dict(iou_threshold=0.5))
        count = min(len(keep), 7)
        assert torch.equal(out_boxes[image, :count], boxes[image][valid][keep[:count]])
        assert torch.equal(out_scores[image, :count], dets[:count, 4])
        assert torch.equal(out_labels[image, :count], labels[image][valid][keep[:count]])
        # the rows left over
        assert (out_scores[image, count:] == 0).all() and (out_labels[image, count:] == -1).all()


def test_boxes_of_different_classes_do_not_suppress_each_other():
    boxes = torch.tensor([[[0., 0., 10., 10.], [0., 0., 10., 10.], [0., 0., 10., 10.]]])
    scores = torch.tensor([[0.9, 0.8, 0.7]])
    labels = torch.tensor([[0, 1, 0]])
    _, out_scores, out_labels = ClassNms()(boxes, scores, labels)
    assert out_labels[0, :3].tolist() == [0, 1, -1] and out_scores[0, :2].tolist() == pytest.approx([0.9, 0.8])


@pytest.mark.parametrize('dynamo', [True, False], ids=['dynamo', 'torchscript'])
def test_exports_as_onnx_nms_and_agrees_at_other_sizes(dynamo, tmp_path):
    path = str(tmp_path / 'nms.onnx')
    args = (random_boxes(2, 40), torch.rand(2, 40), torch.randint(0, 3, (2, 40)))
    if dynamo:
        pytest.importorskip('onnxscript')
        from torch.export import Dim
        batch, count = Dim('batch'), Dim('count')
        torch.onnx.export(ClassNms(), args, path, dynamo=True, opset_version=18,
                          input_names=['boxes', 'scores', 'labels'],
                          dynamic_shapes=({0: batch, 1: count}, {0: batch, 1: count}, {0: batch, 1: count}),
                          custom_translation_table=ONNX_TRANSLATIONS)
    else:
        register_torchscript_symbolics(18)
        axes = {name: {0: 'batch', 1: 'count'} for name in ('boxes', 'scores', 'labels')}
        torch.onnx.export(ClassNms(), args, path, dynamo=False, opset_version=18,
                          input_names=['boxes', 'scores', 'labels'], dynamic_axes=axes)
    import onnx
    assert 'NonMaxSuppression' in {node.op_type for node in onnx.load(path).graph.node}
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    for batch, count, seed in ((1, 25, 3), (3, 90, 4)):
        generator = torch.Generator().manual_seed(seed)
        inputs = (random_boxes(batch, count, seed), torch.rand(batch, count, generator=generator),
                  torch.randint(0, 3, (batch, count), generator=generator))
        expected = ClassNms()(*inputs)
        actual = session.run(None, {name: x.numpy() for name, x in zip(('boxes', 'scores', 'labels'), inputs)})
        for want, got in zip(expected, actual):
            np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-5)


def test_nms_indices_orders_by_image_class_and_score():
    boxes = torch.tensor([[[0., 0., 10., 10.], [20., 20., 30., 30.], [1., 1., 10., 10.]]] * 2)
    scores = torch.tensor([[[0.5, 0.9, 0.6]], [[0.1, 0.3, 0.8]]])
    kept = nms_indices(boxes, scores, 10, 0.5, 0.2)
    # image 0: box 1 (0.9), box 2 (0.6) suppresses box 0; image 1: box 2, then box 1
    assert kept.tolist() == [[0, 0, 1], [0, 0, 2], [1, 0, 2], [1, 0, 1]]
