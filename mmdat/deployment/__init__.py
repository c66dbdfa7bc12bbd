"""Whole detectors and segmenters as ONNX graphs with their post-processing, and running them."""
from .ops import nms_indices, roi_align
from .predict import (DETECTION_INPUTS, DETECTION_OUTPUTS, INSTANCE_OUTPUTS, SEGMENTATION_INPUTS,
                      SEGMENTATION_OUTPUTS, SegmentorPredict, SingleStageDetectorPredict, TwoStageDetectorPredict,
                      UnsupportedModelError, batched_class_nms, build_predict_module, full_image_sizes)

__all__ = [
    'DETECTION_INPUTS', 'DETECTION_OUTPUTS', 'INSTANCE_OUTPUTS', 'SEGMENTATION_INPUTS', 'SEGMENTATION_OUTPUTS',
    'SegmentorPredict', 'SingleStageDetectorPredict', 'TwoStageDetectorPredict', 'UnsupportedModelError',
    'batched_class_nms', 'build_predict_module', 'full_image_sizes', 'nms_indices', 'roi_align'
]
