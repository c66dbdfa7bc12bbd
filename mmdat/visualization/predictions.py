"""Drawing a detector's or segmenter's predictions on an image, one way for every tool (the demo,
the embedded demo's picture, ONNX models): mmdet's and mmseg's visualizers, with one label per
object for detections.
"""
from typing import Optional, Sequence

import numpy as np

#: Detections drawn: those scoring above this.
DRAW_SCORE_THR = 0.3
#: Of drawn boxes overlapping by more than this IoU, whatever their classes, only the best scored
#: is drawn: a model that hesitates between two classes for one object would otherwise draw two
#: labels on top of each other, and the one on top is not always the better.
DRAW_OVERLAP = 0.5


def detections_to_draw(instances, score_thr: float = DRAW_SCORE_THR, overlap: float = DRAW_OVERLAP):
    """The detections of ``instances`` (an ``InstanceData`` with ``bboxes``, ``scores``,
    ``labels``) scoring above ``score_thr``, without any box that overlaps a better-scored one by
    more than ``overlap`` IoU (class-agnostic NMS), best first."""
    from mmcv.ops import nms
    kept = instances[instances.scores > score_thr]
    if len(kept) == 0:
        return kept
    _, order = nms(kept.bboxes.float(), kept.scores.float(), overlap)
    return kept[order]


def draw_prediction(image: np.ndarray, data_sample, classes: Sequence[str],
                    palette: Optional[Sequence] = None, score_thr: float = DRAW_SCORE_THR,
                    opacity: float = 0.5) -> np.ndarray:
    """Draw a detection or segmentation data sample on its image.

    Args:
        image (ndarray): ``(H, W, 3)`` RGB uint8, the original image.
        data_sample: A ``DetDataSample`` with ``pred_instances`` (boxes in the image's
            coordinates) or a ``SegDataSample`` with ``pred_sem_seg`` of the image's size.
        classes (Sequence[str]): Class names.
        palette (Sequence, optional): One RGB colour per class (the visualizers' default without).
        score_thr (float): Detections: drawn above this score (see :func:`detections_to_draw`).
        opacity (float): Segmentation: opacity of the class colours.

    Returns:
        ndarray: The drawing, RGB uint8.
    """
    meta = dict(classes=tuple(classes), palette=palette)
    if 'pred_instances' in data_sample:
        from mmdet.structures import DetDataSample
        from mmdet.visualization import DetLocalVisualizer
        visualizer = DetLocalVisualizer.get_instance('mmdat_draw_detections')
        sample = DetDataSample(metainfo=data_sample.metainfo)
        sample.pred_instances = detections_to_draw(data_sample.pred_instances.cpu(), score_thr)
        if meta['palette'] is None:
            meta['palette'] = 'random'
        visualizer.dataset_meta = meta
        visualizer.add_datasample('prediction', image, sample, draw_gt=False, pred_score_thr=score_thr)
    else:
        from mmseg.visualization import SegLocalVisualizer
        visualizer = SegLocalVisualizer.get_instance('mmdat_draw_segmentation', alpha=opacity)
        visualizer.alpha = opacity
        if meta['palette'] is None:  # one fixed colour per class, as mmseg's inferencer makes
            meta['palette'] = np.random.RandomState(0).randint(0, 255, (len(classes), 3)).tolist()
        visualizer.dataset_meta = meta
        visualizer.add_datasample('prediction', image, data_sample, draw_gt=False)
    return visualizer.get_image()
