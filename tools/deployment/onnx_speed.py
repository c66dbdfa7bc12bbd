"""Time a ``--part predict`` ONNX model in onnxruntime (and int8 copies) against the same model in
PyTorch eager mode, in turns in one process, on one random preprocessed image.

Example::

    python tools/deployment/onnx_speed.py configs/retinanet_dat_t_coco.py retinanet.onnx \\
        --int8 retinanet_int8_dynamic.onnx --shape 800 1344

Each round runs every model once, the order rotating, so that a loaded machine weighs on all
alike (:func:`mmdat.utils.benchmark.time_in_turns`); the medians and their ratios to PyTorch
are printed with the load average. PyTorch runs the module that was exported
(:func:`mmdat.deployment.build_predict_module`: the model and its post-processing) with the
checkpoint's weights, or random ones; onnxruntime and torch use their default CPU threads.
"""
import argparse
import os
from typing import Optional, Sequence

import torch

from mmdat.deployment import build_predict_module, full_image_sizes
from mmdat.deployment.runtime import OnnxRuntimeError, create_session
from mmdat.utils import check_file, load_dat_config, one_line_errors
from mmdat.utils.benchmark import load_average, time_in_turns


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('config', help='the config the model was exported from')
    parser.add_argument('model', help='the ONNX file (pytorch2onnx.py --part predict)')
    parser.add_argument('--int8', nargs='*', default=[], help='int8 copies to time too (onnx_test.py --quantize)')
    parser.add_argument('--checkpoint', help='PyTorch weights (random without; the speed hardly depends on them)')
    parser.add_argument('--shape', type=int, nargs=2, default=[800, 1344], metavar=('H', 'W'),
                        help='input size, padded as the data preprocessor pads (default 800 1344)')
    parser.add_argument('--warmup', type=int, default=1, help='untimed rounds (default 1)')
    parser.add_argument('--repeats', type=int, default=3, help='timed rounds (default 3)')
    args = parser.parse_args(argv)
    if min(args.shape) < 32 or args.repeats < 1 or args.warmup < 0:
        parser.error('--shape sides must be at least 32, --repeats at least 1, --warmup at least 0')
    return args


@one_line_errors
def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    for path in [args.model, *args.int8]:
        check_file(path, 'ONNX model')
    check_file(args.checkpoint, 'Checkpoint')
    cfg, kind = load_dat_config(args.config)
    if kind == 'backbone':
        raise SystemExit(f'{args.config} is a backbone-only config: time it with tools/analysis_tools/benchmark.py')
    import importlib
    cfg.model.backbone.pop('init_cfg', None)
    model = importlib.import_module(f'{kind}.registry').MODELS.build(cfg.model)
    if args.checkpoint:
        from mmengine.runner import load_checkpoint
        load_checkpoint(model, args.checkpoint, map_location='cpu')
    module = build_predict_module(model.eval())
    torch.manual_seed(0)
    images = torch.randn(1, 3, *args.shape)
    inputs = (images, full_image_sizes(images)) if len(module.input_names) > 1 else (images, )
    steps = {}

    def eager():
        with torch.no_grad():
            module(*inputs)

    steps['PyTorch eager'] = eager
    for name, path in [('onnxruntime fp32', args.model)] + [(f'onnxruntime int8 {os.path.basename(p)}', p)
                                                               for p in args.int8]:
        try:
            session = create_session(path)
        except OnnxRuntimeError as error:
            raise SystemExit(f'onnx_speed: {error}') from None
        feed = {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs)}
        steps[name] = (lambda s, f: lambda: s.run(None, f))(session, feed)
    seconds = time_in_turns(steps, 'cpu', args.warmup, args.repeats)
    load = load_average()
    print(f'{args.config} at 1x3x{args.shape[0]}x{args.shape[1]}, {args.repeats} rounds in turns, '
          f'torch threads {torch.get_num_threads()}, load average {load}')
    base = seconds['PyTorch eager']
    for name, value in seconds.items():
        print(f'  {name}: {value:.3f} s/image, {base / value:.2f}x PyTorch eager speed')
    return seconds


if __name__ == '__main__':
    main()
