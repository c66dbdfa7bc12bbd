"""Draw where a deformable attention block of DAT looks, on an image (Figure 5 of the paper).

Left panel: the reference grid and the deformed sampling points of each offset group, with arrows
from reference to sampled point. Right panel: for a few queries, the keys with the highest
attention weights (over all heads), circles sized by weight. Everything drawn is what the block
computed in this forward pass (recorded with mmdat.models.utils.record_deformable_attention).

Stages are numbered 1-4 as in the paper (stages 3 and 4 have deformable blocks in DAT-T/S/B);
--block is the index of the block inside its stage, 0-based, as in the module and weight names
(`backbone.stages.{stage - 1}.blocks.{block}.attn`): in DAT the deformable blocks are 1, 3, 5, ...

Input: with a detector or segmenter config, the image goes through the config's test pipeline and
data preprocessor (as mmdet's/mmseg's inferencers do, e.g. resized); with a backbone-only config
(`model = dict(type='DAT', ...)`) the image is used at its own size, normalised with the config's
`data_preprocessor` mean/std if it has one, else the ImageNet ones. Points are drawn on the
original image, mapped back through the resize. An image over 2048 pixels a side is shrunk to
that first (and drawn at that size; --query stays in the pixels of the file); one over 100
million pixels is refused unless it is a JPEG (decoded reduced).
"""
import argparse
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from matplotlib.backend_bases import FigureCanvasBase
from mmengine.config import DictAction

import mmdat  # noqa: F401  (registers DAT; mmengine reads checkpoints with mmdat's safe loader)
from mmdat.models import DAT
from mmdat.models.utils import (check_unloaded, deformable_blocks, record_deformable_attention,
                                trust_checkpoint)
from mmdat.utils import (add_checkpoint_arguments, build_inferencer, check_file, check_out_file,
                         image_file, load_dat_config, one_line_errors, read_image)
from mmdat.visualization import STAGE_STRIDES, draw_deformable_attention, query_index

#: RGB ImageNet statistics, used for backbone-only configs without a data_preprocessor.
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('image', help='image file')
    parser.add_argument('--config', required=True,
                        help='a detector/segmenter config with a DAT backbone, or a backbone-only '
                        "config (model = dict(type='DAT', ...))")
    parser.add_argument('--checkpoint', help='weights (random initialisation without)')
    parser.add_argument('--stage', type=int, default=3,
                        help='stage, 1-based as in the paper (default: 3)')
    parser.add_argument('--block', type=int,
                        help='index of the deformable block inside the stage, 0-based as in '
                        '`stages.{stage-1}.blocks.{block}` (default: the last deformable block)')
    parser.add_argument('--query', nargs=2, type=float, action='append', metavar=('X', 'Y'),
                        help='a query, as pixel coordinates of the image; repeat for more '
                        '(default: --num-queries queries along the image diagonal)')
    parser.add_argument('--num-queries', type=int, default=3,
                        help='queries picked along the diagonal when no --query is given '
                        '(default: 3)')
    parser.add_argument('--top-k', type=int, default=16, help='keys drawn per query (default: 16)')
    parser.add_argument('--grid-step', type=int,
                        help='draw every N-th reference point (default: about 24 / sqrt(offset groups) '
                        'a side)')
    parser.add_argument('--out', required=True,
                        help='output image, e.g. deformable.png (a format matplotlib writes: '
                        '.png, .pdf, .svg, .jpg, ...)')
    add_checkpoint_arguments(parser)
    parser.add_argument('--device', default='cpu', help='e.g. cpu or cuda:0')
    parser.add_argument('--seed', type=int, default=0,
                        help='seed of the random initialisation (without a checkpoint)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config entries, e.g. model.backbone.attn_impl=reference')
    return parser.parse_args(argv)


def backbone_and_input(args: argparse.Namespace, image: np.ndarray,
                       image_file: str) -> Tuple[DAT, torch.Tensor, Tuple[float, float]]:
    """The DAT backbone, the network input ``(1, 3, H, W)`` and the ``(w, h)`` resize factor.

    ``image`` is what ``image_file`` holds (the pipelines of detector and segmenter configs read
    the file).
    """
    cfg, kind = load_dat_config(args.config, args.cfg_options)
    if kind == 'backbone':
        model_cfg = dict(cfg.model)
        model_cfg.pop('type')
        if args.checkpoint:
            model_cfg['init_cfg'] = None
        backbone = DAT(**model_cfg)
        if args.checkpoint:
            unloaded = backbone.load_pretrained(args.checkpoint)
            check_unloaded(backbone, unloaded, args.checkpoint, args.allow_partial_weights)
        backbone.to(args.device).eval()
        preprocessor = cfg.get('data_preprocessor') or {}
        mean = torch.tensor(preprocessor.get('mean', IMAGENET_MEAN), dtype=torch.float32)
        std = torch.tensor(preprocessor.get('std', IMAGENET_STD), dtype=torch.float32)
        pixels = torch.from_numpy(np.ascontiguousarray(image)).float()  # RGB, as ImageNet models
        inputs = ((pixels - mean) / std).permute(2, 0, 1)[None].to(args.device)
        return backbone, inputs, (1.0, 1.0)
    inferencer = build_inferencer(cfg, kind, args.checkpoint, args.device,
                                  args.allow_partial_weights)
    data = next(iter(inferencer.preprocess([image_file])))
    if not isinstance(data, dict):  # mmdet yields (original inputs, data), mmseg data
        data = data[1]
    with torch.no_grad():
        data = inferencer.model.data_preprocessor(data, False)
    scale_factor = data['data_samples'][0].metainfo.get('scale_factor', (1.0, 1.0))
    return inferencer.model.backbone, data['inputs'], tuple(float(s) for s in scale_factor)


