"""Evaluate a ``pytorch2onnx.py --part predict`` ONNX model in onnxruntime on a config's test set,
as tools/test.py evaluates the PyTorch model (COCO mAP, mIoU, ...).

Examples::

    python tools/deployment/onnx_test.py configs/demo/retinanet_dat_demo_shapes.py retinanet.onnx
    python tools/deployment/onnx_test.py CONFIG retinanet.onnx --checkpoint epoch_8.pth
    python tools/deployment/onnx_test.py CONFIG retinanet.onnx --quantize static

The config's test dataloader and data preprocessor feed the model (normalised, padded batches);
the outputs are packed as mmdet/mmseg pack theirs (boxes scaled back to the original image;
class maps with the padding removed, resized to the original image) and go to the config's
test evaluator through mmengine's test loop.

Instance masks (Mask R-CNN, Cascade Mask R-CNN) are pasted into the original image and
binarised at the config's ``mask_thr_binary`` with mmdet's own function.

``--checkpoint`` also runs the PyTorch model on the same batches: its metrics are printed too,
and how many of its predictions ONNX misses (detections scoring above 0.3 without an ONNX box of
the same class at IoU >= 0.99, and with masks, mask IoU >= 0.9; pixels of another class).

``--quantize dynamic|static`` writes an int8 copy of the model with onnxruntime's quantizer
(convolutions and matrix products; static mode calibrated on ``--calib-images`` training images
through the test pipeline) next to it, ``<model>_int8_<mode>.onnx``, and evaluates both.
"""
import argparse
import copy
import importlib
import itertools
import numbers
import os.path as osp
from typing import Iterator, Optional, Sequence, Tuple

import torch
from mmengine.config import DictAction
from mmengine.evaluator import Evaluator
from mmengine.runner import Runner

from mmdat.deployment.predict import MASK_MIN_IOU
from mmdat.deployment.runtime import QUANTIZE_MODES, OnnxModel, OnnxRuntimeError, mask_threshold, quantize
from mmdat.models.utils import CheckpointError, check_weights_fit, load_checkpoint_file, trust_checkpoint
from mmdat.utils import (adapt_to_cpu, add_checkpoint_arguments, check_dataset_files, check_file,
                         load_tool_config, one_line_errors)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('config', help='the config the model was exported from')
    parser.add_argument('model', help='the ONNX file (pytorch2onnx.py --part predict)')
    parser.add_argument('--checkpoint', help='the PyTorch weights, to evaluate and compare the PyTorch model too')
    add_checkpoint_arguments(parser)
    parser.add_argument('--quantize', choices=QUANTIZE_MODES,
                        help='also write and evaluate an int8 copy (onnxruntime quantization)')
    parser.add_argument('--calib-images', type=int, default=8,
                        help='training images that calibrate --quantize static (default 8)')
    parser.add_argument('--work-dir', help='where the evaluation logs go (default: work_dirs/<config name>)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config entries, e.g. test_dataloader.batch_size=2')
    args = parser.parse_args(argv)
    if args.calib_images < 1:
        parser.error(f'--calib-images must be at least 1, got {args.calib_images}')
    return args


def build_pytorch_model(cfg, checkpoint: str, allow_partial_weights: bool) -> torch.nn.Module:
    """The config's model with ``checkpoint``'s weights (mmdat's safe loader), eval mode."""
    from mmengine.runner.checkpoint import _load_checkpoint_to_model
    cfg = copy.deepcopy(cfg)
    backbone = cfg.model.get('backbone', {})
    if isinstance(backbone, dict):
        backbone.pop('init_cfg', None)  # the weights come from the checkpoint
    model = importlib.import_module(f'{cfg.default_scope}.registry').MODELS.build(cfg.model)
    saved = load_checkpoint_file(checkpoint)
    check_weights_fit(model, saved, checkpoint, allow_partial_weights)
    _load_checkpoint_to_model(model, saved.get('state_dict', saved))
    return model.eval()


def build_preprocessor(cfg) -> torch.nn.Module:
    return importlib.import_module(f'{cfg.default_scope}.registry').MODELS.build(cfg.model.data_preprocessor)


def calibration_batches(cfg, count: int) -> Iterator[Tuple[torch.Tensor, list]]:
    """The first ``count`` training images through the test pipeline and the data preprocessor."""
    dataloader = copy.deepcopy(cfg.train_dataloader)
    dataloader.dataset.pipeline = copy.deepcopy(cfg.test_dataloader.dataset.pipeline)
    dataloader.batch_size = 1
    dataloader.sampler = dict(type='DefaultSampler', shuffle=False)
    preprocessor = build_preprocessor(cfg)
    loader = Runner.build_dataloader(dataloader)
    with torch.no_grad():
        for data in itertools.islice(loader, count):
            data = preprocessor(data, False)
            yield data['inputs'], data['data_samples']


