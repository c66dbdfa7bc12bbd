"""Export a DAT backbone, or the feature extractor or whole model of an mmdet/mmseg config, to ONNX
with a dynamic batch, height and width, and keep the file only if onnxruntime agrees with PyTorch.

Examples::

    python tools/deployment/pytorch2onnx.py tiny dat_t.onnx
    python tools/deployment/pytorch2onnx.py tiny++ datpp_t.onnx --torchscript --checkpoint dat_pp_t.pth
    python tools/deployment/pytorch2onnx.py configs/retinanet_dat_t_coco.py retinanet_feats.onnx \\
        --shape 512 512 --check-shape 480 640
    python tools/deployment/pytorch2onnx.py configs/demo/retinanet_dat_demo_shapes.py retinanet.onnx \\
        --part predict --checkpoint work_dirs/demo/retinanet/epoch_8.pth

The model is exported at ``--shape`` and a batch of :data:`EXPORT_BATCH` with the batch, height
and width as dynamic axes, then run by onnxruntime at ``--shape`` with a batch of 1 and at
``--check-shape`` with a batch of 2, and compared with PyTorch. The relative error of an output
is ``max |onnx - torch| / max |torch|``; if any output at either size exceeds ``--tol`` (or
onnxruntime cannot run the model at one of the sizes) no file is written and the tool exits
with status 1 and a one-line error. ``--part predict`` is checked by its predictions instead: at
most :data:`PREDICT_TOL` of PyTorch's detections may lack an ONNX one of the same class at IoU
>= 0.99 (with masks: whose 28x28 mask binarised at 0.5 has an IoU >= 0.9 with PyTorch's;
segmentors: of the pixels may differ). The tolerance is there for decisions that rounding alone
can flip, such as a proposal at the NMS threshold; the top-k cut and mask pixels at the threshold
are not counted (:func:`mmdat.deployment.predict.unmatched_detections`). The inputs are random
but seeded (:data:`CHECK_SEED`), so that the same command reports the same numbers.

Exporters: torch.export (default, ``torch.onnx.export(dynamo=True)``) or, with ``--torchscript``,
the deprecated TorchScript exporter. For torch.export the height and width are ``Dim`` s from the
smallest size at which every stage has more than one window (DAT: ``32 * window_size + 1``) or
more than one pixel (DAT++: 33) up to 8192: below that, torch.export would have to specialise
on size-1 dimensions; ``--shape`` must lie in that range. The ONNX graph itself does not depend
on it and is checked at both sizes like the other.

Targets: an arch name builds a DAT backbone (outputs: the four stage outputs). A config builds
the whole model and exports ``extract_feat`` (backbone and neck: ``--part features``, the
default), the raw head outputs of ``model(inputs, mode='tensor')`` (``--part tensor``: for
single-stage detectors and segmentors; two-stage detectors need data samples there), or the
whole model with its post-processing (``--part predict``: detections after NMS, with masks for
Mask R-CNN and Cascade Mask R-CNN, or class maps, see :mod:`mmdat.deployment.predict`;
evaluate the file with ``tools/deployment/onnx_test.py``).
"""
import argparse
import importlib
import os
import os.path as osp
import tempfile
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from mmdat.deployment import build_predict_module, full_image_sizes
from mmdat.deployment.ops import ONNX_TRANSLATIONS, register_torchscript_symbolics
from mmdat.deployment.predict import match_predictions
from mmdat.models import DAT
from mmdat.models.backbones.dat import NUM_STAGES, STEM_STRIDE
from mmdat.utils import one_line_errors, read_config, register_scope

#: What a config exports (see the module docstring).
PARTS = ('features', 'tensor', 'predict')
#: ``--part predict``: the largest fraction of PyTorch detections without an ONNX one of the same
#: class at IoU >= 0.99 (or of pixels of another class) that the check accepts: NMS and top-k
#: may break exact ties differently.
PREDICT_TOL = 0.01
#: Seed of the random inputs of the export and the checks.
CHECK_SEED = 0

