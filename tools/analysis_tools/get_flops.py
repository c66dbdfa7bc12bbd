"""Parameters and FLOPs of a DAT backbone, of a backbone of the benchmark's peer table (mmdet's
Swin Transformer) or of a whole mmdet/mmseg config at one input size.

Examples::

    python tools/analysis_tools/get_flops.py tiny                    # DAT-T at 224x224
    python tools/analysis_tools/get_flops.py base --shape 800 1333
    python tools/analysis_tools/get_flops.py configs/retinanet_dat_t_coco.py --shape 800 1333
    python tools/analysis_tools/get_flops.py configs/mask_rcnn_dat_t_coco.py --shape 800 1333
    python tools/analysis_tools/get_flops.py Swin-T --shape 800 1333   # a model of the peer table

What is counted (mmengine.analysis.FlopAnalyzer, fvcore's convention): one multiply-add is one
FLOP. Convolutions, linear layers and matmuls (with the attention scores ``q k^T`` and the
weighted sum ``P v``, also when they run inside SDPA), LayerNorm (2 per element, affine),
and bilinear sampling (4 per sampled value: the sampled keys/values of the deformable blocks
and the sampled position bias, one value per head, query and key). Not counted: softmax,
GELU, tanh, additions of biases and residuals, and the index arithmetic of the samplers. The
count traces the model through the 'sdpa' path; the fused path does the same arithmetic.

A config is counted in mmdet's/mmseg's ``'tensor'`` mode (no post-processing) on one random image
whose ``img_shape`` is the input size. Two-stage detectors (Mask R-CNN, Cascade Mask R-CNN) also
run the RPN's proposal selection there: their RoI heads are counted on the proposals it keeps,
which on an untrained model and a random image is usually the test config's ``rpn.max_per_img``
(mmdet's configs: 1000), the worst case; the tool prints the number.
"""
import argparse
import importlib
import os.path as osp
from typing import Any, List, Optional, Sequence

import torch
import torch.nn as nn
from mmengine.analysis import FlopAnalyzer, parameter_count
from mmengine.analysis.jit_handles import get_shape
from mmengine.config import DictAction

from mmdat.models import DAT
from mmdat.utils import one_line_errors, read_config, register_scope
from mmdat.utils.benchmark import PEER_MODELS
from mmdat.utils.benchmark import build_model as build_peer_model


def sdpa_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """``aten::scaled_dot_product_attention``: ``q k^T`` and ``P v`` as two batched matmuls."""
    query, key, value = (get_shape(v) for v in inputs[:3])
    batch = 1
    for size in query[:-2]:
        batch *= size
    num_queries, head_dims = query[-2:]
    num_keys, value_dims = key[-2], value[-1]
    return batch * num_queries * num_keys * (head_dims + value_dims)


class TensorModeWrapper(nn.Module):
    """Calls an mmdet/mmseg model in ``'tensor'`` mode (backbone, neck and head, no post-processing).

    Args:
        model (nn.Module): The detector or segmenter.
        data_samples (list, optional): Passed with every input. Two-stage detectors need them:
            their RPN selects proposals inside the image (``metainfo['img_shape']``).
    """

    def __init__(self, model: nn.Module, data_samples: Optional[list] = None):
        super().__init__()
        self.model = model
        self.data_samples = data_samples

    def forward(self, inputs: torch.Tensor):
        return self.model(inputs, self.data_samples, mode='tensor')


def image_data_samples(scope: str, shape: Sequence[int]) -> Optional[list]:
    """One data sample describing an unpadded, unscaled ``shape`` image, as mmdet's data
    preprocessor would make it (mmseg's models need none in tensor mode)."""
    if scope != 'mmdet':
        return None
    from mmdet.structures import DetDataSample
    shape = tuple(shape)
    return [DetDataSample(metainfo=dict(img_shape=shape, ori_shape=shape, pad_shape=shape, batch_input_shape=shape,
                                        scale_factor=(1.0, 1.0)))]


