"""Whole models with their post-processing, as modules that the ONNX exporters can record: a
batch of preprocessed images in (what the model's data preprocessor gives: normalised, padded),
final predictions out, in the coordinates of that input.

- Single-stage detectors (mmdet dense heads with anchors, e.g. RetinaNet): a second input
  ``image_sizes (B, 2)`` (int64), the height and width of each image inside the padded batch, to
  which boxes are clipped as mmdet clips them; out come ``boxes (B, M, 4)`` ``(x1, y1, x2, y2)``,
  ``scores (B, M)``, ``labels (B, M)`` after mmdet's per-class NMS, with ``M`` the test
  config's ``max_per_img``; unused rows have score 0 and label -1.
- Two-stage detectors with masks (Mask R-CNN, Cascade Mask R-CNN): the same inputs and
  outputs, and ``masks (B, M, 28, 28)``, each box's class probability on the mask head's grid
  over the box (see :class:`TwoStageDetectorPredict`).
- Segmentors (mmseg encoder-decoders, ``whole`` inference): ``seg_map (B, H, W)``, the class of
  every input pixel.

Each step calls mmdet's or mmseg's own pieces (anchor generator, box coder, heads, RoI level
mapping, resize) and
reads the thresholds from the model's ``test_cfg``; only the per-image loops of mmdet are
replaced by batched tensor operations of the same meaning.
"""
import math
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .ops import ROI_ALIGN_MIN_OPSET, nms_indices, roi_align

#: Names of the ONNX inputs and outputs, by kind of model.
DETECTION_INPUTS = ('inputs', 'image_sizes')
DETECTION_OUTPUTS = ('boxes', 'scores', 'labels')
INSTANCE_OUTPUTS = DETECTION_OUTPUTS + ('masks', )
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


def clip_to_images(boxes: Tensor, image_sizes: Tensor) -> Tensor:
    """Boxes ``(B, ..., 4)`` clipped to each image's ``image_sizes (B, 2)`` (height, width), as
    mmdet's box coders clip with ``max_shape``."""
    upper = image_sizes.flip(-1).repeat(1, 2).to(boxes.dtype)  # (B, 4): w, h, w, h
    upper = upper.view(boxes.shape[0], *([1] * (boxes.dim() - 2)), 4)
    return torch.minimum(boxes.clamp(min=0), upper)


def check_dense_head(head: nn.Module, where: str, base: type) -> None:
    """Refuse a dense head whose post-processing differs from ``base``'s, or that the
    generic steps of :func:`dense_candidates` cannot decode."""
    name = type(head).__name__
    # heads that change the generic post-processing (score factors, other box codings)
    # would be exported wrongly by the generic steps below
    if (type(head).predict_by_feat is not base.predict_by_feat
            or type(head)._predict_by_feat_single is not base._predict_by_feat_single
            or type(head)._bbox_post_process is not base._bbox_post_process):
        raise UnsupportedModelError(f'{where} {name}: its own post-processing is not exported '
                                    f'(only the generic one of {base.__name__})')
    if not hasattr(head, 'prior_generator') or not hasattr(head, 'bbox_coder') \
            or getattr(head.bbox_coder, 'encode_size', 4) != 4:
        raise UnsupportedModelError(f'{where} {name}: only heads with anchors and a 4-number '
                                    'box coding are exported')
    if getattr(head.loss_cls, 'custom_cls_channels', False):
        raise UnsupportedModelError(f'{where} {name}: custom classification channels are not exported')


