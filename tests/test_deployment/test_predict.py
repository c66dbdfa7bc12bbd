"""mmdat.deployment.predict: whole models with their post-processing give mmdet's and mmseg's
own predictions, and refuse what they cannot export with one line."""
import importlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from mmengine.config import Config

from mmdat.deployment import UnsupportedModelError, build_predict_module, full_image_sizes
from mmdat.deployment.predict import ShapeAdaptiveAvgPool, match_predictions, unmatched_detections
from mmdat.utils import register_scope
from tests.conftest import CASCADE_CONFIG as CASCADE
from tests.conftest import MASK_RCNN_CONFIG as MASK_RCNN
from tests.conftest import small_two_stage

CONFIGS = Path(__file__).resolve().parents[1] / 'data' / 'configs'
RETINANET = CONFIGS / 'retinanet_dat_shapes_tiny.py'
UPERNET = CONFIGS / 'upernet_dat_shapes_tiny.py'
SEMANTIC_FPN = Path(__file__).resolve().parents[2] / 'configs' / 'demo' / 'fpn_dat_demo_shapes.py'
SMALL_ARCH = dict(_delete_=True, embed_dims=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4), offset_groups=(0, 0, 2, 2))


def build(config, **overrides):
    """The config's model with random weights (seeded): untrained heads score many boxes
    around 0.5, which exercises the post-processing more than a trained one."""
    cfg = Config.fromfile(str(config))
    if overrides:
        cfg.merge_from_dict(overrides)
    scope = register_scope(cfg)
    cfg.model.backbone.pop('init_cfg', None)
    torch.manual_seed(0)
    return importlib.import_module(f'{scope}.registry').MODELS.build(cfg.model).eval()


def test_retinanet_gives_mmdets_detections_clipped_to_each_image():
    from mmdet.structures import DetDataSample
    model = build(RETINANET)
    inputs = torch.randn(2, 3, 192, 256)
    sizes = full_image_sizes(inputs)
    sizes[1] = torch.tensor([150, 200])  # the second image padded to the batch's size
    with torch.no_grad():
        boxes, scores, labels = build_predict_module(model)(inputs, sizes)
        samples = [DetDataSample(metainfo=dict(img_shape=tuple(size.tolist()))) for size in sizes]
        expected = model.predict(inputs, samples, rescale=False)
    max_per_img = model.bbox_head.test_cfg.max_per_img
    assert boxes.shape == (2, max_per_img, 4) and labels.shape == (2, max_per_img)
    for image, sample in enumerate(expected):
        want = sample.pred_instances
        count = len(want)
        assert count > 10  # random weights: many boxes above score_thr
        torch.testing.assert_close(boxes[image, :count], want.bboxes, rtol=0, atol=1e-4)
        torch.testing.assert_close(scores[image, :count], want.scores, rtol=0, atol=1e-6)
        assert torch.equal(labels[image, :count], want.labels)
        assert (labels[image, count:] == -1).all()
    assert boxes[1, :, 0::2].max() <= 200 and boxes[1, :, 1::2].max() <= 150


@pytest.mark.parametrize('config', [UPERNET, SEMANTIC_FPN], ids=['upernet', 'semantic_fpn'])
def test_segmentor_gives_mmsegs_class_map(config):
    from mmseg.structures import SegDataSample
    model = build(config)
    inputs = torch.randn(2, 3, 128, 160)
    with torch.no_grad():
        seg_map = build_predict_module(model)(inputs)
        meta = dict(img_shape=(128, 160), ori_shape=(128, 160), pad_shape=(128, 160), padding_size=[0] * 4)
        expected = model.predict(inputs, [SegDataSample(metainfo=meta) for _ in range(2)])
    assert seg_map.shape == (2, 128, 160) and seg_map.dtype == torch.int64
    for image, sample in enumerate(expected):
        assert torch.equal(seg_map[image], sample.pred_sem_seg.data[0])


