"""Non-maximum suppression as one operator that both ONNX exporters write as ONNX's
``NonMaxSuppression``, and that runs in PyTorch with the same results (for tracing and checks).
"""
import torch
from torch import Tensor

#: ONNX ``NonMaxSuppression`` exists from opset 10 (11 changed nothing that matters here).
NMS_MIN_OPSET = 11


@torch.library.custom_op('mmdat::nms_indices', mutates_args=())
def nms_indices(boxes: Tensor, scores: Tensor, max_per_class: int, iou_threshold: float,
                score_threshold: float) -> Tensor:
    """ONNX ``NonMaxSuppression`` (corner boxes): the kept ``[batch, class, box]`` index triples.

    Args:
        boxes (Tensor): ``(B, N, 4)`` boxes ``(x1, y1, x2, y2)``.
        scores (Tensor): ``(B, C, N)`` scores of each box for each class.
        max_per_class (int): Most boxes kept per image and class.
        iou_threshold (float): A box whose IoU with a kept box of higher score exceeds this is
            dropped.
        score_threshold (float): Only boxes scoring above this are kept.

    Returns:
        Tensor: ``(K, 3)`` int64, by image, then class, then decreasing score (ONNX's order).
    """
    from mmcv.ops import nms  # mmdet's own NMS: the same kept boxes as the PyTorch model
    kept = []
    for b in range(scores.shape[0]):
        for c in range(scores.shape[1]):
            candidates = (scores[b, c] > score_threshold).nonzero().flatten()
            if candidates.numel() == 0:
                continue
            _, keep = nms(boxes[b, candidates], scores[b, c, candidates], iou_threshold)
            keep = candidates[keep[:max_per_class]]
            kept.append(torch.stack([torch.full_like(keep, b), torch.full_like(keep, c), keep], 1))
    if not kept:
        return boxes.new_zeros((0, 3), dtype=torch.int64)
    return torch.cat(kept).to(torch.int64)


@nms_indices.register_fake
def _(boxes, scores, max_per_class, iou_threshold, score_threshold):
    count = torch.library.get_ctx().new_dynamic_size()
    return boxes.new_empty((count, 3), dtype=torch.int64)


def _nms_onnxscript(boxes, scores, max_per_class: int, iou_threshold: float, score_threshold: float):
    from onnxscript import opset18 as op
    return op.NonMaxSuppression(boxes, scores, op.Constant(value_ints=[max_per_class]),
                                op.Constant(value_floats=[iou_threshold]),
                                op.Constant(value_floats=[score_threshold]))


def _nms_torchscript(g, boxes, scores, max_per_class, iou_threshold, score_threshold):
    from torch.onnx import symbolic_helper
    max_per_class = symbolic_helper._maybe_get_const(max_per_class, 'i')
    iou_threshold = symbolic_helper._maybe_get_const(iou_threshold, 'f')
    score_threshold = symbolic_helper._maybe_get_const(score_threshold, 'f')
    return g.op('NonMaxSuppression', boxes, scores,
                g.op('Constant', value_t=torch.tensor([max_per_class], dtype=torch.int64)),
                g.op('Constant', value_t=torch.tensor([iou_threshold], dtype=torch.float32)),
                g.op('Constant', value_t=torch.tensor([score_threshold], dtype=torch.float32)))


#: For ``torch.onnx.export(dynamo=True, custom_translation_table=...)``.
ONNX_TRANSLATIONS = {torch.ops.mmdat.nms_indices.default: _nms_onnxscript}


def register_torchscript_symbolics(opset: int) -> None:
    """Teach the TorchScript exporter to write :func:`nms_indices` as ``NonMaxSuppression``."""
    torch.onnx.register_custom_op_symbolic('mmdat::nms_indices', _nms_torchscript, opset)