def dense_candidates(head: nn.Module, feats: Sequence[Tensor], image_sizes: Tensor, nms_pre: int,
                     min_bbox_size: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The candidates of an anchor head before NMS, as mmdet's dense heads (RetinaHead, RPNHead)
    make them: per level the ``nms_pre`` best (anchor, class) pairs, decoded and clipped to the
    image; boxes not wider and taller than ``min_bbox_size`` (when >= 0) score -1.

    Returns:
        tuple[Tensor]: ``boxes (B, K, 4)``, ``scores (B, K)``, ``labels (B, K)`` (classes),
        ``levels (B, K)`` (the level of each candidate).
    """
    cls_scores, bbox_preds = head(feats)
    batch, num_classes = image_sizes.shape[0], head.cls_out_channels
    priors = head.prior_generator.grid_priors([c.shape[-2:] for c in cls_scores],
                                              dtype=cls_scores[0].dtype, device=cls_scores[0].device)
    level_boxes, level_scores, level_labels, level_ids = [], [], [], []
    for level, (cls_score, bbox_pred, level_priors) in enumerate(zip(cls_scores, bbox_preds, priors)):
        logits = cls_score.permute(0, 2, 3, 1).reshape(batch, -1, num_classes)
        if head.use_sigmoid_cls:
            scores = logits.sigmoid()
        else:  # the last class is the background
            scores = logits.softmax(-1)[..., :-1]
            num_classes = scores.shape[-1]
        deltas = bbox_pred.permute(0, 2, 3, 1).reshape(batch, -1, 4)
        level_priors = level_priors.tensor if hasattr(level_priors, 'tensor') else level_priors
        if nms_pre > 0:
            # mmdet keeps the nms_pre best (prior, class) pairs; padding with priors that score
            # -1 makes nms_pre pairs exist at any size (no shape test in the graph), and NMS
            # drops them by its score threshold
            pad = math.ceil(nms_pre / num_classes)
            scores = torch.cat([scores, scores.new_full((batch, pad, num_classes), -1.0)], 1)
            deltas = torch.cat([deltas, deltas.new_zeros((batch, pad, 4))], 1)
            level_priors = torch.cat([level_priors, level_priors.new_zeros((pad, 4))], 0)
            scores, pairs = scores.flatten(1).topk(nms_pre, dim=1)
        else:
            pairs = torch.arange(scores[0].numel(), device=scores.device).expand(batch, -1)
            scores = scores.flatten(1)
        prior_index = torch.div(pairs, num_classes, rounding_mode='floor')
        level_labels.append(pairs - prior_index * num_classes)
        level_scores.append(scores)
        level_ids.append(torch.full_like(pairs, level))
        deltas = deltas.gather(1, prior_index[..., None].expand(-1, -1, 4))
        boxes = head.bbox_coder.decode(level_priors[prior_index].flatten(0, 1), deltas.flatten(0, 1))
        boxes = boxes.tensor if hasattr(boxes, 'tensor') else boxes
        level_boxes.append(boxes.view(batch, -1, 4))
    boxes = clip_to_images(torch.cat(level_boxes, 1), image_sizes)
    scores = torch.cat(level_scores, 1)
    if min_bbox_size >= 0:
        big_enough = ((boxes[..., 2] - boxes[..., 0] > min_bbox_size)
                      & (boxes[..., 3] - boxes[..., 1] > min_bbox_size))
        scores = torch.where(big_enough, scores, scores.new_full((), -1.0))
    return boxes, scores, torch.cat(level_labels, 1), torch.cat(level_ids, 1)


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
        check_dense_head(head, 'bbox_head', BaseDenseHead)
        cfg = head.test_cfg
        self.iou_threshold, self.class_agnostic = _only_nms(cfg.get('nms'), f'bbox_head {type(head).__name__}')
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
        boxes, scores, labels, _ = dense_candidates(self.detector.bbox_head, self.detector.extract_feat(inputs),
                                                    image_sizes, self.nms_pre, self.min_bbox_size)
        return batched_class_nms(boxes, scores, labels, self.iou_threshold, self.score_thr,
                                 self.max_per_img, self.class_agnostic)


def to_rois(boxes: Tensor) -> Tensor:
    """mmdet's ``bbox2roi`` of a batch: ``(B, N, 4)`` boxes as ``(B * N, 5)`` rows
    ``(image index, x1, y1, x2, y2)``."""
    index = torch.arange(boxes.shape[0], device=boxes.device, dtype=boxes.dtype)
    return torch.cat([index[:, None, None].expand(-1, boxes.shape[1], 1), boxes], -1).flatten(0, 1)


def check_roi_extractor(extractor: nn.Module, where: str) -> None:
    """Refuse a RoI extractor that :func:`roi_features` does not compute as mmdet does."""
    from mmcv.ops import RoIAlign
    from mmdet.models.roi_heads.roi_extractors import SingleRoIExtractor
    name = type(extractor).__name__
    if type(extractor) is not SingleRoIExtractor:
        raise UnsupportedModelError(f'{where} {name}: only SingleRoIExtractor is exported')
    for layer in extractor.roi_layers:
        if type(layer) is not RoIAlign or layer.pool_mode != 'avg':
            raise UnsupportedModelError(f'{where} {name}: only RoIAlign with average pooling is exported, '
                                        f'not {type(layer).__name__}')


def roi_features(extractor: nn.Module, feats: Sequence[Tensor], rois: Tensor) -> Tensor:
    """mmdet's ``SingleRoIExtractor``: each RoI pooled from the level that its size maps to
    (``finest_scale``). Every level pools every RoI and the RoI's own level is selected (no
    data-dependent branches in the graph); at the other levels the RoI is a box of size 0,
    which costs one sampling point a bin instead of a large box's many at a fine level."""
    feats = feats[:extractor.num_inputs]
    levels = extractor.map_roi_levels(rois, len(feats))
    pooled = None
    for level, (feat, layer) in enumerate(zip(feats, extractor.roi_layers)):
        here = (levels == level)[:, None]
        level_rois = torch.cat([rois[:, :1], torch.where(here, rois[:, 1:], rois.new_zeros(()))], 1)
        out = roi_align(feat, level_rois, layer.output_size[0], layer.output_size[1], float(layer.spatial_scale),
                        int(layer.sampling_ratio), bool(layer.aligned))
        pooled = out if pooled is None else torch.where(here[..., None, None], out, pooled)
    return pooled


