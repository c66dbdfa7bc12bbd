"""Neighborhood attention by tiles of queries against their key halos, in PyTorch.

Each tile of ``T x T`` queries attends, through one batched SDPA or matmul call per group of
tiles with the same border pattern, to the ``(T + K - 1)**2`` keys of its halo, masked to each
query's neighborhood: the result of
:func:`~mmdat.models.layers.attention_math.reference_neighborhood_attention` without its
``K**2`` copies of every key. The tile plan is built in Python per map size, so traced and
compiled code takes the reference path instead.

The kernel interface of :mod:`mmdat.models.layers.policy`: :func:`installed`, :func:`supports`
and :func:`op`.
"""
from typing import List, NamedTuple, Tuple

import torch
import torch.utils.checkpoint as cp

from .attention_math import biased_attention, neighborhood_indices
from .tracing import eager_cache

#: Side of the query tiles, without and with gradients: each tile of ``T x T`` queries attends
#: to its halo of ``(T + K - 1)**2`` keys. Larger tiles copy fewer keys (``(T + K - 1)**2 /
#: T**2`` per query) but compute more masked-out scores (``(T + K - 1)**2`` per query instead of
#: ``K**2``). The fastest of 6, 8 and 10 at a DAT-T++ stage-1 map (200x334, K=7) on CPU: 8 in
#: inference (SDPA), 6 in training (matmuls); docs/benchmarks.md.
NA_TILES = dict(inference=8, training=6)
#: What the tiles need, for error messages (nothing beyond PyTorch).
REQUIREMENT = 'PyTorch alone'


class AxisTiles(NamedTuple):
    """Query tiles and their key halos along one axis (CPU tensors; ``n`` tiles).

    Attributes:
        tile (int): Queries per tile.
        halo (int): Keys per halo.
        queries (Tensor): ``(n, tile)`` pixel indices of each tile's queries.
        keys (Tensor): ``(n, halo)`` pixel indices of each tile's halo keys.
        allowed (Tensor): ``(n, tile, halo)``: the key is in the query's neighborhood.
        bias (Tensor): ``(n, tile, halo)``: index into an axis of the bias table, clamped where
            not allowed.
        runs (list): ``(first, end)`` of the consecutive tiles with the same ``allowed`` and
            ``bias`` (the interior tiles form one run).
        slot (Tensor): ``(length,)``: where each pixel's output is read, as ``tile index * tile
            + offset``.
    """
    tile: int
    halo: int
    queries: torch.Tensor
    keys: torch.Tensor
    allowed: torch.Tensor
    bias: torch.Tensor
    runs: List[Tuple[int, int]]
    slot: torch.Tensor


class TileGroup(NamedTuple):
    """Tiles of a map that share one bias pattern, attended to in one batched call.

    Attributes:
        tiles (int): Number of tiles.
        bias_index (Tensor): ``(queries of a tile, halo keys)``: index into the flattened bias
            table ``(heads, (2K - 1)**2)``.
        masked (Tensor): Same shape: the key is outside the query's neighborhood.
    """
    tiles: int
    bias_index: torch.Tensor
    masked: torch.Tensor


class TilePlan(NamedTuple):
    """The tiles of a map in groups (see :func:`tile_plan`).

    Attributes:
        groups (list[TileGroup]): The groups.
        queries (Tensor): Flat pixel indices of the queries of all tiles, group after group.
        keys (Tensor): Flat pixel indices of the halo keys of all tiles, group after group.
        order (Tensor): ``(height * width,)``: where each pixel's output is in the groups'
            outputs concatenated.
    """
    groups: List[TileGroup]
    queries: torch.Tensor
    keys: torch.Tensor
    order: torch.Tensor