#: Largest height and width of the dynamic axes of a torch.export (``--dynamo``) export.
MAX_SIZE = 8192
#: Batch of the example input of an export: not 1, which torch.export would specialise on.
EXPORT_BATCH = 2
#: Largest batch of a torch.export (``--dynamo``) export.
MAX_BATCH = 1024
#: The batch of the check at ``--shape`` and of the check at ``--check-shape``: each differs
#: from the export in one thing.
CHECK_BATCHES = (1, EXPORT_BATCH)


class ExportError(RuntimeError):
    """The export failed, or its result disagrees with PyTorch; the message is one line."""


class FlatOutputs(nn.Module):
    """Calls ``fn`` and returns its (possibly nested) tuple/list of tensors as one flat tuple."""

    def __init__(self, model: nn.Module, part: str):
        super().__init__()
        self.model = model
        self.part = part

    def forward(self, inputs: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        if self.part == 'features':
            outputs = self.model.extract_feat(inputs)
        else:
            outputs = self.model(inputs, mode='tensor')
        flat: List[torch.Tensor] = []
        stack = [outputs]
        while stack:
            item = stack.pop(0)
            if isinstance(item, torch.Tensor):
                flat.append(item)
            elif isinstance(item, (tuple, list)):
                stack[:0] = list(item)
            else:
                raise ExportError(f'{self.part} outputs hold a {type(item).__name__}, not only tensors')
        return tuple(flat)


def build_model(target: str, checkpoint: Optional[str] = None, part: str = 'features') -> nn.Module:
    """An eval-mode DAT backbone from an arch name, or a config's model wrapped by :class:`FlatOutputs`.

    Args:
        target (str): A key of :attr:`DAT.arch_zoo` or an mmdet/mmseg config file (``.py``).
        checkpoint (str, optional): Weights to load (an mmdat checkpoint or, for an arch, an
            official DAT/DAT++ file); random weights otherwise.
        part (str): For a config, one of :data:`PARTS` (see the module docstring).

    Raises:
        ValueError: For a bad target or part, or a model that ``'predict'`` cannot export
            (:class:`UnsupportedModelError`, naming the part).
    """
    if part not in PARTS:
        raise ValueError(f'part must be one of {PARTS}, got {part!r}')
    if target in DAT.arch_zoo:
        init_cfg = dict(type='Pretrained', checkpoint=checkpoint) if checkpoint else None
        model = DAT(arch=target, drop_path_rate=0.0, init_cfg=init_cfg)
        model.init_weights()
        return model.eval()
    if not target.endswith('.py') or not osp.isfile(target):
        raise ValueError(f'target must be one of {sorted(DAT.arch_zoo)} or an existing config '
                         f'file (.py), got {target!r}')
    from mmengine.runner import load_checkpoint

    cfg = read_config(target)
    scope = register_scope(cfg)
    backbone = cfg.model.get('backbone', {})
    if backbone.get('type') == 'DAT':
        backbone.pop('init_cfg', None)  # the weights come from --checkpoint, or none
    model = importlib.import_module(f'{scope}.registry').MODELS.build(cfg.model)
    if checkpoint:
        load_checkpoint(model, checkpoint, map_location='cpu')
    if part == 'predict':
        return build_predict_module(model.eval())
    return FlatOutputs(model, part).eval()


def find_backbone(model: nn.Module) -> Optional[DAT]:
    """The first :class:`DAT` in ``model`` (itself included), or ``None``."""
    return next((m for m in model.modules() if isinstance(m, DAT)), None)


def dynamo_min_size(model: nn.Module) -> int:
    """Smallest height/width of a torch.export export of ``model`` (see the module docstring)."""
    backbone = find_backbone(model)
    if backbone is None:
        return 2
    last_stride = STEM_STRIDE * 2**(NUM_STAGES - 1)
    size = last_stride + 1  # the last stage has more than one pixel
    for module in backbone.modules():
        window = getattr(module, 'window_size', None)  # WindowAttention: more than one window
        if isinstance(window, int):
            size = max(size, last_stride * window + 1)
    return size


def is_predict(model: nn.Module) -> bool:
    """Whether ``model`` is a ``--part predict`` module (detections or class maps out)."""
    return hasattr(model, 'output_names')


def model_inputs(model: nn.Module, batch: int, channels: int, shape: Sequence[int]) -> Tuple[torch.Tensor, ...]:
    """The inputs of ``model`` for a batch of random images (seeded: :data:`CHECK_SEED`): the
    images, and for a detector's predict module their ``image_sizes``, the last image of a batch
    of several as if it were padded by a tenth (so that the check also sees boxes clipped to a
    smaller image)."""
    images = torch.randn(batch, channels, *shape, generator=torch.Generator().manual_seed(CHECK_SEED))
    if len(getattr(model, 'input_names', ('inputs', ))) == 1:
        return (images, )
    sizes = full_image_sizes(images)
    if len(sizes) > 1:
        sizes[-1] = sizes[-1] * 9 // 10
    return images, sizes


def export_onnx(model: nn.Module, path: str, shape: Sequence[int], dynamo: bool = False,
                opset: int = 18) -> None:
    """Export ``model`` at an ``(EXPORT_BATCH, C, H, W)`` input of ``shape`` with dynamic B, H and W.

    Raises:
        ExportError: When the exporter fails.
    """
    backbone = find_backbone(model)
    inputs = model_inputs(model, EXPORT_BATCH, backbone.in_channels if backbone is not None else 3, shape)
    min_opset = getattr(model, 'min_opset', None)
    if min_opset is not None and opset < min_opset:
        raise ExportError(f'--opset {opset}: this model needs opset {min_opset} or later '
                          '(ONNX RoiAlign with half-pixel coordinates)')
    input_names = list(getattr(model, 'input_names', ('inputs', )))
    # predict modules name their outputs; the others keep the exporters' names
    output_names = list(getattr(model, 'output_names', ())) or None
    try:
        if dynamo:
            from torch.export import Dim
            low = dynamo_min_size(model)
            if min(shape) < low:
                raise ExportError(f'torch.export needs --shape of at least {low} a side for this '
                                  f'model (every stage with more than one window/pixel), got {shape}')
            batch = Dim('batch', min=1, max=MAX_BATCH)
            dims = ({0: batch, 2: Dim('height', min=low, max=MAX_SIZE), 3: Dim('width', min=low, max=MAX_SIZE)},
                    ) + ({0: batch}, ) * (len(inputs) - 1)
            # torch.export would otherwise guard on every size-1 check of views and broadcasts
            import torch.fx.experimental._config as fx_config
            with fx_config.patch(backed_size_oblivious=True), torch.no_grad():
                torch.onnx.export(model, inputs, path, dynamo=True, opset_version=opset,
                                  input_names=input_names, output_names=output_names,
                                  dynamic_shapes=dims, external_data=False,
                                  custom_translation_table=ONNX_TRANSLATIONS)
        else:
            register_torchscript_symbolics(opset)
            axes = {'inputs': {0: 'batch', 2: 'height', 3: 'width'}}
            for name in input_names[1:] + (output_names or []):
                axes[name] = {0: 'batch', 1: 'height', 2: 'width'} if name == 'seg_map' else {0: 'batch'}
            with torch.no_grad():
                torch.onnx.export(model, inputs, path, dynamo=False, opset_version=opset,
                                  input_names=input_names, output_names=output_names,
                                  dynamic_axes=axes)
    except ExportError:
        raise
    except Exception as error:  # the exporters raise many types; report the root cause
        root = error
        while root.__cause__ is not None:
            root = root.__cause__
        lines = str(root).strip().splitlines()
        raise ExportError(f'export failed: {type(root).__name__}: {lines[0] if lines else ""}') \
            from error


def run_both(model: nn.Module, path: str, shape: Sequence[int],
             batch: int) -> Tuple[List[np.ndarray], List[np.ndarray]]:
    """PyTorch's and onnxruntime's outputs at a random (seeded) ``(batch, C, H, W)`` input of ``shape``.

    Raises:
        ExportError: When onnxruntime cannot run the model at this size, or the number or shapes
            of the outputs differ.
    """
    import onnxruntime as ort
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    feed = session.get_inputs()
    inputs = model_inputs(model, batch, feed[0].shape[1] if isinstance(feed[0].shape[1], int) else 3, shape)
    with torch.no_grad():
        expected = model(*inputs)
    expected = [expected] if isinstance(expected, torch.Tensor) else list(expected)
    try:
        actual = session.run(None, {f.name: x.numpy() for f, x in zip(feed, inputs)})
    except Exception as error:
        message = str(error).strip().splitlines()[0]
        raise ExportError(f'onnxruntime cannot run the model at {batch}x{shape[0]}x{shape[1]}: {message}') \
            from error
    if len(actual) != len(expected):
        raise ExportError(f'the ONNX model has {len(actual)} outputs, PyTorch {len(expected)}')
    expected = [out.numpy() for out in expected]
    for i, (onnx_out, torch_out) in enumerate(zip(actual, expected)):
        if onnx_out.shape != torch_out.shape:
            raise ExportError(f'output {i} at {batch}x{shape[0]}x{shape[1]}: ONNX shape {onnx_out.shape}, '
                              f'PyTorch {torch_out.shape}')
    return expected, actual


def relative_errors(model: nn.Module, path: str, shape: Sequence[int], batch: int = 1) -> List[float]:
    """``max |onnx - torch| / max |torch|`` of each output at a ``(batch, C, H, W)`` input of ``shape``.

    Raises:
        ExportError: As :func:`run_both`.
    """
    expected, actual = run_both(model, path, shape, batch)
    return [float(np.abs(onnx_out - torch_out).max()) / max(float(np.abs(torch_out).max()), 1e-12)
            for onnx_out, torch_out in zip(actual, expected)]


def export_checked(model: nn.Module, output: str, shape: Sequence[int],
                   check_shape: Sequence[int], dynamo: bool = False, opset: int = 18,
                   tol: float = 1e-4) -> dict:
    """Export to a temporary file, compare with PyTorch at both sizes, then move it to ``output``.

    Returns:
        dict: ``{(B, H, W): [relative error of each output]}`` for both checks: ``shape`` at a
        batch of 1 and ``check_shape`` at a batch of 2 (:data:`CHECK_BATCHES`). For a predict
        module, ``[the fraction of PyTorch's predictions that ONNX misses]``
        (:func:`match_predictions`), which must not exceed :data:`PREDICT_TOL`; ``tol`` is then
        not used.

    Raises:
        ExportError: When the export fails or disagrees; ``output`` is then not written.
    """
    try:
        import onnxruntime  # noqa: F401
    except ImportError as error:
        raise ExportError('checking the export needs onnxruntime: pip install onnxruntime') from error
    if tuple(shape) == tuple(check_shape):
        raise ExportError(f'--check-shape must differ from --shape ({shape[0]}x{shape[1]}): '
                          'the point is a size the export did not see')
    model.eval()
    directory = osp.dirname(osp.abspath(output))
    os.makedirs(directory, exist_ok=True)
    handle, tmp_path = tempfile.mkstemp(suffix='.onnx', dir=directory)
    os.close(handle)
    try:
        export_onnx(model, tmp_path, shape, dynamo=dynamo, opset=opset)
        report = {}
        for batch, size in zip(CHECK_BATCHES, (tuple(shape), tuple(check_shape))):
            where = f'{batch}x{size[0]}x{size[1]}'
            if is_predict(model):
                missed = match_predictions(*run_both(model, tmp_path, size, batch))
                report[(batch, *size)] = [missed]
                if not missed <= PREDICT_TOL:
                    raise ExportError(f'the ONNX model disagrees with PyTorch at {where}: it misses '
                                      f'{missed:.1%} of the predictions (> {PREDICT_TOL:.0%}); not written')
                continue
            errors = report[(batch, *size)] = relative_errors(model, tmp_path, size, batch)
            worst = max(errors)
            if not worst <= tol:  # also NaN
                raise ExportError(f'the ONNX model disagrees with PyTorch at {where}: '
                                  f'relative error {worst:.2e} > tol {tol:.0e}; not written')
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp's 0600 is not what a plain open() makes
        os.replace(tmp_path, output)
        return report
    finally:
        if osp.exists(tmp_path):
            os.remove(tmp_path)


def parse_shape(parser: argparse.ArgumentParser, values: List[int], option: str) -> Tuple[int, int]:
    if len(values) not in (1, 2) or min(values) < STEM_STRIDE:
        parser.error(f'{option} takes H or H W, each at least {STEM_STRIDE}, got {values}')
    return (values[0], values[-1])


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('target', help=f'a DAT arch ({", ".join(DAT.arch_zoo)}) or an mmdet/mmseg config')
    parser.add_argument('output', help='the .onnx file to write')
    parser.add_argument('--checkpoint', help='weights to load (random weights without)')
    parser.add_argument('--part', choices=PARTS, default='features',
                        help="config only: 'features' (backbone + neck, default), 'tensor' "
                        "(raw head outputs) or 'predict' (the whole model with its post-processing: "
                        'detections after NMS, or class maps)')
    parser.add_argument('--shape', type=int, nargs='+', default=[256],
                        help='export size: H, or H W (default 256)')
    parser.add_argument('--check-shape', type=int, nargs='+', default=[320, 480],
                        help='second size checked with onnxruntime: H, or H W (default 320 480)')
    parser.add_argument('--torchscript', action='store_true',
                        help="export with torch's deprecated TorchScript exporter (default: "
                        'torch.export)')
    parser.add_argument('--opset', type=int, default=18, help='ONNX opset (default 18)')
    parser.add_argument('--tol', type=float, default=1e-4,
                        help='largest relative error accepted at each size (default 1e-4; '
                        f'--part predict instead accepts at most {PREDICT_TOL * 100:.0f}%% of missed predictions)')
    args = parser.parse_args(argv)
    args.shape = parse_shape(parser, args.shape, '--shape')
    args.check_shape = parse_shape(parser, args.check_shape, '--check-shape')
    if not args.tol > 0:
        parser.error(f'--tol must be positive, got {args.tol}')
    if args.part != 'features' and args.target in DAT.arch_zoo:
        parser.error(f'--part {args.part} needs a detector or segmenter config, not a backbone arch')
    return args


@one_line_errors
def main(argv=None) -> dict:
    args = parse_args(argv)
    try:
        model = build_model(args.target, args.checkpoint, args.part)
        report = export_checked(model, args.output, args.shape, args.check_shape,
                                not args.torchscript, args.opset, args.tol)
    except (ExportError, ValueError) as error:
        raise SystemExit(f'pytorch2onnx: {error}')
    exporter = 'TorchScript' if args.torchscript else 'torch.export (dynamo)'
    weights = args.checkpoint or 'random weights'
    print(f'Wrote {args.output} ({exporter} exporter, opset {args.opset}, dynamic batch/height/width, '
          f'{weights})')
    for (batch, height, width), errors in report.items():
        if is_predict(model):
            print(f'  onnxruntime vs PyTorch at {batch}x{height}x{width}: {errors[0]:.1%} of the '
                  'predictions missed')
        else:
            print(f'  onnxruntime vs PyTorch at {batch}x{height}x{width}: max relative error '
                  f'{max(errors):.2e} over {len(errors)} outputs')
    return report


if __name__ == '__main__':
    main()
