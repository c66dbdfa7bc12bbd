"""The embedded demo: generate the shapes dataset, train and evaluate a DAT detector and a DAT
segmenter on it, and draw their predictions on validation images.

Runs on a CPU in minutes (see the README for measured times). Everything goes to --work-dir:
the checkpoints and logs of both models, ``results.json`` (untrained and trained metrics, times)
and ``predictions.png``.
"""
import argparse
import json
import os
import os.path as osp
import time
from typing import Optional

import numpy as np
import torch
from mmengine.runner import Runner

from mmdat.datasets import make_synthetic_dataset
from mmdat.utils import (adapt_to_cpu, build_inferencer, load_dat_config, load_tool_config,
                         one_line_errors)

REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
DET_CONFIG = osp.join(REPO_ROOT, 'configs', 'demo', 'retinanet_dat_demo_shapes.py')
SEG_CONFIG = osp.join(REPO_ROOT, 'configs', 'demo', 'fpn_dat_demo_shapes.py')
NUM_VAL_IMAGES = 50
IMAGE_SIZE = (192, 256)  # (h, w)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--data-root', default='data/shapes',
                        help='where the dataset is (generated there if missing)')
    parser.add_argument('--work-dir', default='work_dirs/demo', help='where everything is written')
    parser.add_argument('--train-images', type=int, default=1600,
                        help='training images to generate (when the dataset does not exist yet)')
    parser.add_argument('--det-epochs', type=int,
                        help="train the detector this many epochs instead of the config's")
    parser.add_argument('--seg-iters', type=int,
                        help="train the segmenter this many iterations instead of the config's")
    parser.add_argument('--num-pictures', type=int, default=4,
                        help='validation images drawn in predictions.png')
    parser.add_argument('--skip-seg', action='store_true', help='only the detector')
    return parser.parse_args()


def prepare_data(data_root: str, train_images: int) -> None:
    if osp.exists(osp.join(data_root, 'annotations', 'instances_val.json')):
        print(f'Using the shapes dataset in {data_root}')
        return
    if train_images < 1:
        raise SystemExit(f'--train-images must be >= 1, got {train_images}')
    start = time.perf_counter()
    make_synthetic_dataset(data_root, dict(train=train_images, val=NUM_VAL_IMAGES),
                           image_size=IMAGE_SIZE, seed=0)
    print(f'Generated the shapes dataset in {data_root} ({train_images} train / {NUM_VAL_IMAGES} '
          f'val images) in {time.perf_counter() - start:.0f} s')


def train_and_evaluate(config: str, work_dir: str, length: Optional[int]) -> dict:
    """Evaluate the freshly initialised model, train it (the training loop evaluates it at the
    end) and return both sets of metrics.

    ``length`` overrides the number of epochs (epoch-based config) or iterations.
    """
    cfg = load_tool_config(config, None, 'none', work_dir)
    unit = 'max_epochs' if 'max_epochs' in cfg.train_cfg else 'max_iters'
    if length is not None:
        if length < 1:
            raise SystemExit(f'--det-epochs / --seg-iters must be >= 1, got {length}')
        # The schedulers counted in the run's unit that span the whole run still do; those that
        # would start after a shorter run are dropped, and a warm-up longer than it ends with it.
        schedulers = []
        for scheduler in cfg.param_scheduler:
            in_unit = scheduler.get('by_epoch', True) == (unit == 'max_epochs')
            if in_unit and scheduler.get('end') == cfg.train_cfg[unit]:
                scheduler.end = length
            if in_unit and scheduler.get('begin', 0) >= length:
                continue
            if in_unit and scheduler.get('end', length) > length:
                scheduler.end = length
            schedulers.append(scheduler)
        cfg.param_scheduler = schedulers
        cfg.train_cfg[unit] = length
    cfg.train_cfg.val_interval = cfg.train_cfg[unit]  # only at the end
    adapt_to_cpu(cfg)
    runner = Runner.from_cfg(cfg)
    # Initialised once: the second call, inside train(), keeps these weights.
    runner.model.init_weights()
    untrained = runner.val()
    start = time.perf_counter()
    runner.train()
    train_seconds = time.perf_counter() - start
    trained = {key[len('val/'):]: buffer.current() for key, buffer in runner.message_hub.log_scalars.items()
               if key.startswith('val/') and key not in ('val/time', 'val/data_time')}
    with open(osp.join(work_dir, 'last_checkpoint')) as f:  # the absolute path of the last one
        checkpoint = f.read().strip()
    return dict(untrained=untrained, trained=trained, train_seconds=train_seconds,
                checkpoint=checkpoint, config=config)


