"""Whole detectors and segmenters as ONNX graphs with their post-processing, and running them."""
from .nms import nms_indices
from .predict import (DETECTION_OUTPUTS, SEGMENTATION_OUTPUTS, SegmentorPredict,
                      SingleStageDetectorPredict, UnsupportedModelError, batched_class_nms,
                      build_predict_module)

__all__ = [
    'DETECTION_OUTPUTS', 'SEGMENTATION_OUTPUTS', 'SegmentorPredict', 'SingleStageDetectorPredict',
    'UnsupportedModelError', 'batched_class_nms', 'build_predict_module', 'nms_indices'
]
