"""The operators of the post-processing that ONNX has but PyTorch records as loops or mmcv
kernels: each is one custom operator that runs mmcv's own kernel in PyTorch (the same results
as the mmdet model, for tracing and checks) and that both ONNX exporters write as the ONNX
operator of the same meaning.

- :func:`nms_indices`: ONNX ``NonMaxSuppression``.
- :func:`roi_align`: mmcv's ``RoIAlign`` (average pooling) as ONNX ``RoiAlign`` (opset 16+).
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


#: ONNX ``RoiAlign`` has ``coordinate_transformation_mode`` (mmcv's ``aligned``) from opset 16.
ROI_ALIGN_MIN_OPSET = 16


@torch.library.custom_op('mmdat::roi_align', mutates_args=())
def roi_align(features: Tensor, rois: Tensor, output_height: int, output_width: int, spatial_scale: float,
              sampling_ratio: int, aligned: bool) -> Tensor:
    """mmcv's ``RoIAlign`` with average pooling.

    ONNX ``RoiAlign`` computes the same: its ``half_pixel`` mode is mmcv's ``aligned=True``
    (the box shifted by half a pixel, no smallest size), ``output_half_pixel`` is
    ``aligned=False`` (sizes of at least one pixel); ``sampling_ratio=0`` is
    ``ceil(box size / output size)`` points a bin in both; points outside the map by more than
    one pixel count as 0 and the others are clamped to it in both.

    Args:
        features (Tensor): ``(B, C, H, W)`` feature map.
        rois (Tensor): ``(R, 5)`` boxes ``(batch index, x1, y1, x2, y2)`` in input pixels.
        output_height (int): Bins of the output, vertically.
        output_width (int): Bins of the output, horizontally.
        spatial_scale (float): Feature pixels per input pixel.
        sampling_ratio (int): Sampling points a bin and side; 0 for adaptive.
        aligned (bool): mmcv's ``aligned``.

    Returns:
        Tensor: ``(R, C, output_height, output_width)``.
    """
    from mmcv.ops import roi_align as mmcv_roi_align
    return mmcv_roi_align(features, rois, (output_height, output_width), spatial_scale, sampling_ratio,
                          'avg', aligned)


@roi_align.register_fake
def _(features, rois, output_height, output_width, spatial_scale, sampling_ratio, aligned):
    return features.new_empty((rois.shape[0], features.shape[1], output_height, output_width))


def _roi_mode(aligned: bool) -> str:
    return 'half_pixel' if aligned else 'output_half_pixel'


def _roi_align_onnxscript(features, rois, output_height: int, output_width: int, spatial_scale: float,
                          sampling_ratio: int, aligned: bool):
    from onnxscript import INT64
    from onnxscript import opset18 as op
    index = op.Cast(op.Squeeze(op.Slice(rois, op.Constant(value_ints=[0]), op.Constant(value_ints=[1]),
                                        op.Constant(value_ints=[1])), op.Constant(value_ints=[1])), to=INT64.dtype)
    boxes = op.Slice(rois, op.Constant(value_ints=[1]), op.Constant(value_ints=[5]), op.Constant(value_ints=[1]))
    return op.RoiAlign(features, boxes, index, coordinate_transformation_mode=_roi_mode(aligned), mode='avg',
                       output_height=output_height, output_width=output_width, sampling_ratio=sampling_ratio,
                       spatial_scale=spatial_scale)


def _roi_align_torchscript(g, features, rois, output_height, output_width, spatial_scale, sampling_ratio,
                           aligned):
    from torch.onnx import symbolic_helper

    def const(values):
        return g.op('Constant', value_t=torch.tensor(values, dtype=torch.int64))

    index = g.op('Cast', g.op('Squeeze', g.op('Slice', rois, const([0]), const([1]), const([1])), const([1])),
                 to_i=7)  # INT64
    boxes = g.op('Slice', rois, const([1]), const([5]), const([1]))
    return g.op('RoiAlign', features, boxes, index,
                coordinate_transformation_mode_s=_roi_mode(symbolic_helper._maybe_get_const(aligned, 'b')),
                mode_s='avg', output_height_i=symbolic_helper._maybe_get_const(output_height, 'i'),
                output_width_i=symbolic_helper._maybe_get_const(output_width, 'i'),
                sampling_ratio_i=symbolic_helper._maybe_get_const(sampling_ratio, 'i'),
                spatial_scale_f=symbolic_helper._maybe_get_const(spatial_scale, 'f'))


#: For ``torch.onnx.export(dynamo=True, custom_translation_table=...)``.
ONNX_TRANSLATIONS = {
    torch.ops.mmdat.nms_indices.default: _nms_onnxscript,
    torch.ops.mmdat.roi_align.default: _roi_align_onnxscript,
}


def register_torchscript_symbolics(opset: int) -> None:
    """Teach the TorchScript exporter to write :func:`nms_indices` as ``NonMaxSuppression`` and
    :func:`roi_align` as ``RoiAlign``."""
    torch.onnx.register_custom_op_symbolic('mmdat::nms_indices', _nms_torchscript, opset)
    torch.onnx.register_custom_op_symbolic('mmdat::roi_align', _roi_align_torchscript, opset)