def build_model(target: str, shape: Sequence[int] = (224, 224), cfg_options: Optional[dict] = None) -> nn.Module:
    """A DAT backbone from an arch name, a backbone of the benchmark's peer table from its name
    (``'Swin-T'``, ``'DAT-T'``, ...: the models ``benchmark.py --peers`` times), or the whole
    model of an mmdet/mmseg config (with ``cfg_options`` merged in) wrapped for one ``shape``
    input."""
    if target in DAT.arch_zoo or target in PEER_MODELS:
        if cfg_options:
            raise SystemExit('--cfg-options applies to a config, not to an arch or model name')
        spec = dict(PEER_MODELS.get(target, dict(type='dat', arch=target)))
        if spec['type'] == 'dat':
            spec['attn_impl'] = 'sdpa'
        return build_peer_model(spec)
    if not target.endswith('.py') or not osp.isfile(target):
        raise SystemExit(f'target must be one of {sorted(DAT.arch_zoo)}, a model of the peer table '
                         f'{list(PEER_MODELS)} or an existing config file (.py), got {target!r}')
    cfg = read_config(target, cfg_options)
    scope = register_scope(cfg)
    backbone = cfg.model.get('backbone', {})
    if backbone.get('type') == 'DAT':
        backbone['attn_impl'] = 'sdpa'  # traceable; the fused kernel does the same arithmetic
        backbone.pop('init_cfg', None)  # count only: no checkpoint needed
    model = importlib.import_module(f'{scope}.registry').MODELS.build(cfg.model)
    return TensorModeWrapper(model, image_data_samples(scope, shape))


def num_proposals(model: nn.Module, inputs: torch.Tensor) -> Optional[int]:
    """How many proposals the RPN of a two-stage detector keeps for ``inputs`` (None without RPN)."""
    if not isinstance(model, TensorModeWrapper) or not getattr(model.model, 'with_rpn', False):
        return None
    detector = model.model
    with torch.no_grad():
        proposals = detector.rpn_head.predict(detector.extract_feat(inputs), model.data_samples, rescale=False)
    return len(proposals[0])


def count(model: nn.Module, shape: Sequence[int]) -> dict:
    """Parameters and FLOPs of ``model`` on one ``(1, 3, H, W)`` input, and for a two-stage
    detector the number of proposals its RoI heads were counted on."""
    model.eval()
    inputs = torch.randn(1, 3, *shape)
    analyzer = FlopAnalyzer(model, (inputs, ))
    analyzer.set_op_handle('aten::scaled_dot_product_attention', sdpa_flop_jit)
    analyzer.unsupported_ops_warnings(False)
    analyzer.uncalled_modules_warnings(False)
    with torch.no_grad():
        flops = analyzer.total()
        by_op = analyzer.by_operator()
        skipped = analyzer.unsupported_ops()
    return dict(params=parameter_count(model)[''], flops=flops, by_op=dict(by_op), skipped=dict(skipped),
                proposals=num_proposals(model, inputs))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('target', help=f'a DAT arch ({", ".join(DAT.arch_zoo)}), a model of the benchmark\'s '
                        f'peer table ({", ".join(PEER_MODELS)}) or an mmdet/mmseg config')
    parser.add_argument('--shape', type=int, nargs='+', default=[224],
                        help='input size: H, or H W (default 224)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, metavar='KEY=VALUE',
                        help='override settings of a config, e.g. model.backbone.arch=small')
    args = parser.parse_args(argv)
    if len(args.shape) not in (1, 2) or min(args.shape) < 4:
        parser.error(f'--shape takes H or H W, each at least 4, got {args.shape}')
    if len(args.shape) == 1:
        args.shape = args.shape * 2
    return args


@one_line_errors
def main(argv=None) -> dict:
    args = parse_args(argv)
    result = count(build_model(args.target, args.shape, args.cfg_options), args.shape)
    height, width = args.shape
    print(f'Input: 1x3x{height}x{width}   Model: {args.target}')
    print(f'Parameters: {result["params"] / 1e6:.2f} M')
    print(f'FLOPs (multiply-adds): {result["flops"] / 1e9:.2f} G')
    print('By operator: ' + ', '.join(f'{op} {n / 1e9:.3f} G' for op, n in
                                     sorted(result['by_op'].items(), key=lambda kv: -kv[1])))
    if result['proposals'] is not None:
        print(f'RoI heads counted on {result["proposals"]} proposals (the RPN\'s output on a random image)')
    if result['skipped']:
        print('Not counted: ' + ', '.join(f'{op} (x{n})' for op, n in sorted(result['skipped'].items())))
    return result


if __name__ == '__main__':
    main()