def draw_predictions(data_root: str, det: dict, seg: Optional[dict], out_file: str, num: int) -> None:
    """One row of detections and one of segmentations, on the first ``num`` val images, predicted
    by mmdet's and mmseg's inferencers and drawn as every mmdat tool draws them
    (:func:`mmdat.visualization.draw_prediction`: one label per object)."""
    import mmcv

    from mmdat.utils import read_image
    from mmdat.visualization import draw_prediction
    names = sorted(os.listdir(osp.join(data_root, 'val', 'images')))[:num]
    images = [osp.join(data_root, 'val', 'images', name) for name in names]
    rows = []
    for model in (det, seg):
        if model is None:
            continue
        cfg, scope = load_dat_config(model['config'])
        inferencer = build_inferencer(cfg, scope, model['checkpoint'], 'cpu')
        meta = inferencer.model.dataset_meta
        drawings = []
        for image in images:
            with torch.no_grad():
                result = inferencer(image, return_datasamples=True)
            # mmdet returns a dict with a list of data samples, mmseg the data sample itself
            sample = result['predictions'][0] if isinstance(result, dict) else result
            drawings.append(draw_prediction(read_image(image)[0], sample, meta['classes'], meta.get('palette')))
        rows.append(np.concatenate(drawings, axis=1))
    # the visualizers return RGB, mmcv.imwrite takes BGR
    mmcv.imwrite(np.concatenate(rows, axis=0)[..., ::-1], out_file, auto_mkdir=True)


@one_line_errors
def main():
    args = parse_args()
    os.chdir(REPO_ROOT)
    os.environ['SHAPES_ROOT'] = args.data_root.rstrip('/') + '/'  # read by the demo configs
    start = time.perf_counter()
    prepare_data(args.data_root, args.train_images)
    results = dict(detection=train_and_evaluate(DET_CONFIG, osp.join(args.work_dir, 'retinanet'),
                                                args.det_epochs))
    if not args.skip_seg:
        results['segmentation'] = train_and_evaluate(SEG_CONFIG, osp.join(args.work_dir, 'fpn'),
                                                     args.seg_iters)
    picture = osp.join(args.work_dir, 'predictions.png')
    draw_predictions(args.data_root, results['detection'], results.get('segmentation'), picture,
                     args.num_pictures)
    results['total_seconds'] = time.perf_counter() - start
    with open(osp.join(args.work_dir, 'results.json'), 'w') as f:
        json.dump(results, f, indent=2, default=float)  # numpy scalars from the metrics

    det, seg = results['detection'], results.get('segmentation')
    print(f'\nDemo results on the {NUM_VAL_IMAGES} validation images:')
    # mmdet gives no metrics when no box scores above the threshold: that is an mAP of 0
    trained, untrained = det['trained'], det['untrained']
    print(f'  RetinaNet + DAT     bbox mAP@[.5:.95] {trained.get("coco/bbox_mAP", 0.0):.3f} '
          f'(untrained {untrained.get("coco/bbox_mAP", 0.0):.3f}), '
          f'bbox mAP@.5 {trained.get("coco/bbox_mAP_50", 0.0):.3f}, trained in {det["train_seconds"]:.0f} s')
    if seg:
        print(f'  Semantic FPN + DAT  mIoU {seg["trained"]["mIoU"]:.1f} '
              f'(untrained {seg["untrained"]["mIoU"]:.1f}), trained in {seg["train_seconds"]:.0f} s')
    print(f'  predictions: {picture}\n  total time: {results["total_seconds"]:.0f} s')


if __name__ == '__main__':
    main()
