"""Whole models with their post-processing, as modules that the ONNX exporters can record: a
batch of preprocessed images in (what the model's data preprocessor gives: normalised, padded),
final predictions out, in the coordinates of that input.

- Single-stage detectors (mmdet dense heads with anchors, e.g. RetinaNet): a second input
  ``image_sizes (B, 2)`` (int64), the height and width of each image inside the padded batch, to
  which boxes are clipped as mmdet clips them; out come ``boxes (B, M, 4)`` ``(x1, y1, x2, y2)``,
  ``scores (B, M)``, ``labels (B, M)`` after mmdet's per-class NMS, with ``M`` the test
  config's ``max_per_img``; unused rows have score 0 and label -1.
- Segmentors (mmseg encoder-decoders, ``whole`` inference): ``seg_map (B, H, W)``, the class of
  every input pixel.

Each step calls mmdet's or mmseg's own pieces (anchor generator, box coder, heads, resize) and
reads the thresholds from the model's ``test_cfg``; only the per-image loops of mmdet are
replaced by batched tensor operations of the same meaning.
"""
import math
from typing import Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .ops import nms_indices

#: Names of the ONNX inputs and outputs, by kind of model.
DETECTION_INPUTS = ('inputs', 'image_sizes')
DETECTION_OUTPUTS = ('boxes', 'scores', 'labels')
SEGMENTATION_INPUTS = ('inputs', )
SEGMENTATION_OUTPUTS = ('seg_map', )


def full_image_sizes(inputs: Tensor) -> Tensor:
    """``image_sizes`` for a batch of unpadded images: each the whole input, ``(B, 2)`` int64."""
    return torch.tensor(inputs.shape[2:], dtype=torch.int64).expand(inputs.shape[0], 2).clone()


class UnsupportedModelError(ValueError):
    """A model, or a part of it, that :func:`build_predict_module` cannot export; one line."""


def _only_nms(nms_cfg, where: str) -> Tuple[float, bool]:
    """``(iou_threshold, class_agnostic)`` of an mmcv ``nms`` config; other kinds are refused."""
    if nms_cfg is None:
        raise UnsupportedModelError(f'{where}: test_cfg has no nms; exports need one')
    kind = nms_cfg.get('type', 'nms')
    if kind != 'nms':
        raise UnsupportedModelError(f"{where}: test_cfg nms type {kind!r} has no ONNX operator "
                                    "(only 'nms' is exported)")
    return float(nms_cfg['iou_threshold']), bool(nms_cfg.get('class_agnostic', False))