@eager_cache(64)
def axis_tiles(length: int, kernel_size: int, tile: int) -> AxisTiles:
    """Query tiles and their key halos along one axis of ``length`` pixels.

    Tiles start every ``tile`` pixels; the last one is moved back to end at the border, so it
    may overlap its neighbour. The halo of a tile is the ``tile + kernel_size - 1`` keys (or
    the whole axis) that hold the neighborhoods of all its queries, which lie inside it
    because the neighborhood start moves by at most one pixel per query.
    """
    tile = min(tile, length)
    halo = min(tile + kernel_size - 1, length)
    count = -(-length // tile)
    first = (torch.arange(count) * tile).clamp(max=length - tile)
    keys, _ = neighborhood_indices(length, kernel_size, torch.device('cpu'))
    queries = first[:, None] + torch.arange(tile)
    halo_start = torch.minimum(keys[first, 0], torch.tensor(length - halo))
    halo_keys = halo_start[:, None] + torch.arange(halo)
    starts = keys[queries, 0]  # (n, tile): first key of each query's neighborhood
    allowed = (halo_keys[:, None, :] >= starts[..., None]) & (halo_keys[:, None, :] < starts[..., None] + kernel_size)
    bias = (halo_keys[:, None, :] - queries[..., None] + kernel_size - 1).clamp(0, 2 * kernel_size - 2)
    runs = []
    for i in range(count):
        if runs and torch.equal(allowed[i], allowed[runs[-1][0]]) and torch.equal(bias[i], bias[runs[-1][0]]):
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    pixels = torch.arange(length)
    tile_of = (pixels // tile).clamp(max=count - 1)
    return AxisTiles(tile, halo, queries, halo_keys, allowed, bias, [tuple(r) for r in runs],
                     tile_of * tile + pixels - first[tile_of])


@eager_cache(32)
def tile_plan(height: int, width: int, kernel_size: int, tile: int, device: torch.device) -> TilePlan:
    """The tiles of a ``height x width`` map in rectangular groups sharing one bias pattern.
    Cached per size; callers must not modify it."""
    rows, cols = axis_tiles(height, kernel_size, tile), axis_tiles(width, kernel_size, tile)
    side = 2 * kernel_size - 1
    shape = (rows.tile * cols.tile, rows.halo * cols.halo)
    groups, queries, keys = [], [], []
    order = torch.empty(height, width, dtype=torch.long)
    # each pixel reads the group, tile and offset that computed it (the first one, if two did)
    row_tile, row_offset = rows.slot // rows.tile, rows.slot % rows.tile
    col_tile, col_offset = cols.slot // cols.tile, cols.slot % cols.tile
    start = 0
    for row_first, row_end in rows.runs:
        for col_first, col_end in cols.runs:
            queries.append((rows.queries[row_first:row_end, None, :, None] * width +
                            cols.queries[None, col_first:col_end, None, :]).flatten())
            keys.append((rows.keys[row_first:row_end, None, :, None] * width +
                         cols.keys[None, col_first:col_end, None, :]).flatten())
            bias_index = rows.bias[row_first][:, None, :, None] * side + cols.bias[col_first][None, :, None, :]
            allowed = rows.allowed[row_first][:, None, :, None] & cols.allowed[col_first][None, :, None, :]
            group_cols = col_end - col_first
            groups.append(TileGroup((row_end - row_first) * group_cols, bias_index.reshape(shape).to(device),
                                    ~allowed.reshape(shape).to(device)))
            tile_index = (row_tile[:, None] - row_first) * group_cols + col_tile[None, :] - col_first
            position = start + (tile_index * rows.tile + row_offset[:, None]) * cols.tile + col_offset[None, :]
            inside = (((row_tile >= row_first) & (row_tile < row_end))[:, None] &
                      ((col_tile >= col_first) & (col_tile < col_end))[None, :])
            order = torch.where(inside, position, order)
            start += groups[-1].tiles * shape[0]
    return TilePlan(groups, torch.cat(queries).to(device), torch.cat(keys).to(device),
                    order.flatten().to(device))


def tiled_neighborhood_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 rpb: torch.Tensor, kernel_size: int, attention: str,
                                 tile: int) -> torch.Tensor:
    """Neighborhood attention by tiles of ``tile x tile`` queries (no ``K**2`` copies).

    Each group of tiles that share a mask pattern (the interior tiles, the border rows and
    columns of tiles, the corners) runs one batched attention over its tiles
    (:func:`~mmdat.models.layers.attention_math.biased_attention` with ``attention``), with the
    bias of the halo keys and ``-inf`` for the halo keys outside each query's neighborhood.
    """
    batch, heads, height, width, head_dims = query.shape
    plan = tile_plan(height, width, kernel_size, tile, query.device)
    # one gather each (one buffer for its gradient), then a view per group
    query = query.flatten(2, 3).index_select(2, plan.queries)
    key, value = (t.flatten(2, 3).index_select(2, plan.keys) for t in (key, value))
    table = rpb.flatten(1)
    # split, not narrow: the gradient of a split is one concatenation, that of each narrow
    # slice a zero-filled tensor of the whole size
    query_sizes = [group.tiles * group.bias_index.shape[0] for group in plan.groups]
    key_sizes = [group.tiles * group.bias_index.shape[1] for group in plan.groups]
    splits = (torch.split(query, query_sizes, dim=2), torch.split(key, key_sizes, dim=2),
              torch.split(value, key_sizes, dim=2))
    outs = []
    for group, q, k, v in zip(plan.groups, *splits):
        num_queries, num_keys = group.bias_index.shape
        # (B * heads, tiles, queries or keys of a tile, d): the tiles take SDPA's head axis
        q = q.view(batch * heads, group.tiles, num_queries, head_dims)
        k = k.view(batch * heads, group.tiles, num_keys, head_dims)
        v = v.view(batch * heads, group.tiles, num_keys, head_dims)
        bias = table[:, group.bias_index].masked_fill(group.masked, float('-inf'))
        bias = bias.unsqueeze(0).expand(batch, -1, -1, -1).reshape(batch * heads, 1, num_queries, num_keys)
        outs.append(biased_attention(q, k, v, bias, attention).view(batch, heads, -1, head_dims))
    out = torch.cat(outs, 2).index_select(2, plan.order)
    return out.view(batch, heads, height, width, head_dims)


def _training(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def tile_side(*tensors: torch.Tensor) -> int:
    """The tile side (:data:`NA_TILES`) of a call on ``tensors``: training's when gradients flow
    to any of them."""
    return NA_TILES['training' if _training(*tensors) else 'inference']


def halo_keys(height: int, width: int, kernel_size: int, tile: int) -> int:
    """Keys per query of the tiles' attention: the halo of a tile."""
    return min(tile + kernel_size - 1, height) * min(tile + kernel_size - 1, width)


def installed() -> bool:
    """Always: the tiles are PyTorch."""
    return True


def supports(device: torch.device, dtype: torch.dtype) -> bool:
    """Every device and dtype."""
    return True


def op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rpb: torch.Tensor,
       kernel_size: int, attention: str) -> torch.Tensor:
    """Neighborhood attention by tiles (``(B, heads, H, W, d)`` tensors, the query not yet
    scaled), each tile's attention through ``attention`` (``'sdpa'`` or ``'reference'``).

    In training the tiles are recomputed in backward: autograd would keep every tile's
    gathered keys and values, scores and probabilities (4-8x the inputs); this keeps the inputs
    alone. The tile side follows :func:`tile_side`.
    """
    tile = tile_side(query, key, value, rpb)
    if _training(query, key, value, rpb):
        return cp.checkpoint(tiled_neighborhood_attention, query, key, value, rpb, kernel_size, attention,
                             tile, use_reentrant=False)
    return tiled_neighborhood_attention(query, key, value, rpb, kernel_size, attention, tile)
