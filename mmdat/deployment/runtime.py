"""Running a ``--part predict`` ONNX model in onnxruntime as mmdet/mmseg models run: a model for
mmengine's test loop, the packing of its outputs into data samples, and int8 quantization.
"""
import copy
import os
import os.path as osp
import tempfile
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.model import BaseModel
from mmengine.structures import InstanceData, PixelData

from .predict import DETECTION_OUTPUTS, INSTANCE_OUTPUTS, SEGMENTATION_OUTPUTS, unmatched_detections

#: ``--quantize`` modes: onnxruntime's dynamic (weights int8, activations quantized per batch at
#: run time) and static (activations' ranges calibrated on images) quantization.
QUANTIZE_MODES = ('dynamic', 'static')
#: The operators quantized: the convolutions and matrix products hold nearly all of the work;
#: box decoding, NMS, resizing and arg-max stay in float.
QUANTIZED_OPS = ('Conv', 'MatMul', 'Gemm')
#: PyTorch detections above this score are the ones :class:`OnnxModel` looks for in ONNX's.
COMPARE_SCORE = 0.3


class OnnxRuntimeError(RuntimeError):
    """onnxruntime cannot load or run the model; the message is one line."""


def create_session(path: str):
    """An onnxruntime CPU session for ``path``, or :class:`OnnxRuntimeError`."""
    import onnxruntime as ort
    try:
        return ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    except Exception as error:  # onnxruntime raises its own exception types
        raise OnnxRuntimeError(f'onnxruntime cannot load {path}: '
                               f'{str(error).strip().splitlines()[0]}') from None


def output_kind(session) -> str:
    """``'mmdet'`` or ``'mmseg'`` from the output names of a ``--part predict`` model."""
    names = tuple(output.name for output in session.get_outputs())
    if names in (DETECTION_OUTPUTS, INSTANCE_OUTPUTS):
        return 'mmdet'
    if names == SEGMENTATION_OUTPUTS:
        return 'mmseg'
    raise OnnxRuntimeError(f'the ONNX model has outputs {list(names)}: not a --part predict export '
                           f'(expected {list(DETECTION_OUTPUTS)}, {list(INSTANCE_OUTPUTS)} or '
                           f'{list(SEGMENTATION_OUTPUTS)})')


def mask_threshold(cfg) -> Optional[float]:
    """The config's ``mask_thr_binary`` (``model.test_cfg.rcnn``), or ``None`` without one."""
    rcnn = (cfg.model.get('test_cfg') or {}).get('rcnn') or {}
    return rcnn.get('mask_thr_binary') if isinstance(rcnn, dict) else None


def paste_masks(probabilities: torch.Tensor, boxes: torch.Tensor, metainfo: dict,
                mask_thr_binary: float) -> torch.Tensor:
    """Instance masks in the original image from the mask head's grids, by mmdet's own
    ``FCNMaskHead._predict_by_feat_single`` (``rescale=True``, the probabilities given).

    Args:
        probabilities (Tensor): ``(N, h, w)`` probabilities of each box's class.
        boxes (Tensor): ``(N, 4)`` the boxes in the model's input (not rescaled).
        metainfo (dict): The image's ``scale_factor`` and ``ori_shape``.
        mask_thr_binary (float): Pixels at or above this are in the mask (below 0: the
            probability times 255 as uint8, as mmdet).

    Returns:
        Tensor: ``(N, H, W)`` masks of the original image's size, bool (uint8 below 0).
    """
    from types import SimpleNamespace

    from mmdet.models.roi_heads.mask_heads import FCNMaskHead
    from mmengine.config import ConfigDict
    if len(boxes) == 0:
        height, width = metainfo['ori_shape'][:2]
        return torch.zeros((0, height, width), dtype=torch.bool if mask_thr_binary >= 0 else torch.uint8)
    # the method reads only class_agnostic from its head: the grids are of the boxes' classes already
    return FCNMaskHead._predict_by_feat_single(
        SimpleNamespace(class_agnostic=True), probabilities[:, None], boxes.clone(),
        torch.zeros(len(boxes), dtype=torch.long), dict(metainfo, scale_factor=metainfo.get('scale_factor', (1., 1.))),
        ConfigDict(mask_thr_binary=mask_thr_binary), rescale=True, activate_map=True)


def image_sizes(data_samples: list) -> np.ndarray:
    """``(B, 2)`` int64: each sample's ``img_shape`` (height, width inside the padded batch)."""
    return np.array([sample.metainfo['img_shape'][:2] for sample in data_samples], dtype=np.int64)


