"""Draw what a deformable attention block computed (as Figure 5 of the DAT paper).

Coordinates: a :class:`~mmdat.models.utils.DeformableAttentionRecord` holds normalised ``(y, x)``
points of the stage's ``H x W`` map, and the block reads its keys with
``grid_sample(..., align_corners=True)``, so a point ``p`` lies at feature pixel
``(p + 1) / 2 * (size - 1)``. Feature pixel ``j`` of a stage with stride ``s`` covers input pixels
``[j * s, (j + 1) * s)`` (DAT pads at the bottom and right only), whose centre is input pixel
``(j + 0.5) * s - 0.5``. An input resized by ``scale`` (mmdet/mmseg ``scale_factor``) maps back to
the original image by ``(p + 0.5) / scale - 0.5``. Pixel ``i`` is centred on coordinate ``i``.
"""
import math
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure

#: Output stride of stage ``i`` (0-based) of DAT.
STAGE_STRIDES = (4, 8, 16, 32)
#: Colours of the offset groups (left panel) and of the queries (right panel).
GROUP_COLOURS = ('#e6194b', '#3cb44b', '#4363d8', '#f58231', '#911eb4', '#42d4f4', '#f032e6',
                 '#bfef45')
QUERY_COLOURS = ('#ffe119', '#00ffff', '#ff00ff', '#ff7f00', '#7fff00', '#ffffff')


def to_image_pixels(points: torch.Tensor, map_size: Sequence[int], stride: int,
                    scale_factor: Sequence[float] = (1.0, 1.0)) -> np.ndarray:
    """Normalised ``(y, x)`` map points -> ``(x, y)`` pixel coordinates of the original image.

    Args:
        points (Tensor): ``(..., 2)`` normalised ``(y, x)``, ``align_corners=True`` convention.
        map_size (Sequence[int]): ``(H, W)`` of the stage's map.
        stride (int): Input pixels per feature pixel.
        scale_factor (Sequence[float]): ``(w_scale, h_scale)`` by which the image was resized
            before entering the network.

    Returns:
        ndarray: ``(..., 2)`` ``(x, y)`` float64 pixel coordinates.
    """
    points = points.detach().double().cpu()
    size = points.new_tensor([map_size[0] - 1, map_size[1] - 1])
    feature = (points + 1) / 2 * size
    network_input = (feature + 0.5) * stride - 0.5
    scale = points.new_tensor([scale_factor[1], scale_factor[0]])
    original = (network_input + 0.5) / scale - 0.5
    return original.flip(-1).numpy()


def pixel_centre(index: int, map_size: Sequence[int], stride: int,
                 scale_factor: Sequence[float] = (1.0, 1.0)) -> np.ndarray:
    """``(x, y)`` in the original image of the centre of feature pixel ``index`` (row-major)."""
    row, column = divmod(index, map_size[1])
    network_input = (np.array([column, row], dtype=np.float64) + 0.5) * stride - 0.5
    return (network_input + 0.5) / np.asarray(scale_factor, dtype=np.float64) - 0.5


