"""Run a detector (boxes, masks, labels) or segmenter (classes blended over the image) with a
DAT backbone on one image and save the picture drawn by mmdet's or mmseg's own visualizer.

Uses mmdet's DetInferencer or mmseg's MMSegInferencer, so the image goes through the config's
test pipeline, and runs on a CPU. Without a checkpoint the model has random weights (the
picture then shows the pipeline working, not a useful prediction); class names come from the
checkpoint, or else from the config's test dataset. An image over 2048 pixels a side is shrunk
to that before the model sees it (the picture is drawn at that size); one over 100 million
pixels is refused unless it is a JPEG (decoded reduced).
"""
import argparse
from typing import Optional, Sequence

import mmcv
import numpy as np
import torch
from mmengine.config import DictAction

import mmdat  # noqa: F401  (registers DAT; mmengine reads checkpoints with mmdat's safe loader)
from mmdat.models.utils import trust_checkpoint
from mmdat.utils import (ConfigError, add_checkpoint_arguments, build_inferencer, check_file,
                         check_out_file, image_file, load_dat_config, one_line_errors,
                         read_image)
from mmdat.visualization import draw_prediction

#: Detections listed by name in the printed summary.
MAX_LISTED = 10
#: Image formats ``--out`` may have (OpenCV writes them).
OUT_FORMATS = ('png', 'jpg', 'jpeg', 'bmp', 'tif', 'tiff', 'webp')


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('image', help='image file')
    parser.add_argument('config', help='an mmdet or mmseg config with a DAT backbone')
    parser.add_argument('checkpoint', nargs='?', help='weights (random initialisation without)')
    parser.add_argument('--out', required=True,
                        help=f'output image, e.g. demo.png (one of .{", .".join(OUT_FORMATS)})')
    add_checkpoint_arguments(parser)
    parser.add_argument('--device', default='cpu', help='e.g. cpu or cuda:0')
    parser.add_argument('--seed', type=int, default=0,
                        help='seed of the random initialisation (without a checkpoint)')
    parser.add_argument('--score-thr', type=float, default=0.3,
                        help='detections at or below this score are not drawn, nor any box overlapping a '
                        'better-scored one by IoU > 0.5 (detectors: one label per object)')
    parser.add_argument('--opacity', type=float, default=0.5,
                        help='opacity of the class colours (segmenters)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config entries, e.g. model.test_cfg.score_thr=0.1')
    return parser.parse_args(argv)


@one_line_errors
def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    if not 0.0 <= args.score_thr <= 1.0:
        raise SystemExit(f'--score-thr must be in [0, 1], got {args.score_thr}')
    if not 0.0 <= args.opacity <= 1.0:
        raise SystemExit(f'--opacity must be in [0, 1], got {args.opacity}')
    check_file(args.checkpoint, 'Checkpoint', addresses=True)
    check_out_file(args.out, OUT_FORMATS)
    # Read (and shrunk) before anything is built: a clear message, and no full-size decode.
    image, scale = read_image(args.image)
    cfg, kind = load_dat_config(args.config, args.cfg_options)
    if kind == 'backbone':
        raise ConfigError(f'{args.config} is a backbone-only config: the demo needs a detector or '
                          'segmenter (tools/visualize_deformable.py draws what a backbone does)')
    torch.manual_seed(args.seed)
    if args.checkpoint and args.trust_checkpoint:
        trust_checkpoint(args.checkpoint)
    inferencer = build_inferencer(cfg, kind, args.checkpoint, args.device,
                                  args.allow_partial_weights)
    with image_file(args.image, image, scale) as path:  # the inferencers read a file
        summary, sample = predict(inferencer, kind, path, args)
    meta = inferencer.model.dataset_meta
    drawing = draw_prediction(image, sample, meta['classes'], meta.get('palette'), args.score_thr,
                              args.opacity)
    mmcv.imwrite(drawing[..., ::-1], args.out)  # drawn in RGB
    print(summary)
    print(f'Saved {args.out}')


def predict(inferencer, kind: str, image_file: str, args: argparse.Namespace):
    """The one-line summary and the data sample of the inferencer's prediction."""
    with torch.no_grad():
        meta = inferencer.model.dataset_meta
        if kind == 'mmdet':
            result = inferencer(image_file, return_datasamples=True)
            instances = result['predictions'][0].pred_instances
            kept = instances[instances.scores >= args.score_thr]
            classes = inferencer.model.dataset_meta['classes']
            found = [f'{classes[label]} {score:.2f}'
                     for label, score in zip(kept.labels.tolist(), kept.scores.tolist())]
            summary = f'{len(kept)} detections with score >= {args.score_thr}' + (
                ': ' + ', '.join(found[:MAX_LISTED]) if found else '') + (
                ', ...' if len(found) > MAX_LISTED else '')
            sample = result['predictions'][0]
        else:
            sample = inferencer(image_file, return_datasamples=True)  # one image: the sample itself
            classes = meta['classes']
            summary = 'classes present: ' + ', '.join(
                classes[i] for i in np.unique(sample.pred_sem_seg.data.numpy()))
    return summary, sample


if __name__ == '__main__':
    main()