def run_session(session, inputs: torch.Tensor, data_samples: list) -> List[np.ndarray]:
    """The outputs of ``session`` for a batch of preprocessed images and their data samples."""
    feed = {session.get_inputs()[0].name: inputs.detach().cpu().numpy()}
    if len(session.get_inputs()) > 1:
        feed[session.get_inputs()[1].name] = image_sizes(data_samples)
    try:
        return session.run(None, feed)
    except Exception as error:
        raise OnnxRuntimeError(f'onnxruntime cannot run the model on a {tuple(inputs.shape)} batch: '
                               f'{str(error).strip().splitlines()[0]}') from None


def pack_detections(outputs: Sequence[np.ndarray], data_samples: list,
                    mask_thr_binary: Optional[float] = None) -> list:
    """Put ``boxes``/``scores``/``labels`` (and ``masks``) of a batch into ``pred_instances``, as
    mmdet's ``predict(rescale=True)``: boxes clipped to each image's resized shape, then scaled
    back to the original image with its ``scale_factor``; masks pasted into the original image
    (:func:`paste_masks`) at ``mask_thr_binary``, which a model with masks needs."""
    boxes, scores, labels = (torch.from_numpy(np.asarray(o)) for o in outputs[:3])
    masks = torch.from_numpy(np.asarray(outputs[3])) if len(outputs) > 3 else None
    if masks is not None and mask_thr_binary is None:
        raise OnnxRuntimeError('the ONNX model predicts masks, but the config has no '
                               'model.test_cfg.rcnn.mask_thr_binary')
    for i, sample in enumerate(data_samples):
        kept = labels[i] >= 0
        instances = InstanceData()
        if masks is not None:
            instances.masks = paste_masks(masks[i][kept], boxes[i][kept], sample.metainfo, mask_thr_binary)
        image_boxes = boxes[i][kept].clone()
        height, width = sample.metainfo['img_shape'][:2]
        image_boxes[:, 0::2] = image_boxes[:, 0::2].clamp(0, width)
        image_boxes[:, 1::2] = image_boxes[:, 1::2].clamp(0, height)
        scale = sample.metainfo.get('scale_factor')
        if scale is not None:
            image_boxes /= image_boxes.new_tensor(scale).repeat(2)
        instances.bboxes, instances.scores, instances.labels = image_boxes, scores[i][kept], labels[i][kept]
        sample.pred_instances = instances
    return data_samples


def pack_segmentation(outputs: Sequence[np.ndarray], data_samples: list) -> list:
    """Put the class map of each image into ``pred_sem_seg``: the padding removed, then resized
    (nearest) to the original image, where mmseg resizes the logits before its arg-max."""
    seg_maps = torch.from_numpy(np.asarray(outputs[0]))
    for i, sample in enumerate(data_samples):
        seg_map = seg_maps[i]
        left, right, top, bottom = sample.metainfo.get('padding_size', (0, 0, 0, 0))
        seg_map = seg_map[top:seg_map.shape[0] - bottom, left:seg_map.shape[1] - right]
        ori_shape = tuple(sample.metainfo.get('ori_shape', seg_map.shape))[:2]
        if tuple(seg_map.shape) != ori_shape:
            seg_map = F.interpolate(seg_map[None, None].float(), size=ori_shape, mode='nearest')[0, 0].long()
        sample.pred_sem_seg = PixelData(data=seg_map[None])
    return data_samples


def pack_predictions(kind: str, outputs: Sequence[np.ndarray], data_samples: list,
                     mask_thr_binary: Optional[float] = None) -> list:
    """:func:`pack_detections` (``'mmdet'``) or :func:`pack_segmentation` (``'mmseg'``)."""
    if kind == 'mmdet':
        return pack_detections(outputs, data_samples, mask_thr_binary)
    return pack_segmentation(outputs, data_samples)