#: The RPN's NMS keeps candidates scoring above this: every sigmoid score (mmdet's RPN has no
#: threshold), none of the candidates that :func:`dense_candidates` drops with a score of -1.
RPN_SCORE_THR = -0.5


class TwoStageDetectorPredict(nn.Module):
    """An mmdet two-stage detector with masks (Mask R-CNN, Cascade Mask R-CNN) through its RoI
    head's NMS and mask head.

    As mmdet's ``predict``: the RPN's proposals (``nms_pre`` best anchors a level, NMS with the
    levels as classes, ``max_per_img`` kept); then per stage RoI features from the level of each
    box, the box head, and (Cascade) the boxes refined by the stage's regression of their best
    class; the class scores (Cascade: the stages' logits averaged) through a softmax,
    class-specific boxes decoded, clipped and NMSed per class (``score_thr``, ``max_per_img``);
    then the mask head on the kept boxes (Cascade: every stage's, the probabilities averaged).

    Outputs ``boxes (B, M, 4)``, ``scores (B, M)``, ``labels (B, M)`` as
    :class:`SingleStageDetectorPredict`'s, and ``masks (B, M, h, w)``: the probability (after
    the sigmoid) of the box's class in each cell of the mask head's grid over the box (mmdet
    pastes it into the image and binarises it at ``mask_thr_binary``; see
    :mod:`mmdat.deployment.runtime`).

    Args:
        detector (nn.Module): The detector (eval mode).
    """

    input_names = DETECTION_INPUTS
    output_names = INSTANCE_OUTPUTS
    #: ONNX ``RoiAlign`` with mmcv's ``aligned`` needs opset 16.
    min_opset = ROI_ALIGN_MIN_OPSET

    def __init__(self, detector: nn.Module):
        super().__init__()
        from mmdet.models.dense_heads import RPNHead
        from mmdet.models.roi_heads import CascadeRoIHead, StandardRoIHead
        from mmdet.models.roi_heads.bbox_heads import BBoxHead, ConvFCBBoxHead
        from mmdet.models.roi_heads.mask_heads import FCNMaskHead
        rpn, roi = detector.rpn_head, detector.roi_head
        if type(rpn) is not RPNHead:
            raise UnsupportedModelError(f'rpn_head {type(rpn).__name__}: only RPNHead is exported')
        check_dense_head(rpn, 'rpn_head', RPNHead)
        if type(roi) not in (StandardRoIHead, CascadeRoIHead):
            raise UnsupportedModelError(f'roi_head {type(roi).__name__}: only StandardRoIHead and '
                                        'CascadeRoIHead are exported')
        where = f'roi_head {type(roi).__name__}'
        if not roi.with_mask:
            raise UnsupportedModelError(f'{where}: only RoI heads with a mask head are exported')
        if roi.with_shared_head:
            raise UnsupportedModelError(f'{where}: a shared head is not exported')
        cascade = type(roi) is CascadeRoIHead
        stages = roi.num_stages if cascade else 1
        as_list = (lambda m: list(m)) if cascade else (lambda m: [m])
        self.bbox_extractors, self.bbox_heads = as_list(roi.bbox_roi_extractor), as_list(roi.bbox_head)
        self.mask_extractors, self.mask_heads = as_list(roi.mask_roi_extractor), as_list(roi.mask_head)
        if cascade and len(self.mask_heads) != stages:
            raise UnsupportedModelError(f'{where}: one mask head a stage is exported, got {len(self.mask_heads)} '
                                        f'for {stages} stages')
        for extractor in self.bbox_extractors + self.mask_extractors:
            check_roi_extractor(extractor, where)
        for head in self.bbox_heads:
            name = type(head).__name__
            # a forward of another signature or outputs, or another post-processing, would be
            # exported wrongly
            if (not isinstance(head, BBoxHead) or type(head).forward not in (BBoxHead.forward, ConvFCBBoxHead.forward)
                    or type(head)._predict_by_feat_single is not BBoxHead._predict_by_feat_single
                    or type(head).regress_by_class is not BBoxHead.regress_by_class):
                raise UnsupportedModelError(f'{where} bbox_head {name}: only the forward and post-processing '
                                            'of BBoxHead and ConvFCBBoxHead (Shared2FC, Shared4Conv1FC) are exported')
            if head.custom_cls_channels or getattr(head, 'custom_activation', False) \
                    or head.bbox_coder.encode_size != 4:
                raise UnsupportedModelError(f'{where} bbox_head {name}: custom classification channels or '
                                            'box codings are not exported')
        for head in self.mask_heads:
            if not isinstance(head, FCNMaskHead) or type(head).forward is not FCNMaskHead.forward or \
                    type(head)._predict_by_feat_single is not FCNMaskHead._predict_by_feat_single:
                raise UnsupportedModelError(f'{where} mask_head {type(head).__name__}: only the forward and '
                                            'post-processing of FCNMaskHead are exported')
        rpn_cfg, rcnn_cfg = rpn.test_cfg, roi.test_cfg
        self.rpn_iou, self.rpn_class_agnostic = _only_nms(rpn_cfg.get('nms'), f'rpn_head {type(rpn).__name__}')
        self.rpn_nms_pre = int(rpn_cfg.get('nms_pre', -1))
        self.rpn_max_per_img = int(rpn_cfg['max_per_img'])
        self.rpn_min_bbox_size = float(rpn_cfg.get('min_bbox_size', -1))
        self.iou_threshold, self.class_agnostic = _only_nms(rcnn_cfg.get('nms'), where)
        self.score_thr = float(rcnn_cfg['score_thr'])
        self.max_per_img = int(rcnn_cfg['max_per_img'])
        self.detector = detector

    def forward(self, inputs: Tensor, image_sizes: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """Detections and masks of a batch (inputs as :class:`SingleStageDetectorPredict`'s)."""
        feats = self.detector.extract_feat(inputs)
        # proposals: mmdet's RPN keeps every box (no score threshold) but the small ones; level
        # ids are NMS's classes, so that levels do not suppress each other
        boxes, scores, _, levels = dense_candidates(self.detector.rpn_head, feats, image_sizes,
                                                    self.rpn_nms_pre, self.rpn_min_bbox_size)
        proposals, _, levels = batched_class_nms(boxes, scores, levels, self.rpn_iou, RPN_SCORE_THR,
                                                 self.rpn_max_per_img, self.rpn_class_agnostic)
        batch, count = proposals.shape[:2]
        stage_logits = []
        for stage, (extractor, head) in enumerate(zip(self.bbox_extractors, self.bbox_heads)):
            logits, deltas = head(roi_features(extractor, feats, to_rois(proposals)))
            stage_logits.append(logits)
            if stage < len(self.bbox_heads) - 1:  # Cascade: the boxes of the best class, refined
                best = logits[:, :-1].argmax(1)
                deltas = deltas.view(batch * count, -1, 4)
                if not head.reg_class_agnostic:
                    deltas = deltas.gather(1, best[:, None, None].expand(-1, 1, 4))
                refined = head.bbox_coder.decode(proposals.flatten(0, 1), deltas[:, 0])
                proposals = clip_to_images(refined.view(batch, count, 4), image_sizes)
        # Cascade averages the stages' logits, then the last head decodes as a single stage
        logits = stage_logits[0] if len(stage_logits) == 1 else sum(stage_logits) / float(len(stage_logits))
        scores = logits.softmax(-1)[:, :-1].view(batch, count, -1)
        num_classes = scores.shape[-1]
        last = self.bbox_heads[-1]  # its deltas are the loop's last
        groups = 1 if last.reg_class_agnostic else num_classes
        boxes = last.bbox_coder.decode(proposals.repeat_interleave(groups, dim=1).flatten(0, 1),
                                       deltas.reshape(-1, 4))
        boxes = clip_to_images(boxes.view(batch, count, groups, 4), image_sizes).expand(-1, -1, num_classes, -1)
        # proposals padded after the RPN's NMS are no candidates
        scores = torch.where((levels >= 0)[..., None], scores, scores.new_full((), -1.0))
        labels = torch.arange(num_classes, device=inputs.device).expand(batch, count, -1)
        boxes, scores, labels = batched_class_nms(boxes.flatten(1, 2), scores.flatten(1), labels.flatten(1),
                                                  self.iou_threshold, self.score_thr, self.max_per_img,
                                                  self.class_agnostic)
        mask_rois = to_rois(boxes)
        probabilities = torch.stack([
            head(roi_features(extractor, feats, mask_rois)).sigmoid()
            for extractor, head in zip(self.mask_extractors, self.mask_heads)
        ]).mean(0)
        if not self.mask_heads[-1].class_agnostic:
            index = labels.clamp(min=0).flatten()[:, None, None, None].expand(-1, 1, *probabilities.shape[2:])
            probabilities = probabilities.gather(1, index)
        masks = probabilities.view(batch, self.max_per_img, *probabilities.shape[2:])
        masks = torch.where((labels >= 0)[..., None, None], masks, masks.new_zeros(()))
        return boxes, scores, labels, masks


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
        return TwoStageDetectorPredict(model).eval()
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


def mask_iou(masks1: np.ndarray, masks2: np.ndarray) -> np.ndarray:
    """``(N, M)`` IoU of boolean masks ``(N, h, w)`` and ``(M, h, w)``; two empty masks have 1."""
    a = masks1.reshape(len(masks1), -1).astype(np.float64)
    b = masks2.reshape(len(masks2), -1).astype(np.float64)
    inter = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None] - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