def choose_block(backbone: DAT, stage: int, block: Optional[int]) -> Tuple[int, int]:
    """0-based ``(stage, block)`` from the CLI's 1-based stage and optional block."""
    available = deformable_blocks(backbone)
    stages = sorted({s + 1 for s, _ in available})
    if stage not in stages:
        raise SystemExit(f'--stage {stage} has no deformable blocks in this model; stages '
                         f'(1-based) with deformable blocks: {stages}')
    if stage - 1 > backbone.out_indices[-1]:
        raise SystemExit(f'--stage {stage} does not run in this model: its backbone stops after '
                         f'stage {backbone.out_indices[-1] + 1} (out_indices '
                         f'{backbone.out_indices}, 0-based)')
    blocks = [b for s, b in available if s == stage - 1]
    if block is None:
        return stage - 1, blocks[-1]
    if block not in blocks:
        raise SystemExit(f'--block {block} is not a deformable block of stage {stage}; '
                         f'choose one of {blocks}')
    return stage - 1, block


def choose_queries(args: argparse.Namespace, image_size: Tuple[int, int],
                   map_size: Tuple[int, int], stride: int,
                   scale_factor: Tuple[float, float], shrink: float = 1.0) -> List[int]:
    """Row-major map indices of the queries, from --query or along the image diagonal.

    ``image_size`` is the size of the image as read, ``shrink`` the factor by which reading
    shrank the file's image (--query is in the file's pixels).
    """
    height, width = image_size
    if args.query:
        file_size = (round(width / shrink), round(height / shrink))
        outside = [(x, y) for x, y in args.query
                   if not (0 <= x < file_size[0] and 0 <= y < file_size[1])]
        if outside:
            raise SystemExit(f'--query {outside} outside the {file_size[0]}x{file_size[1]} image')
        points = [(x * shrink, y * shrink) for x, y in args.query]
    else:
        if args.num_queries < 1:
            raise SystemExit(f'--num-queries must be >= 1, got {args.num_queries}')
        fractions = [(i + 1) / (args.num_queries + 1) for i in range(args.num_queries)]
        points = [(f * width, f * height) for f in fractions]
    indices = [query_index(x, y, map_size, stride, scale_factor) for x, y in points]
    return list(dict.fromkeys(indices))  # two points in one feature pixel are one query


@one_line_errors
def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    if args.top_k < 1:
        raise SystemExit(f'--top-k must be >= 1, got {args.top_k}')
    if args.grid_step is not None and args.grid_step < 1:
        raise SystemExit(f'--grid-step must be >= 1, got {args.grid_step}')
    check_file(args.checkpoint, 'Checkpoint', addresses=True)
    check_out_file(args.out, FigureCanvasBase.get_supported_filetypes())
    image, shrink = read_image(args.image)
    torch.manual_seed(args.seed)
    if args.checkpoint and args.trust_checkpoint:
        trust_checkpoint(args.checkpoint)
    with image_file(args.image, image, shrink) as path:  # the pipelines read a file
        backbone, inputs, scale_factor = backbone_and_input(args, image, path)
    stage, block = choose_block(backbone, args.stage, args.block)
    stride = STAGE_STRIDES[stage]
    # DAT's maps have ceil(size / stride) pixels a side.
    map_size = (-(-inputs.shape[2] // stride), -(-inputs.shape[3] // stride))
    queries = choose_queries(args, image.shape[:2], map_size, stride, scale_factor, shrink)

    with torch.no_grad(), record_deformable_attention(backbone, [(stage, block)],
                                                      query_indices=queries) as records:
        backbone(inputs)
    record = records[0]
    title = (f'stage {args.stage} (1-based), block {block}: backbone.stages.{stage}.blocks.{block}'
             f'.attn, {record.positions.shape[1]} offset groups, {map_size[0]}x{map_size[1]} map')
    figure = draw_deformable_attention(image, record, stride, scale_factor, args.top_k,
                                       args.grid_step, title)
    figure.savefig(args.out)
    print(f'Saved {args.out}')


if __name__ == '__main__':
    main()