def batched_class_nms(boxes: Tensor, scores: Tensor, labels: Tensor, iou_threshold: float,
                      score_threshold: float, max_per_img: int,
                      class_agnostic: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    """mmcv's ``batched_nms`` (boxes of different classes never suppress each other: each class
    is moved by ``label * (largest coordinate + 1)``, per image as mmcv does) for a batch,
    keeping the ``max_per_img`` best of each image.

    Args:
        boxes (Tensor): ``(B, K, 4)`` candidate boxes.
        scores (Tensor): ``(B, K)`` their scores; only those above ``score_threshold`` count.
        labels (Tensor): ``(B, K)`` their classes (int64).
        iou_threshold (float): Overlap above which the lower-scored box is dropped.
        score_threshold (float): See ``scores``.
        max_per_img (int): Rows of the outputs.
        class_agnostic (bool): Suppress across classes too. Defaults to False.

    Returns:
        tuple[Tensor]: ``boxes (B, M, 4)``, ``scores (B, M)``, ``labels (B, M)`` with
        ``M = max_per_img``, best first; rows left over have score 0 and label -1.
    """
    batch = boxes.shape[0]
    if class_agnostic:
        boxes_for_nms = boxes
    else:
        largest = boxes.flatten(1).amax(1)  # (B,)
        boxes_for_nms = boxes + (labels.to(boxes.dtype) * (largest[:, None] + 1))[..., None]
    kept = nms_indices(boxes_for_nms, scores[:, None], max_per_img, iou_threshold, score_threshold)
    image, index = kept[:, 0], kept[:, 2]
    # the rank of each kept box within its image: ONNX lists them by image, best first
    one_hot = (image[:, None] == torch.arange(batch, device=boxes.device)[None]).to(torch.int64)
    counts = one_hot.sum(0)
    starts = counts.cumsum(0) - counts
    rank = torch.arange(kept.shape[0], device=boxes.device) - starts[image]
    row = image * max_per_img + rank
    out_boxes = boxes.new_zeros((batch * max_per_img, 4)).index_put((row, ), boxes[image, index])
    out_scores = scores.new_zeros((batch * max_per_img, )).index_put((row, ), scores[image, index])
    out_labels = labels.new_full((batch * max_per_img, ), -1).index_put((row, ), labels[image, index])
    return (out_boxes.view(batch, max_per_img, 4), out_scores.view(batch, max_per_img),
            out_labels.view(batch, max_per_img))


class SingleStageDetectorPredict(nn.Module):
    """An mmdet single-stage detector with an anchor-based dense head, through NMS.

    Args:
        detector (nn.Module): The detector (eval mode), e.g. RetinaNet.
    """

    input_names = DETECTION_INPUTS
    output_names = DETECTION_OUTPUTS

    def __init__(self, detector: nn.Module):
        super().__init__()
        from mmdet.models.dense_heads.base_dense_head import BaseDenseHead
        head = detector.bbox_head
        name = type(head).__name__
        # heads that change the generic post-processing (score factors, other box codings)
        # would be exported wrongly by the generic steps below
        if (type(head).predict_by_feat is not BaseDenseHead.predict_by_feat
                or type(head)._predict_by_feat_single is not BaseDenseHead._predict_by_feat_single
                or type(head)._bbox_post_process is not BaseDenseHead._bbox_post_process):
            raise UnsupportedModelError(f'bbox_head {name}: its own post-processing is not exported '
                                        '(only the generic one of anchor heads such as RetinaHead)')
        if not hasattr(head, 'prior_generator') or not hasattr(head, 'bbox_coder') \
                or getattr(head.bbox_coder, 'encode_size', 4) != 4:
            raise UnsupportedModelError(f'bbox_head {name}: only heads with anchors and a 4-number '
                                        'box coding are exported')
        if getattr(head.loss_cls, 'custom_cls_channels', False):
            raise UnsupportedModelError(f'bbox_head {name}: custom classification channels are not exported')
        cfg = head.test_cfg
        self.iou_threshold, self.class_agnostic = _only_nms(cfg.get('nms'), f'bbox_head {name}')
        self.detector = detector
        self.score_thr = float(cfg.get('score_thr', 0.0))
        self.nms_pre = int(cfg.get('nms_pre', -1))
        self.max_per_img = int(cfg.get('max_per_img', 100))
        self.min_bbox_size = float(cfg.get('min_bbox_size', -1))

    def forward(self, inputs: Tensor, image_sizes: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """Detections of a batch.

        Args:
            inputs (Tensor): ``(B, 3, H, W)`` preprocessed images.
            image_sizes (Tensor): ``(B, 2)`` height and width of each image without its padding.
        """
        head = self.detector.bbox_head
        cls_scores, bbox_preds = head(self.detector.extract_feat(inputs))
        batch, num_classes = inputs.shape[0], head.cls_out_channels
        priors = head.prior_generator.grid_priors([c.shape[-2:] for c in cls_scores],
                                                  dtype=inputs.dtype, device=inputs.device)
        level_boxes, level_scores, level_labels = [], [], []
        for cls_score, bbox_pred, level_priors in zip(cls_scores, bbox_preds, priors):
            logits = cls_score.permute(0, 2, 3, 1).reshape(batch, -1, num_classes)
            if head.use_sigmoid_cls:
                scores = logits.sigmoid()
            else:  # the last class is the background
                scores = logits.softmax(-1)[..., :-1]
                num_classes = scores.shape[-1]
            deltas = bbox_pred.permute(0, 2, 3, 1).reshape(batch, -1, 4)
            level_priors = level_priors.tensor if hasattr(level_priors, 'tensor') else level_priors
            if self.nms_pre > 0:
                # mmdet keeps the nms_pre best (prior, class) pairs above score_thr; padding
                # with priors that score -1 makes nms_pre pairs exist at any size (no shape
                # test in the graph), and NMS drops them by score_thr
                pad = math.ceil(self.nms_pre / num_classes)
                scores = torch.cat([scores, scores.new_full((batch, pad, num_classes), -1.0)], 1)
                deltas = torch.cat([deltas, deltas.new_zeros((batch, pad, 4))], 1)
                level_priors = torch.cat([level_priors, level_priors.new_zeros((pad, 4))], 0)
                scores, pairs = scores.flatten(1).topk(self.nms_pre, dim=1)
            else:
                pairs = torch.arange(scores[0].numel(), device=inputs.device).expand(batch, -1)
                scores = scores.flatten(1)
            prior_index = torch.div(pairs, num_classes, rounding_mode='floor')
            level_labels.append(pairs - prior_index * num_classes)
            level_scores.append(scores)
            deltas = deltas.gather(1, prior_index[..., None].expand(-1, -1, 4))
            boxes = head.bbox_coder.decode(level_priors[prior_index].flatten(0, 1), deltas.flatten(0, 1))
            boxes = boxes.tensor if hasattr(boxes, 'tensor') else boxes
            level_boxes.append(boxes.view(batch, -1, 4))
        boxes, scores, labels = (torch.cat(level_boxes, 1), torch.cat(level_scores, 1),
                                 torch.cat(level_labels, 1))
        # mmdet clips while decoding, to the image's size without the padding
        upper = image_sizes.flip(-1).repeat(1, 2).to(boxes.dtype)[:, None]  # (B, 1, 4): w, h, w, h
        boxes = torch.minimum(boxes.clamp(min=0), upper)
        if self.min_bbox_size >= 0:
            big_enough = ((boxes[..., 2] - boxes[..., 0] > self.min_bbox_size)
                          & (boxes[..., 3] - boxes[..., 1] > self.min_bbox_size))
            scores = torch.where(big_enough, scores, scores.new_full((), -1.0))
        return batched_class_nms(boxes, scores, labels, self.iou_threshold, self.score_thr,
                                 self.max_per_img, self.class_agnostic)


class IntegerUpsample(nn.Module):
    """mmseg's ``Upsample`` by a whole ``scale_factor``, with the output size computed from the
    input's without ``int()``, which makes both exporters freeze the size of the example input
    (Semantic FPN's head then only runs at the export size).

    Args:
        upsample (nn.Module): The mmseg ``Upsample`` to replace (``size`` unset).
    """

    def __init__(self, upsample: nn.Module):
        super().__init__()
        factor = upsample.scale_factor
        if isinstance(factor, tuple) or factor is None or float(factor) != int(factor):
            raise UnsupportedModelError(f'Upsample by {factor}: only whole scale factors are exported')
        self.factor = int(factor)
        self.mode = upsample.mode
        self.align_corners = upsample.align_corners

    def forward(self, x: Tensor) -> Tensor:
        size = [x.shape[-2] * self.factor, x.shape[-1] * self.factor]
        return F.interpolate(x, size=size, mode=self.mode, align_corners=self.align_corners)


class ShapeAdaptiveAvgPool(nn.Module):
    """``nn.AdaptiveAvgPool2d`` as two averaging matrices built from the input's size with tensor
    ops. Both exporters write adaptive pooling as an ``AveragePool`` whose kernel and stride come
    from the example input's size (or, TorchScript, refuse a dynamic one), which is wrong at
    sizes that do not divide alike; UperNet's pyramid pooling has such pools.

    Args:
        pool (nn.AdaptiveAvgPool2d): The pool to replace.
    """

    def __init__(self, pool: nn.AdaptiveAvgPool2d):
        super().__init__()
        size = pool.output_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        if None in size:
            raise UnsupportedModelError(f'AdaptiveAvgPool2d({pool.output_size}): a size of None is not exported')
        self.output_size = size

    @staticmethod
    def averaging(length, bins: int, like: Tensor) -> Tensor:
        """``(bins, length)``: row ``i`` averages ``[floor(i L / bins), ceil((i + 1) L / bins))``,
        PyTorch's adaptive pooling windows."""
        index = torch.arange(bins, device=like.device)[:, None]
        position = torch.arange(length, device=like.device)[None]
        start = torch.div(index * length, bins, rounding_mode='floor')
        end = torch.div((index + 1) * length + bins - 1, bins, rounding_mode='floor')
        inside = ((position >= start) & (position < end)).to(like.dtype)
        return inside / inside.sum(1, keepdim=True)

    def forward(self, x: Tensor) -> Tensor:
        rows = self.averaging(x.shape[-2], self.output_size[0], x)
        cols = self.averaging(x.shape[-1], self.output_size[1], x)
        return torch.matmul(torch.matmul(rows, x), cols.transpose(0, 1))


class SegmentorPredict(nn.Module):
    """An mmseg encoder-decoder in ``whole`` mode: the class of every input pixel.

    Args:
        segmentor (nn.Module): The segmentor (eval mode), e.g. UperNet or Semantic FPN.
    """

    input_names = SEGMENTATION_INPUTS
    output_names = SEGMENTATION_OUTPUTS

    def __init__(self, segmentor: nn.Module):
        super().__init__()
        mode = segmentor.test_cfg.get('mode', 'whole') if segmentor.test_cfg else 'whole'
        if mode != 'whole':
            raise UnsupportedModelError(f"test_cfg mode {mode!r}: only 'whole' inference is exported")
        from mmseg.models.utils import Upsample
        for parent in list(segmentor.modules()):
            for name, child in parent.named_children():
                if isinstance(child, Upsample) and not child.size:
                    setattr(parent, name, IntegerUpsample(child))
                elif isinstance(child, nn.AdaptiveAvgPool2d):
                    setattr(parent, name, ShapeAdaptiveAvgPool(child))
        self.segmentor = segmentor

    def forward(self, inputs: Tensor) -> Tensor:
        head = self.segmentor.decode_head
        logits = head(self.segmentor.extract_feat(inputs))
        # mmseg's decode head resizes to the input's size, then the class is the best logit
        logits = F.interpolate(logits, size=inputs.shape[2:], mode='bilinear',
                               align_corners=head.align_corners)
        if logits.shape[1] == 1:  # one output channel: a threshold on the sigmoid
            return (logits[:, 0].sigmoid() > head.threshold).to(torch.int64)
        return logits.argmax(1)


def build_predict_module(model: nn.Module) -> nn.Module:
    """The predict module of an mmdet/mmseg model (eval mode), or :class:`UnsupportedModelError`
    naming the part that cannot be exported."""
    from mmdet.models.detectors import SingleStageDetector, TwoStageDetector
    from mmseg.models.segmentors import CascadeEncoderDecoder, EncoderDecoder
    name = type(model).__name__
    if isinstance(model, SingleStageDetector):
        return SingleStageDetectorPredict(model).eval()
    if isinstance(model, TwoStageDetector):
        raise UnsupportedModelError(f'{name}: two-stage detectors are not exported with --part predict yet')
    if isinstance(model, CascadeEncoderDecoder):
        raise UnsupportedModelError(f'{name}: cascade segmentors are not exported with --part predict')
    if isinstance(model, EncoderDecoder):
        return SegmentorPredict(model).eval()
    raise UnsupportedModelError(f'{name}: not a detector or segmentor that --part predict exports')


def box_iou(boxes1: np.ndarray, boxes2: np.ndarray) -> np.ndarray:
    """``(N, M)`` IoU of corner boxes ``(N, 4)`` and ``(M, 4)``, with mmcv's areas (no +1)."""
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
    low = np.maximum(boxes1[:, None, :2], boxes2[None, :, :2])
    high = np.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])
    inter = np.clip(high - low, 0, None).prod(-1)
    return inter / np.maximum(area1[:, None] + area2[None] - inter, 1e-12)