def query_index(x: float, y: float, map_size: Sequence[int], stride: int,
                scale_factor: Sequence[float] = (1.0, 1.0)) -> int:
    """Row-major index of the feature pixel whose input area holds image pixel ``(x, y)``."""
    height, width = map_size
    column = int((x + 0.5) * scale_factor[0] // stride)
    row = int((y + 0.5) * scale_factor[1] // stride)
    return min(max(row, 0), height - 1) * width + min(max(column, 0), width - 1)


def top_keys(attention: torch.Tensor, positions: torch.Tensor,
             k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` (head, key) pairs of one query with the largest attention weights.

    Args:
        attention (Tensor): ``(heads, Nk)`` weights of one query (each row sums to 1).
        positions (Tensor): ``(groups, H, W, 2)`` sampling positions; head ``h`` reads its keys
            at the positions of group ``h // (heads // groups)``.
        k (int): How many pairs.

    Returns:
        tuple[Tensor, Tensor]: Weights ``(k, )`` divided by the number of heads (so that all
        pairs sum to 1), and the normalised ``(y, x)`` positions ``(k, 2)`` of those keys.
    """
    heads, num_keys = attention.shape
    groups = positions.shape[0]
    weights, flat = (attention / heads).flatten().topk(min(k, attention.numel()))
    head, key = flat // num_keys, flat % num_keys
    group = head // (heads // groups)
    return weights, positions.reshape(groups, -1, 2)[group, key]


def _grid_rows(size: int, step: int) -> List[int]:
    """Every ``step``-th index, centred in ``range(size)``."""
    start = (size - 1 - (size - 1) // step * step) // 2
    return list(range(start, size, step))


def draw_deformable_attention(image: np.ndarray,
                              record,
                              stride: int,
                              scale_factor: Sequence[float] = (1.0, 1.0),
                              top_k: int = 16,
                              grid_step: Optional[int] = None,
                              title: str = '') -> Figure:
    """Two panels over the image: sampling points of every offset group, and the top keys of
    the recorded queries.

    Left: every ``grid_step``-th reference point (white) in each direction, arrows to the sampled
    points, one colour per offset group. Right: each query (star, at the centre of its feature
    pixel) and its ``top_k`` keys with the highest attention weights over all heads, circles with
    area proportional to the weight, one colour per query. Only the first image of the batch is
    drawn.

    Args:
        image (ndarray): The original image, ``(H, W, 3)`` RGB uint8.
        record (DeformableAttentionRecord): What the block computed; its ``attention`` must be
            recorded for some ``query_indices``.
        stride (int): Stride of the record's stage.
        scale_factor (Sequence[float]): ``(w_scale, h_scale)`` of the resize before the network.
        top_k (int): Keys drawn per query.
        grid_step (int, optional): Draw every ``grid_step``-th reference point in each direction;
            ``None`` picks one that draws about ``24 / sqrt(groups)`` (at least 4) a side.
        title (str): Figure title.

    Returns:
        Figure: A matplotlib figure (Agg canvas, no pyplot state).
    """
    if record.attention is None or record.query_indices is None:
        raise ValueError('The record needs attention weights of chosen queries '
                         '(record with query_indices)')
    if top_k < 1:
        raise ValueError(f'top_k must be >= 1, got {top_k}')
    height, width = record.map_size
    grid_h, grid_w = record.reference.shape[:2]  # fewer than the map's pixels in DAT++
    num_groups = record.positions.shape[1]
    if grid_step is None:  # fewer points where more groups share them
        per_side = max(4, round(24 / math.sqrt(num_groups)))
        grid_step = max(1, math.ceil(max(grid_h, grid_w) / per_side))
    if grid_step < 1:
        raise ValueError(f'grid_step must be >= 1, got {grid_step}')
    image_h, image_w = image.shape[:2]

    # Panels at least 480 pixels wide so that small images stay readable.
    zoom = max(1.0, 480 / image_w)
    dpi = 100
    # room for the title and the legends below the panels (one line per query)
    group_columns = min(num_groups + 1, 4)
    legend_lines = max(math.ceil((num_groups + 1) / group_columns), len(record.query_indices))
    figure = Figure(figsize=(2 * image_w * zoom / dpi,
                             image_h * zoom / dpi + 0.6 + 0.25 * legend_lines),
                    dpi=dpi, layout='constrained')
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2)
    for axes in (left, right):
        axes.imshow(image)
        axes.set_xlim(-0.5, image_w - 0.5)
        axes.set_ylim(image_h - 0.5, -0.5)
        axes.set_axis_off()
    # marker areas in points^2: constant up to 480-pixel panels, growing with larger ones
    marker = 18 * image_w * zoom / 480

    rows, columns = _grid_rows(grid_h, grid_step), _grid_rows(grid_w, grid_step)
    reference = to_image_pixels(record.reference[rows][:, columns], (height, width), stride,
                                scale_factor).reshape(-1, 2)
    for group, positions in enumerate(record.positions[0]):
        colour = GROUP_COLOURS[group % len(GROUP_COLOURS)]
        sampled = to_image_pixels(positions[rows][:, columns], (height, width), stride,
                                  scale_factor).reshape(-1, 2)
        delta = sampled - reference
        left.quiver(reference[:, 0], reference[:, 1], delta[:, 0], delta[:, 1], angles='xy',
                    scale_units='xy', scale=1, color=colour, width=0.003, alpha=0.8)
        left.scatter(sampled[:, 0], sampled[:, 1], s=marker, color=colour, edgecolors='black',
                     linewidths=0.3, label=f'group {group + 1}', zorder=3)
    left.scatter(reference[:, 0], reference[:, 1], s=marker / 2, color='white',
                 edgecolors='black', linewidths=0.3, label='reference', zorder=2)
    left.legend(loc='upper center', bbox_to_anchor=(0.5, 0.0), ncol=group_columns,
                fontsize=8, frameon=False)
    left.set_title('sampling points by offset group', fontsize=9)

    for row, query in enumerate(record.query_indices):
        point = pixel_centre(query, (height, width), stride, scale_factor)
        colour = QUERY_COLOURS[row % len(QUERY_COLOURS)]
        weights, keys = top_keys(record.attention[0, :, row], record.positions[0], top_k)
        keys = to_image_pixels(keys, (height, width), stride, scale_factor)
        right.scatter(keys[:, 0], keys[:, 1], s=(weights / weights.max()).numpy() * 40 * marker,
                      color=to_rgba(colour, 0.45), edgecolors=colour, linewidths=1.0, zorder=3)
        right.scatter(point[:1], point[1:], s=10 * marker, marker='*', color=colour,
                      edgecolors='black', linewidths=0.8, zorder=4,
                      label=f'query ({point[0]:.0f}, {point[1]:.0f}): top keys '
                      f'{weights.sum():.1%} of weight')
    right.legend(loc='upper center', bbox_to_anchor=(0.5, 0.0), fontsize=8, frameon=False)
    right.set_title(f'top {top_k} keys per query (area ~ attention weight)', fontsize=9)
    if title:
        figure.suptitle(title, fontsize=10)
    return figure
