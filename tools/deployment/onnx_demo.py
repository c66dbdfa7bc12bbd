"""Run a ``pytorch2onnx.py --part predict`` ONNX model in onnxruntime on one image and save its
predictions drawn as tools/demo.py draws the PyTorch model's (one label per object).

Example::

    python tools/deployment/onnx_demo.py image.png configs/demo/retinanet_dat_demo_shapes.py \\
        retinanet.onnx --out onnx_demo.png

The image goes through the config's test pipeline and data preprocessor (resized, normalised,
padded), then the ONNX model; boxes are scaled back to the image, and instance masks (Mask
R-CNN, Cascade) pasted into it and drawn too. Class names come from the config's test dataset.
"""
import argparse
from typing import Optional, Sequence

import mmcv
import numpy as np
import torch

from mmdat.deployment.runtime import (OnnxRuntimeError, create_session, mask_threshold, output_kind, pack_predictions,
                                      run_session)
from mmdat.utils import (check_file, check_out_file, image_file, load_dat_config,
                         one_line_errors, read_image)
from mmdat.utils.inference import _config_dataset_meta
from mmdat.visualization import DRAW_SCORE_THR, draw_prediction

#: Image formats ``--out`` may have (OpenCV writes them).
OUT_FORMATS = ('png', 'jpg', 'jpeg', 'bmp', 'tif', 'tiff', 'webp')


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('image', help='image file')
    parser.add_argument('config', help='the config the model was exported from')
    parser.add_argument('model', help='the ONNX file (pytorch2onnx.py --part predict)')
    parser.add_argument('--out', required=True, help='output image, e.g. onnx_demo.png')
    parser.add_argument('--score-thr', type=float, default=DRAW_SCORE_THR,
                        help=f'detections at or below this score are not drawn (default {DRAW_SCORE_THR})')
    parser.add_argument('--opacity', type=float, default=0.5, help='opacity of the class colours (segmenters)')
    args = parser.parse_args(argv)
    for option in ('score_thr', 'opacity'):
        if not 0.0 <= getattr(args, option) <= 1.0:
            parser.error(f'--{option.replace("_", "-")} must be in [0, 1], got {getattr(args, option)}')
    return args


def predict(cfg, session, image_path: str):
    """The data sample of one image, predicted by ``session`` (``'mmdet'`` or ``'mmseg'`` outputs)."""
    import importlib

    from mmengine.dataset import Compose
    from mmengine.registry import init_default_scope
    kind = output_kind(session)
    if kind != cfg.default_scope:
        raise OnnxRuntimeError(f'the ONNX model is a {"detector" if kind == "mmdet" else "segmenter"}, '
                               f'the config a {cfg.default_scope} model')
    init_default_scope(cfg.default_scope)  # the pipeline's transforms are mmdet's or mmseg's
    pipeline = Compose([step for step in cfg.test_dataloader.dataset.pipeline
                        if not step['type'].startswith('LoadAnnotations')])
    data = pipeline(dict(img_path=image_path, img_id=0))
    preprocessor = importlib.import_module(f'{cfg.default_scope}.registry').MODELS.build(
        cfg.model.data_preprocessor)
    with torch.no_grad():
        batch = preprocessor(dict(inputs=[data['inputs']], data_samples=[data['data_samples']]), False)
    outputs = run_session(session, batch['inputs'], batch['data_samples'])
    return pack_predictions(kind, outputs, batch['data_samples'], mask_threshold(cfg))[0]


@one_line_errors
def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    check_file(args.model, 'ONNX model')
    check_out_file(args.out, OUT_FORMATS)
    # Read (and shrunk) before anything is built: a clear message, and no full-size decode.
    image, scale = read_image(args.image)
    cfg, kind = load_dat_config(args.config)
    if kind == 'backbone':
        raise SystemExit(f'{args.config} is a backbone-only config: the demo needs a detector or segmenter')
    with image_file(args.image, image, scale) as path:  # the pipeline reads a file
        try:
            sample = predict(cfg, create_session(args.model), path)
        except OnnxRuntimeError as error:
            raise SystemExit(f'onnx_demo: {error}') from None
    meta = _config_dataset_meta(cfg)
    drawing = draw_prediction(image, sample, meta['classes'], meta.get('palette'), args.score_thr, args.opacity)
    mmcv.imwrite(drawing[..., ::-1], args.out)  # the visualizers draw RGB
    if 'pred_instances' in sample:
        kept = sample.pred_instances[sample.pred_instances.scores > args.score_thr]
        print(f'{len(kept)} detections with score > {args.score_thr}')
    else:
        print('classes present: ' + ', '.join(meta['classes'][i] for i in np.unique(sample.pred_sem_seg.data.numpy())))
    print(f'Saved {args.out}')


if __name__ == '__main__':
    main()