#: Mask grids (``masks`` of :data:`INSTANCE_OUTPUTS`) are compared binarised at this probability.
MASK_COMPARE_THRESHOLD = 0.5
#: The smallest IoU of two binarised mask grids that :func:`unmatched_detections` calls a match.
MASK_MIN_IOU = 0.9
#: Expected mask probabilities this close to :data:`MASK_COMPARE_THRESHOLD` are undecided: float
#: rounding alone binarises them either way, so the mask IoU leaves them out.
MASK_UNDECIDED = 1e-4
#: An expected detection that scores this close to the lowest-scored actual one lies at the cut of
#: the top-k (``max_per_img``): a rounding difference decides which of two boxes of nearly equal
#: score is kept, so it is not counted as missed when unmatched.
SCORE_AT_CUT = 1e-4


def unmatched_detections(expected: Sequence[np.ndarray], actual: Sequence[np.ndarray],
                         min_score: float = 0.0, min_iou: float = 0.99,
                         top_k: Optional[int] = None) -> Tuple[int, int]:
    """How many detections of one image are not found in another set of detections.

    Args:
        expected (Sequence[ndarray]): ``boxes (N, 4)``, ``scores (N,)``, ``labels (N,)`` and,
            optionally, ``masks (N, h, w)`` (probabilities on a grid over each box, or masks
            of the image).
        actual (Sequence[ndarray]): The same for the detections to search.
        min_score (float): Only expected detections scoring above this count.
        min_iou (float): A match is an actual box of the same class with at least this IoU
            (with masks: whose mask, binarised at :data:`MASK_COMPARE_THRESHOLD`, also has an
            IoU of at least :data:`MASK_MIN_IOU` with the expected one, over the pixels that are
            not undecided, :data:`MASK_UNDECIDED`).
        top_k (int, optional): How many detections the model keeps of an image
            (``max_per_img``). When ``actual`` holds that many, an unmatched expected detection
            within :data:`SCORE_AT_CUT` of its lowest score lies at the cut and is not counted as
            missed.

    Returns:
        tuple[int, int]: Expected detections (above ``min_score``) without a match, and
        expected detections counted.
    """
    boxes, scores, labels = (np.asarray(a) for a in expected[:3])
    found_boxes, found_scores, found_labels = (np.asarray(a) for a in actual[:3])
    counted = (scores > min_score) & (labels >= 0)
    boxes, scores, labels = boxes[counted], scores[counted], labels[counted]
    if len(boxes) == 0:
        return 0, 0
    if not (found_labels >= 0).any():
        return len(boxes), len(boxes)
    matched = (box_iou(boxes, found_boxes) >= min_iou) & (labels[:, None] == found_labels[None])
    if len(expected) > 3:  # only the pairs of matching boxes: masks may be of the whole image
        masks, found_masks = np.asarray(expected[3])[counted], np.asarray(actual[3])
        for i, j in zip(*np.nonzero(matched)):  # (boolean masks: none undecided)
            decided = np.abs(masks[i] - MASK_COMPARE_THRESHOLD) > MASK_UNDECIDED
            matched[i, j] = mask_iou((masks[i] >= MASK_COMPARE_THRESHOLD)[None] & decided,
                                     (found_masks[j] >= MASK_COMPARE_THRESHOLD)[None] & decided)[0, 0] >= MASK_MIN_IOU
    unmatched = ~matched.any(1)
    found_scores = found_scores[found_labels >= 0]
    if top_k is not None and len(found_scores) >= top_k:
        unmatched &= np.abs(scores - found_scores.min()) > SCORE_AT_CUT
    return int(unmatched.sum()), len(boxes)


def match_predictions(expected: Sequence[np.ndarray], actual: Sequence[np.ndarray]) -> float:
    """The fraction of a batch's predictions that ``actual`` misses.

    Detections (``boxes``, ``scores``, ``labels`` of :data:`DETECTION_OUTPUTS`, and ``masks``
    of :data:`INSTANCE_OUTPUTS`, rows padded to ``max_per_img``): expected detections (label
    >= 0) without an actual one of the same class at IoU >= 0.99 (and mask IoU >=
    :data:`MASK_MIN_IOU`), other than those at the top-k cut (:func:`unmatched_detections`). Class maps
    (``seg_map``): pixels whose class differs.
    """
    if len(expected) == len(SEGMENTATION_OUTPUTS):
        return float((np.asarray(expected[0]) != np.asarray(actual[0])).mean())
    missed = total = 0
    for image in range(len(expected[0])):
        image_missed, image_total = unmatched_detections([e[image] for e in expected],
                                                         [a[image] for a in actual], top_k=len(actual[0][image]))
        missed, total = missed + image_missed, total + image_total
    return missed / max(total, 1)