def test_semantic_fpn_upsampling_follows_the_input_size():
    """mmseg's Upsample computes its size with int(), which exporters freeze: replaced."""
    from mmseg.models.utils import Upsample
    predict = build_predict_module(build(SEMANTIC_FPN))
    assert not any(isinstance(m, Upsample) for m in predict.modules())


@pytest.mark.parametrize('output_size', [1, 3, 6, (2, 5)])
def test_adaptive_pooling_from_the_input_size_is_pytorchs(output_size):
    pool = nn.AdaptiveAvgPool2d(output_size)
    for shape in ((2, 4, 7, 11), (1, 3, 16, 16), (1, 2, 5, 13)):
        x = torch.randn(shape)
        torch.testing.assert_close(ShapeAdaptiveAvgPool(pool)(x), pool(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize('dynamo', [True, False], ids=['dynamo', 'torchscript'])
def test_adaptive_pooling_exports_for_every_size(dynamo, tmp_path):
    """UperNet's pyramid pooling: exporters write nn.AdaptiveAvgPool2d for the example's size."""
    ort = pytest.importorskip('onnxruntime')
    path = str(tmp_path / 'pool.onnx')
    model = ShapeAdaptiveAvgPool(nn.AdaptiveAvgPool2d(6))
    if dynamo:
        pytest.importorskip('onnxscript')
        from torch.export import Dim
        torch.onnx.export(model, (torch.randn(1, 2, 24, 36), ), path, dynamo=True, input_names=['x'],
                          dynamic_shapes=({2: Dim('h', min=6), 3: Dim('w', min=6)}, ))
    else:
        torch.onnx.export(model, (torch.randn(1, 2, 24, 36), ), path, dynamo=False, input_names=['x'],
                          dynamic_axes={'x': {2: 'h', 3: 'w'}})
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    x = torch.randn(1, 2, 17, 23)  # windows of unequal sizes
    np.testing.assert_allclose(session.run(None, {'x': x.numpy()})[0], nn.AdaptiveAvgPool2d(6)(x).numpy(),
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize('overrides,match', [
    (dict(model=dict(test_cfg=dict(nms=dict(type='soft_nms', iou_threshold=0.5)))),
     "bbox_head RetinaHead: test_cfg nms type 'soft_nms' has no ONNX operator"),
])
def test_refuses_what_the_detector_cannot_export(overrides, match):
    with pytest.raises(UnsupportedModelError, match=match):
        build_predict_module(build(RETINANET, **overrides))


def test_refuses_sliding_window_segmentation():
    with pytest.raises(UnsupportedModelError, match="test_cfg mode 'slide'"):
        build_predict_module(build(UPERNET, model=dict(test_cfg=dict(mode='slide', crop_size=(64, 64),
                                                                        stride=(32, 32)))))


@pytest.mark.parametrize('config', [MASK_RCNN, pytest.param(CASCADE, marks=pytest.mark.slow)],
                         ids=['mask_rcnn', 'cascade'])
def test_two_stage_gives_mmdets_detections_and_masks(config):
    """Boxes, scores and labels as mmdet's predict, and masks that mmdet's paste makes the same
    (at an odd size, the second image padded)."""
    from mmdet.structures import DetDataSample

    from mmdat.deployment.runtime import pack_detections
    model = small_two_stage(config)
    inputs = torch.randn(2, 3, 161, 227)
    sizes = full_image_sizes(inputs)
    sizes[1] = torch.tensor([140, 200])
    # the second image was resized by 1.25 from its original: masks are pasted at that size
    metas = [dict(img_shape=(161, 227), ori_shape=(161, 227), scale_factor=(1.0, 1.0)),
             dict(img_shape=(140, 200), ori_shape=(112, 160), scale_factor=(1.25, 1.25))]
    with torch.no_grad():
        outputs = build_predict_module(model)(inputs, sizes)
        expected = model.predict(inputs, [DetDataSample(metainfo=meta) for meta in metas], rescale=True)
    boxes, scores, labels, masks = outputs
    assert masks.shape == (2, 100, 28, 28) and 0 <= masks.min() and masks.max() <= 1
    packed = pack_detections([o.numpy() for o in outputs], [DetDataSample(metainfo=meta) for meta in metas],
                             model.roi_head.test_cfg.mask_thr_binary)
    for image, (sample, want) in enumerate(zip(packed, expected)):
        got, want = sample.pred_instances, want.pred_instances
        assert len(want) > 10  # random weights: many boxes above score_thr
        torch.testing.assert_close(got.bboxes, want.bboxes, rtol=0, atol=1e-4)
        torch.testing.assert_close(got.scores, want.scores, rtol=0, atol=1e-6)
        assert torch.equal(got.labels, want.labels)
        assert got.masks.shape == want.masks.shape == (len(want), *metas[image]['ori_shape'])
        assert torch.equal(got.masks, want.masks) and want.masks.any()
    assert boxes[1, :, 0::2].max() <= 200 and boxes[1, :, 1::2].max() <= 140


@pytest.mark.parametrize('overrides,match', [
    (dict(model=dict(test_cfg=dict(rpn=dict(nms=dict(type='soft_nms', iou_threshold=0.7))))),
     "rpn_head RPNHead: test_cfg nms type 'soft_nms' has no ONNX operator"),
    (dict(model=dict(roi_head=dict(mask_roi_extractor=dict(roi_layer=dict(_delete_=True, type='RoIPool',
                                                                            output_size=14))))),
     'roi_head StandardRoIHead SingleRoIExtractor: only RoIAlign with average pooling is exported, not RoIPool'),
    (dict(model=dict(roi_head=dict(type='PISARoIHead'))), 'roi_head PISARoIHead: only StandardRoIHead'),
    (dict(model=dict(roi_head=dict(mask_head=dict(type='HTCMaskHead')))),
     'mask_head HTCMaskHead: only the forward and post-processing of FCNMaskHead'),
])
def test_refuses_what_a_two_stage_detector_cannot_export_with_one_line(overrides, match):
    with pytest.raises(UnsupportedModelError, match=match) as error:
        build_predict_module(small_two_stage(MASK_RCNN, **overrides))
    assert '\n' not in str(error.value)


def test_refuses_a_two_stage_detector_without_masks():
    model = small_two_stage(MASK_RCNN)
    model.roi_head.mask_head = None  # Faster R-CNN's RoI head
    with pytest.raises(UnsupportedModelError, match='only RoI heads with a mask head are exported'):
        build_predict_module(model)


def test_unmatched_detections_counts_class_and_overlap():
    expected = (np.array([[0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 5, 5.]]), np.array([0.9, 0.8, 0.2]),
                np.array([0, 1, 0]))
    # the first found (same box, same class), the second found as another class, the third
    # below the score counted
    actual = (np.array([[0, 0, 10, 10], [20, 20, 30, 30.]]), np.array([0.9, 0.8]), np.array([0, 2]))
    assert unmatched_detections(expected, actual, min_score=0.3) == (1, 2)
    assert unmatched_detections(expected, actual, min_score=0.1) == (2, 3)
    # a box moved by a tenth of a pixel still matches (IoU 0.98 < 0.99 does not)
    moved = (actual[0] + np.array([0.05, 0, 0.05, 0]), actual[1], np.array([0, 1]))
    assert unmatched_detections(expected, moved, min_score=0.3) == (0, 2)
    moved = (actual[0] + np.array([0.2, 0, 0.2, 0]), actual[1], np.array([0, 1]))
    assert unmatched_detections(expected, moved, min_score=0.3) == (2, 2)


def test_unmatched_detections_with_masks_also_need_the_masks_to_overlap():
    boxes, scores, labels = np.array([[0, 0, 10, 10.], [20, 20, 30, 30.]]), np.array([0.9, 0.8]), np.array([0, 1])
    masks = np.zeros((2, 28, 28), dtype=np.float32)
    masks[0, :14] = 0.9  # the top half; the second mask is empty (below 0.5 everywhere)
    found = masks.copy()
    assert unmatched_detections((boxes, scores, labels, masks), (boxes, scores, labels, found)) == (0, 2)
    found[0, :12] = 0.9  # IoU 12/14 < 0.9 (still above 0.5: the same binary mask)
    found[0, 12:14] = 0.1
    assert unmatched_detections((boxes, scores, labels, masks), (boxes, scores, labels, found)) == (1, 2)
    found[0, 12:14] = 0.6
    found[1, 0, 0] = 0.7  # one pixel against an empty mask: IoU 0
    assert unmatched_detections((boxes, scores, labels, masks), (boxes, scores, labels, found)) == (1, 2)


def test_unmatched_detections_leave_out_what_rounding_alone_decides():
    boxes, scores, labels = np.array([[0, 0, 10, 10.], [20, 20, 30, 30.]]), np.array([0.9, 0.8]), np.array([0, 1])
    masks = np.zeros((2, 28, 28), dtype=np.float32)
    masks[0, 0, :4] = 0.9  # a mask of 4 pixels, one of them undecided (at the threshold)
    masks[0, 0, 3] = 0.5 + 3e-6
    found = masks.copy()
    found[0, 0, 3] = 0.5 - 3e-6
    assert unmatched_detections((boxes, scores, labels, masks), (boxes, scores, labels, found)) == (0, 2)
    found[0, 0, 3] = 0.4  # ... is decided when the probabilities differ by more than rounding
    masks[0, 0, 3] = 0.6
    assert unmatched_detections((boxes, scores, labels, masks), (boxes, scores, labels, found)) == (1, 2)
    # binarised masks (onnx_test's, pasted into the image) have no undecided pixels
    assert unmatched_detections((boxes, scores, labels, masks >= 0.5), (boxes, scores, labels, found >= 0.5)) == (1, 2)
    assert unmatched_detections((boxes, scores, labels, masks >= 0.5), (boxes, scores, labels, masks >= 0.5)) == (0, 2)

    # the last of the top-k: another box of nearly the same score took its place
    other = np.array([[40, 40, 50, 50.], [20, 20, 30, 30.]])
    for found_score, missed in ((0.8 + 1e-6, 0), (0.8 - 1e-6, 0), (0.8 - 1e-3, 1), (0.8 + 1e-3, 1)):
        actual = (np.concatenate([boxes[:1], other[:1]]), np.array([0.9, found_score]), np.array([0, 1]))
        assert unmatched_detections((boxes, scores, labels), actual, top_k=2) == (missed, 2), found_score
        # a list the cut did not shorten has no cut
        assert unmatched_detections((boxes, scores, labels), actual, top_k=3) == (1, 2)
        assert unmatched_detections((boxes, scores, labels), actual) == (1, 2)
    # whole-model outputs: rows padded to max_per_img (label -1) give the k
    batch = [x[None] for x in actual]
    assert match_predictions([x[None] for x in (boxes, scores, labels)], batch) == 0.5
    batch = [x[None] for x in (actual[0], np.array([0.9, 0.8 + 1e-6]), actual[2])]
    assert match_predictions([x[None] for x in (boxes, scores, labels)], batch) == 0.0
    padded = [np.concatenate([x, x[:, :1]], 1) for x in batch]
    padded[2][0, 2] = -1
    assert match_predictions([x[None] for x in (boxes, scores, labels)], padded) == 0.5


def test_match_predictions_of_class_maps_is_the_fraction_of_other_pixels():
    seg = np.zeros((1, 4, 5), dtype=np.int64)
    other = seg.copy()
    other[0, 0, :2] = 1
    assert match_predictions([seg], [other]) == pytest.approx(0.1)
