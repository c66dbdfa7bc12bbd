"""mmdat.deployment.runtime: packing ONNX outputs as mmdet/mmseg pack theirs, quantization."""
import os

import numpy as np
import pytest
import torch
import torch.nn as nn

from mmdat.deployment.runtime import OnnxRuntimeError, pack_detections, pack_segmentation, quantize

ort = pytest.importorskip('onnxruntime')


def test_detections_are_clipped_to_the_image_then_scaled_back():
    from mmdet.structures import DetDataSample
    boxes = np.array([[[10, 20, 300, 100], [0, 0, 0, 0]]], dtype=np.float32)
    scores = np.array([[0.9, 0.0]], dtype=np.float32)
    labels = np.array([[2, -1]])
    sample = DetDataSample(metainfo=dict(img_shape=(150, 200), scale_factor=(0.5, 0.25)))
    (packed, ) = pack_detections([boxes, scores, labels], [sample])
    instances = packed.pred_instances
    assert len(instances) == 1 and instances.labels.tolist() == [2]  # the unused row dropped
    # x2 clipped to the image's width (200) before scaling back by 1 / 0.5, y by 1 / 0.25
    assert instances.bboxes.tolist() == [[20.0, 80.0, 400.0, 400.0]]


def test_masks_are_pasted_into_the_original_image_at_the_threshold():
    from mmdet.structures import DetDataSample
    boxes = np.array([[[0, 0, 100, 40], [0, 0, 0, 0]]], dtype=np.float32)
    scores, labels = np.array([[0.9, 0.0]], dtype=np.float32), np.array([[1, -1]])
    masks = np.zeros((1, 2, 28, 28), dtype=np.float32)
    masks[0, 0, :, :14] = 0.8  # the box's left half
    meta = dict(img_shape=(60, 120), ori_shape=(30, 60), scale_factor=(2.0, 2.0))
    (packed, ) = pack_detections([boxes, scores, labels, masks], [DetDataSample(metainfo=meta)], 0.5)
    pasted = packed.pred_instances.masks
    assert pasted.shape == (1, 30, 60) and pasted.dtype == torch.bool
    # the box is (0, 0, 50, 20) in the original image: its left half, 25 x 20 pixels
    assert pasted[0, :20, :25].all() and pasted.sum() == 25 * 20
    (packed, ) = pack_detections([boxes, scores, labels, masks], [DetDataSample(metainfo=meta)], 0.9)
    assert not packed.pred_instances.masks.any()
    empty = [boxes[:, 1:], scores[:, 1:], labels[:, 1:], masks[:, 1:]]
    (packed, ) = pack_detections(empty, [DetDataSample(metainfo=meta)], 0.5)
    assert packed.pred_instances.masks.shape == (0, 30, 60)
    with pytest.raises(OnnxRuntimeError, match='no model.test_cfg.rcnn.mask_thr_binary'):
        pack_detections([boxes, scores, labels, masks], [DetDataSample(metainfo=meta)])


def test_class_maps_lose_their_padding_and_take_the_original_size():
    from mmseg.structures import SegDataSample
    seg_map = np.zeros((1, 8, 10), dtype=np.int64)
    seg_map[0, :6, :8] = 1  # the image; the rest is padding
    sample = SegDataSample(metainfo=dict(padding_size=[0, 2, 0, 2], ori_shape=(12, 16)))
    (packed, ) = pack_segmentation([seg_map], [sample])
    assert packed.pred_sem_seg.data.shape == (1, 12, 16) and (packed.pred_sem_seg.data == 1).all()


def test_static_quantization_reads_its_images_in_the_callers_folder(tmp_path):
    """Calibration images with relative paths must be read before the quantizer changes folder."""
    path = str(tmp_path / 'conv.onnx')
    torch.onnx.export(nn.Conv2d(3, 4, 3).eval(), (torch.randn(1, 3, 16, 16), ), path, dynamo=False,
                      input_names=['inputs'], dynamic_axes={'inputs': {0: 'batch', 2: 'h', 3: 'w'}})
    folders = []

    def batches():
        for _ in range(2):
            folders.append(os.getcwd())
            yield torch.randn(1, 3, 16, 16), []

    output = str(tmp_path / 'conv_int8.onnx')
    quantize(path, output, 'static', batches())
    assert folders == [os.getcwd()] * 2
    session = ort.InferenceSession(output, providers=['CPUExecutionProvider'])
    assert 'QuantizeLinear' in {node.op_type for node in __import__('onnx').load(output).graph.node}
    assert session.run(None, {'inputs': np.random.randn(2, 3, 20, 24).astype(np.float32)})[0].shape == (2, 4, 18, 22)