class OnnxModel(BaseModel):
    """A ``--part predict`` ONNX model in onnxruntime, for mmengine's test loop: the config's data
    preprocessor, then the ONNX model, then the predictions packed as mmdet/mmseg pack theirs.

    Args:
        path (str): The ONNX file.
        data_preprocessor (nn.Module): The config model's data preprocessor.
        reference (nn.Module, optional): The PyTorch model, run on the same batches to count how
            many of its predictions ONNX misses (:attr:`agreement`), and to hand its own
            predictions to ``reference_evaluator``.
        reference_evaluator (optional): An mmengine ``Evaluator`` for the reference's predictions.
        mask_thr_binary (float, optional): A model with masks: the config's ``mask_thr_binary``
            (:func:`mask_threshold`).
    """

    def __init__(self, path: str, data_preprocessor: nn.Module, reference: Optional[nn.Module] = None,
                 reference_evaluator=None, mask_thr_binary: Optional[float] = None):
        super().__init__(data_preprocessor=data_preprocessor)
        self.session = create_session(path)
        self.kind = output_kind(self.session)
        self.mask_thr_binary = mask_thr_binary
        self.reference = reference.eval() if reference is not None else None
        self.reference_evaluator = reference_evaluator
        #: detections: PyTorch boxes above :data:`COMPARE_SCORE` and those ONNX missed (with
        #: masks: or whose mask has an IoU < ``MASK_MIN_IOU`` with PyTorch's); class maps:
        #: pixels and those of another class
        self.agreement = dict(missed=0, total=0)

    def forward(self, inputs: torch.Tensor, data_samples: Optional[list] = None, mode: str = 'predict'):
        if mode != 'predict':
            raise ValueError(f"an ONNX model only predicts, got mode {mode!r}")
        unpacked = copy.deepcopy(data_samples) if self.reference is not None else None
        outputs = run_session(self.session, inputs, data_samples)
        predictions = pack_predictions(self.kind, outputs, data_samples, self.mask_thr_binary)
        if self.reference is not None:
            with torch.no_grad():
                expected = self.reference.predict(inputs, unpacked)
            self._count_agreement(expected, predictions, top_k=np.asarray(outputs[0]).shape[1])
            if self.reference_evaluator is not None:
                self.reference_evaluator.process(data_samples=expected)
        return predictions

    def _count_agreement(self, expected: list, actual: list, top_k: int) -> None:
        """``top_k``: detections: the rows of the ONNX outputs, ``max_per_img``."""
        for want, got in zip(expected, actual):
            if self.kind == 'mmdet':
                w, g = want.pred_instances, got.pred_instances
                keys = ('bboxes', 'scores', 'labels') + (('masks', ) if 'masks' in g else ())
                missed, total = unmatched_detections([w[key].numpy() for key in keys],
                                                     [g[key].numpy() for key in keys], min_score=COMPARE_SCORE,
                                                     top_k=top_k)
            else:
                w, g = want.pred_sem_seg.data, got.pred_sem_seg.data
                missed, total = int((w != g).sum()), w.numel()
            self.agreement['missed'] += missed
            self.agreement['total'] += total


class CalibrationImages:
    """onnxruntime's calibration data reader over preprocessed batches of one image and their
    data samples."""

    def __init__(self, batches: Iterator[Tuple[torch.Tensor, list]], session):
        self.batches = iter(batches)
        self.names = [i.name for i in session.get_inputs()]

    def get_next(self) -> Optional[Dict[str, np.ndarray]]:
        batch = next(self.batches, None)
        if batch is None:
            return None
        inputs, data_samples = batch
        feed = {self.names[0]: inputs.numpy()}
        if len(self.names) > 1:
            feed[self.names[1]] = image_sizes(data_samples)
        return feed


def quantize(path: str, output: str, mode: str,
             calibration: Optional[Iterator[Tuple[torch.Tensor, list]]] = None) -> None:
    """Write an int8 copy of the ONNX model ``path`` to ``output`` with onnxruntime's quantizer.

    Args:
        path (str): The float model.
        output (str): The int8 model to write.
        mode (str): ``'dynamic'`` or ``'static'`` (:data:`QUANTIZE_MODES`).
        calibration (Iterator[tuple], optional): Static mode: ``(inputs, data_samples)`` of
            preprocessed batches whose activation ranges set the int8 scales.
    """
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process
    if mode not in QUANTIZE_MODES:
        raise ValueError(f'mode must be one of {QUANTIZE_MODES}, got {mode!r}')
    with tempfile.TemporaryDirectory() as scratch:
        prepared = osp.join(scratch, 'prepared.onnx')
        # shapes inferred and the graph folded, as onnxruntime recommends before quantizing
        quant_pre_process(path, prepared, skip_symbolic_shape=True)
        if mode == 'dynamic':
            quantize_dynamic(prepared, output, weight_type=QuantType.QInt8,
                             op_types_to_quantize=list(QUANTIZED_OPS))
        else:
            if calibration is None:
                raise ValueError('static quantization needs calibration images')
            session = create_session(prepared)
            # read now: the images' paths may be relative to the working folder, changed below
            reader = CalibrationImages(list(calibration), session)
            del session
            cwd = os.getcwd()
            os.chdir(scratch)  # the calibrator writes its augmented model to the working folder
            try:
                quantize_static(prepared, output if osp.isabs(output) else osp.join(cwd, output), reader,
                                quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8,
                                weight_type=QuantType.QInt8, per_channel=True,
                                op_types_to_quantize=list(QUANTIZED_OPS),
                                calibrate_method=CalibrationMethod.MinMax)
            finally:
                os.chdir(cwd)