def unmatched_detections(expected: Sequence[np.ndarray], actual: Sequence[np.ndarray],
                         min_score: float = 0.0, min_iou: float = 0.99) -> Tuple[int, int]:
    """How many detections of one image are not found in another set of detections.

    Args:
        expected (Sequence[ndarray]): ``boxes (N, 4)``, ``scores (N,)``, ``labels (N,)``.
        actual (Sequence[ndarray]): The same for the detections to search.
        min_score (float): Only expected detections scoring above this count.
        min_iou (float): A match is an actual box of the same class with at least this IoU.

    Returns:
        tuple[int, int]: Expected detections (above ``min_score``) without a match, and
        expected detections counted.
    """
    boxes, scores, labels = (np.asarray(a) for a in expected)
    found_boxes, found_labels = np.asarray(actual[0]), np.asarray(actual[2])
    counted = (scores > min_score) & (labels >= 0)
    boxes, labels = boxes[counted], labels[counted]
    if len(boxes) == 0:
        return 0, 0
    if len(found_boxes) == 0:
        return len(boxes), len(boxes)
    overlap = box_iou(boxes, found_boxes) * (labels[:, None] == found_labels[None])
    return int((overlap.max(1) < min_iou).sum()), len(boxes)


def match_predictions(expected: Sequence[np.ndarray], actual: Sequence[np.ndarray]) -> float:
    """The fraction of a batch's predictions that ``actual`` misses.

    Detections (``boxes``, ``scores``, ``labels`` of :data:`DETECTION_OUTPUTS`): expected
    detections (label >= 0) without an actual one of the same class at IoU >= 0.99. Class maps
    (``seg_map``): pixels whose class differs.
    """
    if len(expected) == len(SEGMENTATION_OUTPUTS):
        return float((np.asarray(expected[0]) != np.asarray(actual[0])).mean())
    missed = total = 0
    for image in range(len(expected[0])):
        image_missed, image_total = unmatched_detections([e[image] for e in expected],
                                                         [a[image] for a in actual])
        missed, total = missed + image_missed, total + image_total
    return missed / max(total, 1)