def evaluate(cfg, model_path: str, reference: Optional[torch.nn.Module], tag: str) -> dict:
    """Run the test loop on the ONNX model (and the reference) and return the metrics of both."""
    cfg = copy.deepcopy(cfg)
    reference_evaluator = None
    if reference is not None:
        reference_evaluator = Evaluator(copy.deepcopy(cfg.test_evaluator))
    model = OnnxModel(model_path, build_preprocessor(cfg), reference, None, mask_threshold(cfg))
    runner = Runner(model=model, work_dir=osp.join(cfg.work_dir, tag), test_dataloader=cfg.test_dataloader,
                    test_evaluator=cfg.test_evaluator, test_cfg=cfg.get('test_cfg') or dict(type='TestLoop'),
                    default_hooks=cfg.get('default_hooks'), env_cfg=cfg.get('env_cfg', dict()),
                    log_processor=cfg.get('log_processor'), default_scope=cfg.default_scope,
                    launcher='none', cfg=cfg)
    if reference_evaluator is not None:
        reference_evaluator.dataset_meta = runner.test_dataloader.dataset.metainfo
        model.reference_evaluator = reference_evaluator
    metrics = runner.test()
    result = dict(onnx=metrics, agreement=model.agreement, kind=model.kind)
    if reference_evaluator is not None:
        result['pytorch'] = reference_evaluator.evaluate(len(runner.test_dataloader.dataset))
    return result


def format_metrics(metrics: dict) -> str:
    # mmdet's metrics are Python floats, mmseg's numpy scalars
    return '  '.join(f'{key}: {float(value):.4f}' if isinstance(value, numbers.Real) else f'{key}: {value}'
                     for key, value in metrics.items())


@one_line_errors
def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    check_file(args.model, 'ONNX model')
    check_file(args.checkpoint, 'Checkpoint')
    cfg = load_tool_config(args.config, args.cfg_options, 'none', args.work_dir)
    cfg.load_from = None
    adapt_to_cpu(cfg)
    check_dataset_files(cfg, ['test_dataloader'] + (['train_dataloader'] if args.quantize == 'static' else []))
    try:
        reference = None
        if args.checkpoint:
            if args.trust_checkpoint:
                trust_checkpoint(args.checkpoint)
            reference = build_pytorch_model(cfg, args.checkpoint, args.allow_partial_weights)
        results = {'fp32': evaluate(cfg, args.model, reference, 'onnx_fp32')}
        if args.quantize:
            int8_path = f'{osp.splitext(args.model)[0]}_int8_{args.quantize}.onnx'
            calibration = calibration_batches(cfg, args.calib_images) if args.quantize == 'static' else None
            quantize(args.model, int8_path, args.quantize, calibration)
            print(f'Wrote {int8_path}')
            results['int8'] = evaluate(cfg, int8_path, None, 'onnx_int8')
    except (OnnxRuntimeError, CheckpointError) as error:
        raise SystemExit(f'onnx_test: {error}') from None

    fp32 = results['fp32']
    print(f'ONNX (onnxruntime fp32) {args.model}: {format_metrics(fp32["onnx"])}')
    if 'pytorch' in fp32:
        print(f'PyTorch {args.checkpoint}: {format_metrics(fp32["pytorch"])}')
        agreement = fp32['agreement']
        what = ('PyTorch detections with score > 0.3 without an ONNX box of the same class at IoU >= 0.99'
                + (f' and mask IoU >= {MASK_MIN_IOU}' if mask_threshold(cfg) is not None else '')
                if fp32['kind'] == 'mmdet'
                else 'pixels of another class in ONNX than in PyTorch')
        print(f'{what}: {agreement["missed"]} of {agreement["total"]}')
    if 'int8' in results:
        int8 = results['int8']['onnx']
        print(f'ONNX int8 ({args.quantize}): {format_metrics(int8)}')
        changes = {key: float(int8[key]) - float(value) for key, value in fp32['onnx'].items()
                   if isinstance(value, numbers.Real) and isinstance(int8.get(key), numbers.Real)}
        print(f'int8 - fp32: {format_metrics(changes)}')
    return results


if __name__ == '__main__':
    main()
