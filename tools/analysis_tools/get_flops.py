"""Parameters and FLOPs of a DAT backbone or of a whole mmdet/mmseg config at one input size.

Examples::

    python tools/analysis_tools/get_flops.py tiny                    # DAT-T at 224x224
    python tools/analysis_tools/get_flops.py base --shape 800 1333
    python tools/analysis_tools/get_flops.py configs/dat/retinanet_dat-t_fpn_1x_coco.py --shape 800 1333

What is counted (mmengine.analysis.FlopAnalyzer, fvcore's convention): one multiply-add is one
FLOP. Convolutions, linear layers and matmuls (with the attention scores ``q k^T`` and the
weighted sum ``P v``, also when they run inside SDPA), LayerNorm (2 per element, affine),
and bilinear sampling (4 per sampled value: the sampled keys/values of the deformable blocks
and the sampled position bias, one value per head, query and key). Not counted: softmax,
GELU, tanh, additions of biases and residuals, and the index arithmetic of the samplers. The
count traces the model through the 'sdpa' path; the fused path does the same arithmetic.
"""
import argparse
import importlib
import os.path as osp
from typing import Any, List, Sequence

import torch
import torch.nn as nn
from mmengine.analysis import FlopAnalyzer, parameter_count
from mmengine.analysis.jit_handles import get_shape

from mmdat.models import DAT


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
    """Calls an mmdet/mmseg model in ``'tensor'`` mode (backbone, neck and head, no post-processing)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor):
        return self.model(inputs, mode='tensor')


def build_model(target: str) -> nn.Module:
    """A DAT backbone from an arch name, or the whole model of an mmdet/mmseg config."""
    if target in DAT.arch_zoo:
        return DAT(arch=target, attn_impl='sdpa')
    if not target.endswith('.py') or not osp.isfile(target):
        raise SystemExit(f'target must be one of {sorted(DAT.arch_zoo)} or an existing config '
                         f'file (.py), got {target!r}')
    from mmengine.config import Config

    from mmdat.utils.setup_cfg import register_scope
    cfg = Config.fromfile(target)
    scope = register_scope(cfg)
    backbone = cfg.model.get('backbone', {})
    if backbone.get('type') == 'DAT':
        backbone['attn_impl'] = 'sdpa'  # traceable; the fused kernel does the same arithmetic
        backbone.pop('init_cfg', None)  # count only: no checkpoint needed
    model = importlib.import_module(f'{scope}.registry').MODELS.build(cfg.model)
    return TensorModeWrapper(model)


def count(model: nn.Module, shape: Sequence[int]) -> dict:
    """Parameters and FLOPs of ``model`` on one ``(1, 3, H, W)`` input."""
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
    return dict(params=parameter_count(model)[''], flops=flops, by_op=dict(by_op), skipped=dict(skipped))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('target', help=f'a DAT arch ({", ".join(DAT.arch_zoo)}) or an mmdet/mmseg config')
    parser.add_argument('--shape', type=int, nargs='+', default=[224],
                        help='input size: H, or H W (default 224)')
    args = parser.parse_args(argv)
    if len(args.shape) not in (1, 2) or min(args.shape) < 4:
        parser.error(f'--shape takes H or H W, each at least 4, got {args.shape}')
    if len(args.shape) == 1:
        args.shape = args.shape * 2
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = count(build_model(args.target), args.shape)
    height, width = args.shape
    print(f'Input: 1x3x{height}x{width}   Model: {args.target}')
    print(f'Parameters: {result["params"] / 1e6:.2f} M')
    print(f'FLOPs (multiply-adds): {result["flops"] / 1e9:.2f} G')
    print('By operator: ' + ', '.join(f'{op} {n / 1e9:.3f} G' for op, n in
                                     sorted(result['by_op'].items(), key=lambda kv: -kv[1])))
    if result['skipped']:
        print('Not counted: ' + ', '.join(f'{op} (x{n})' for op, n in sorted(result['skipped'].items())))
    return result


if __name__ == '__main__':
    main()
