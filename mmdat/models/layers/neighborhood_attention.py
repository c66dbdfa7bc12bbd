"""2D neighborhood attention (Hassani et al., CVPR 2023) with NATTEN 0.14 semantics.

Each query attends to the ``kernel_size x kernel_size`` keys around it. Near the border the
neighborhood is shifted inwards so that it always holds ``kernel_size**2`` keys (it is not
cropped or padded), and each head adds a relative position bias ``rpb[head, dy + K - 1,
dx + K - 1]`` for the key-query offset ``(dy, dx)``. This is what NATTEN's ``natten2dqkrpb`` and
``natten2dav`` compute (dilation 1). NATTEN itself requires maps of at least the kernel size;
:class:`NeighborhoodAttention` handles smaller maps as NATTEN's and the official DAT++ modules
do: it zero-pads the input at the bottom and right up to the kernel size before the qkv
projection (the padded tokens take part as keys, unmasked) and crops the output.

Two pure PyTorch paths compute it: ``'reference'`` gathers every query's ``K**2`` keys and
values (``K**2`` copies of them; the oracle of the tests), the default tiles the map: each tile
of queries attends, through one batched SDPA or matmul call per group of tiles with the same
border pattern, to the keys of its halo, masked to each query's neighborhood.
"""
import functools
import inspect
from typing import Callable, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as cp

from .attention import biased_attention, check_attn_impl
from .tracing import clamp_size_min, is_tracing

#: Implementations of :class:`NeighborhoodAttention`; ``'natten'`` needs the natten package.
NA_IMPLS = ('auto', 'sdpa', 'reference', 'natten')


@functools.lru_cache(maxsize=1)
def natten_functions() -> Optional[Tuple[Callable, Callable]]:
    """NATTEN's ``(qk_rpb, av)`` ops taking ``(B, heads, H, W, d)`` tensors, or ``None``.

    Uses the ``natten2dqkrpb``/``natten2dav`` API of natten 0.14 (tested with 0.14.6) or, where
    that is gone, ``na2d_qk``/``na2d_av`` if ``na2d_qk`` takes an ``rpb``. ``None`` when natten
    is not installed, does not load, or has neither (recent versions dropped the bias).
    """
    try:
        import natten.functional as natten_functional
    except Exception:  # not installed, or its compiled backend does not load with this torch
        return None
    qk = getattr(natten_functional, 'natten2dqkrpb', None)
    av = getattr(natten_functional, 'natten2dav', None)
    if qk is not None and av is not None:
        return (lambda q, k, rpb, kernel_size: qk(q, k, rpb, kernel_size, 1),
                lambda attn, v, kernel_size: av(attn, v, kernel_size, 1))
    qk = getattr(natten_functional, 'na2d_qk', None)
    av = getattr(natten_functional, 'na2d_av', None)
    if qk is not None and av is not None and 'rpb' in inspect.signature(qk).parameters:
        return (lambda q, k, rpb, kernel_size: qk(q, k, kernel_size, rpb=rpb),
                lambda attn, v, kernel_size: av(attn, v, kernel_size))
    return None


def natten_available() -> bool:
    """Whether a compatible natten is installed (see :func:`natten_functions`)."""
    return natten_functions() is not None


@functools.lru_cache(maxsize=64)
def neighborhood_indices(length: int, kernel_size: int,
                         device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Keys and bias entries of each query along one axis of ``length`` pixels.

    Returns:
        tuple[Tensor, Tensor]: ``keys`` ``(length, kernel_size)``, the key index of each query
        and neighborhood slot, and ``bias`` of the same shape, the index into an axis of the
        ``2 * kernel_size - 1`` bias table (``key - query + kernel_size - 1``). Cached per
        size; callers must not modify them. Not for traced or compiled code (see
        :func:`build_neighborhood_indices`).
    """
    with torch.inference_mode(False):  # cached: must also serve calls that record gradients
        return build_neighborhood_indices(length, kernel_size, device)


def build_neighborhood_indices(length, kernel_size: int,
                               device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`neighborhood_indices` uncached; ``length`` may be a traced or symbolic size (the
    tables are built from ``arange`` alone)."""
    queries = torch.arange(length, device=device)
    # the neighborhood is centred on the query and shifted inwards at the borders; the last
    # start is length - kernel_size, read off the last query rather than from length
    start = (queries - kernel_size // 2).clamp(min=0)
    start = torch.minimum(start, queries[-1] - (kernel_size - 1))
    keys = start[:, None] + torch.arange(kernel_size, device=device)
    return keys, keys - queries[:, None] + kernel_size - 1


#: Side of the query tiles of the tiled path, without and with gradients: each tile of
#: ``T x T`` queries attends to its halo of ``(T + K - 1)**2`` keys. Larger tiles copy fewer
#: keys (``(T + K - 1)**2 / T**2`` per query) but compute more masked-out scores (``(T + K -
#: 1)**2`` per query instead of ``K**2``). The fastest of 6, 8 and 10 at a DAT-T++ stage-1 map
#: (200x334, K=7) on CPU: 8 in inference (SDPA), 6 in training (matmuls); docs/benchmarks.md.
NA_TILES = dict(inference=8, training=6)


@functools.lru_cache(maxsize=64)
def _axis_tiles(length: int, kernel_size: int, tile: int) -> dict:
    """Query tiles and their key halos along one axis of ``length`` pixels (CPU tensors).

    Tiles start every ``tile`` pixels; the last one is moved back to end at the border, so it
    may overlap its neighbour. The halo of a tile is the ``tile + kernel_size - 1`` keys (or
    the whole axis) that hold the neighborhoods of all its queries, which lie inside it
    because the neighborhood start moves by at most one pixel per query.

    Returns:
        dict: ``tile`` and ``halo`` (sizes), ``queries`` ``(n, tile)`` and ``keys`` ``(n, halo)``
        (pixel indices of each tile), ``allowed`` ``(n, tile, halo)`` (the key is in the query's
        neighborhood), ``bias`` ``(n, tile, halo)`` (index into an axis of the bias table,
        clamped where not allowed), ``runs``: ``(first, end)`` of the consecutive tiles with
        the same ``allowed`` and ``bias`` (the interior tiles form one run), and ``slot``
        ``(length,)``: where each pixel's output is read, as ``tile index * tile + offset``.
    """
    tile = min(tile, length)
    halo = min(tile + kernel_size - 1, length)
    count = -(-length // tile)
    first = (torch.arange(count) * tile).clamp(max=length - tile)
    keys, bias = neighborhood_indices(length, kernel_size, torch.device('cpu'))
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
    return dict(tile=tile, halo=halo, queries=queries, keys=halo_keys, allowed=allowed, bias=bias,
                runs=[tuple(r) for r in runs], slot=tile_of * tile + pixels - first[tile_of])


@functools.lru_cache(maxsize=32)
def _tile_plan(height: int, width: int, kernel_size: int, tile: int,
               device: torch.device) -> Tuple[list, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The tiles of a ``height x width`` map in rectangular groups sharing one bias pattern.

    Returns:
        tuple[list, Tensor, Tensor, Tensor]: ``groups``, per group ``(tiles, bias_index,
        masked)``: its number of tiles, the index into the flattened bias table ``(T_h * T_w,
        L_h * L_w)`` of each query and halo key of a tile, and where the key is outside the
        query's neighborhood (same shape); ``queries`` and ``keys``: the flat pixel indices
        of the queries and halo keys of all tiles, group after group; ``order``
        ``(height * width,)``: where each pixel's output is in the groups' outputs
        concatenated. Cached per size; callers must not modify them.
    """
    with torch.inference_mode(False):  # cached: must also serve calls that record gradients
        return _build_tile_plan(height, width, kernel_size, tile, device)


def _build_tile_plan(height: int, width: int, kernel_size: int, tile: int,
                     device: torch.device) -> Tuple[list, torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, cols = _axis_tiles(height, kernel_size, tile), _axis_tiles(width, kernel_size, tile)
    side = 2 * kernel_size - 1
    shape = (rows['tile'] * cols['tile'], rows['halo'] * cols['halo'])
    groups, queries, keys = [], [], []
    order = torch.empty(height, width, dtype=torch.long)
    # each pixel reads the group, tile and offset that computed it (the first one, if two did)
    row_tile, row_offset = rows['slot'] // rows['tile'], rows['slot'] % rows['tile']
    col_tile, col_offset = cols['slot'] // cols['tile'], cols['slot'] % cols['tile']
    start = 0
    for row_first, row_end in rows['runs']:
        for col_first, col_end in cols['runs']:
            queries.append((rows['queries'][row_first:row_end, None, :, None] * width +
                            cols['queries'][None, col_first:col_end, None, :]).flatten())
            keys.append((rows['keys'][row_first:row_end, None, :, None] * width +
                         cols['keys'][None, col_first:col_end, None, :]).flatten())
            bias_index = rows['bias'][row_first][:, None, :, None] * side + cols['bias'][col_first][None, :, None, :]
            allowed = rows['allowed'][row_first][:, None, :, None] & cols['allowed'][col_first][None, :, None, :]
            group_cols = col_end - col_first
            groups.append(((row_end - row_first) * group_cols,
                           bias_index.reshape(shape).to(device), ~allowed.reshape(shape).to(device)))
            tile_index = (row_tile[:, None] - row_first) * group_cols + col_tile[None, :] - col_first
            position = start + (tile_index * rows['tile'] + row_offset[:, None]) * cols['tile'] + col_offset[None, :]
            inside = (((row_tile >= row_first) & (row_tile < row_end))[:, None] &
                      ((col_tile >= col_first) & (col_tile < col_end))[None, :])
            order = torch.where(inside, position, order)
            start += groups[-1][0] * shape[0]
    return (groups, torch.cat(queries).to(device), torch.cat(keys).to(device),
            order.flatten().to(device))


def _tiled_neighborhood_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                  rpb: torch.Tensor, kernel_size: int, attn_impl: str,
                                  tile: int) -> torch.Tensor:
    """Neighborhood attention by tiles of queries against their key halos (no ``K**2`` copies).

    Each group of tiles that share a mask pattern (the interior tiles, the border rows and
    columns of tiles, the corners) runs one batched attention over its tiles, with the bias of
    the halo keys and ``-inf`` for the halo keys outside each query's neighborhood.
    """
    batch, heads, height, width, head_dims = query.shape
    groups, queries, keys, order = _tile_plan(height, width, kernel_size, tile, query.device)
    # one gather each (one buffer for its gradient), then a view per group
    query = query.flatten(2, 3).index_select(2, queries)
    key, value = (t.flatten(2, 3).index_select(2, keys) for t in (key, value))
    table = rpb.flatten(1)
    # split, not narrow: the gradient of a split is one concatenation, that of each narrow
    # slice a zero-filled tensor of the whole size
    sizes = [(tiles, *bias_index.shape) for tiles, bias_index, _ in groups]
    splits = [torch.split(t, [tiles * n for tiles, *n_ in sizes for n in n_[index:index + 1]], dim=2)
              for t, index in ((query, 0), (key, 1), (value, 1))]
    outs = []
    for (tiles, bias_index, masked), q, k, v in zip(groups, *splits):
        num_queries, num_keys = bias_index.shape
        # (B * heads, tiles, queries or keys of a tile, d): the tiles take SDPA's head axis
        q = q.view(batch * heads, tiles, num_queries, head_dims)
        k = k.view(batch * heads, tiles, num_keys, head_dims)
        v = v.view(batch * heads, tiles, num_keys, head_dims)
        bias = table[:, bias_index].masked_fill(masked, float('-inf'))
        bias = bias.unsqueeze(0).expand(batch, -1, -1, -1).reshape(batch * heads, 1, num_queries, num_keys)
        outs.append(biased_attention(q, k, v, bias, attn_impl).view(batch, heads, -1, head_dims))
    out = torch.cat(outs, 2).index_select(2, order)
    return out.view(batch, heads, height, width, head_dims)


def neighborhood_path(attn_impl: str) -> str:
    """How :func:`neighborhood_attention` computes ``attn_impl``: ``'natten'``, ``'tiles'``
    (``'auto'`` and ``'sdpa'``: faster than the gathered path on CPU at every map size
    measured, and with a fraction of its memory; each tile's attention then runs as
    :func:`~mmdat.models.layers.attention.resolve_attn_impl` picks) or ``'gathered'``
    (``'reference'``). Validated by :func:`check_attn_impl` against :data:`NA_IMPLS`."""
    check_attn_impl(attn_impl, NA_IMPLS, 'neighborhood attention')
    return dict(natten='natten', reference='gathered').get(attn_impl, 'tiles')


def neighborhood_attention(query: torch.Tensor,
                           key: torch.Tensor,
                           value: torch.Tensor,
                           rpb: torch.Tensor,
                           kernel_size: int,
                           attn_impl: str = 'sdpa') -> torch.Tensor:
    """Neighborhood attention with a relative position bias, NATTEN 0.14 semantics.

    Args:
        query (Tensor): ``(B, heads, H, W, d)``, not yet scaled.
        key (Tensor): ``(B, heads, H, W, d)``.
        value (Tensor): ``(B, heads, H, W, d)``.
        rpb (Tensor): ``(heads, 2 * kernel_size - 1, 2 * kernel_size - 1)``.
        kernel_size (int): Odd neighborhood side; ``H`` and ``W`` must be at least this.
        attn_impl (str): ``'reference'``: every query's ``kernel_size**2`` keys and values
            gathered (copies of them), then matmuls and softmax: simple, the oracle of the
            tests, and memory-hungry. ``'sdpa'``: tiles of ``T x T`` queries (``T`` from
            :data:`NA_TILES`) against the keys of their halo (``(T + kernel_size - 1)**2``,
            masked to each query's neighborhood) through SDPA, with no per-query copies; in
            training the tiles are recomputed in backward, so only the inputs are kept. ``'auto'``: the tiles too,
            the attention through SDPA or matmuls as :func:`biased_attention` picks (on CPU,
            matmuls when the bias needs a gradient). ``'natten'``: NATTEN's kernels.

    Returns:
        Tensor: ``(B, heads, H, W, d)``.
    """
    batch, heads, height, width, head_dims = query.shape
    # a check on traced sizes would fix them; NeighborhoodAttention pads small maps anyway
    if not is_tracing() and (height < kernel_size or width < kernel_size):
        raise ValueError(f'Neighborhood attention needs maps of at least kernel_size={kernel_size} '
                         f'a side, got {height}x{width}')
    path = neighborhood_path(attn_impl)
    if path == 'natten':
        qk_rpb, av = natten_functions()  # check_attn_impl made sure it is there
        attn = qk_rpb(query * head_dims**-0.5, key, rpb.to(query.dtype), kernel_size)
        return av(attn.softmax(dim=-1), value, kernel_size)
    # the tile plan is Python-side and per size: traced or compiled code takes the gathered
    # path, whose index tables are built in the graph
    if path == 'tiles' and not is_tracing():
        if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value, rpb)):
            # recomputed in backward: autograd would keep every tile's gathered keys and values,
            # scores and probabilities (4-8x the inputs); this keeps the inputs alone
            return cp.checkpoint(_tiled_neighborhood_attention, query, key, value, rpb, kernel_size,
                                 attn_impl, NA_TILES['training'], use_reentrant=False)
        return _tiled_neighborhood_attention(query, key, value, rpb, kernel_size, attn_impl,
                                             NA_TILES['inference'])
    indices = build_neighborhood_indices if is_tracing() else neighborhood_indices
    rows, row_bias = indices(height, kernel_size, query.device)
    cols, col_bias = indices(width, kernel_size, query.device)
    # (H, W, K, K) index maps of the keys of every query
    rows, cols = rows[:, None, :, None], cols[None, :, None, :]

    def neighborhoods(t: torch.Tensor) -> torch.Tensor:
        """``(B, heads, H, W, d)`` -> the keys of each query: ``(B, heads, H*W, K*K, d)``."""
        return t[:, :, rows, cols].reshape(batch, heads, height * width, kernel_size**2, head_dims)

    bias = rpb[:, row_bias[:, None, :, None], col_bias[None, :, None, :]]
    bias = bias.reshape(heads, height * width, 1, kernel_size**2)
    out = biased_attention(query.reshape(batch, heads, height * width, 1, head_dims),
                           neighborhoods(key), neighborhoods(value), bias, 'reference')
    return out.view(batch, heads, height, width, head_dims)


class NeighborhoodAttention(nn.Module):
    """Multi-head 2D neighborhood attention with a relative position bias (DAT++ blocks).

    Maps smaller than the kernel are zero-padded at the bottom and right up to the kernel size
    before the qkv projection and cropped back afterwards, as in NATTEN's and the official
    DAT++ modules, so results match theirs at every map size.

    Args:
        embed_dims (int): Channels of the input and output.
        num_heads (int): Attention heads; must divide ``embed_dims``.
        kernel_size (int): Odd neighborhood side, at least 3.
        attn_impl (str): ``'auto'``, ``'sdpa'``, ``'reference'`` or ``'natten'``; see
            :func:`neighborhood_attention`.
    """
    #: The ``attn_impl`` values this layer takes (see :mod:`mmdat.models.layers.attention`).
    SUPPORTED_IMPLS = NA_IMPLS

    def __init__(self, embed_dims: int, num_heads: int, kernel_size: int = 7,
                 attn_impl: str = 'sdpa'):
        super().__init__()
        if embed_dims % num_heads != 0:
            raise ValueError(f'embed_dims ({embed_dims}) must be divisible by num_heads ({num_heads})')
        if not isinstance(kernel_size, int) or kernel_size < 3 or kernel_size % 2 != 1:
            raise ValueError(f'kernel_size must be an odd int >= 3, got {kernel_size!r}')
        self.embed_dims = embed_dims
        self.num_heads = num_heads
        self.kernel_size = kernel_size
        self.attn_impl = check_attn_impl(attn_impl, self.SUPPORTED_IMPLS, type(self).__name__)

        self.qkv = nn.Linear(embed_dims, embed_dims * 3)
        self.proj = nn.Linear(embed_dims, embed_dims)
        self.rpb = nn.Parameter(torch.zeros(num_heads, 2 * kernel_size - 1, 2 * kernel_size - 1))
        nn.init.trunc_normal_(self.rpb, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x (Tensor): ``(B, H, W, C)``. Returns: Tensor ``(B, H, W, C)``."""
        batch, height, width, channels = x.shape
        pad_h = clamp_size_min(self.kernel_size - height, 0)
        pad_w = clamp_size_min(self.kernel_size - width, 0)
        # traced or symbolic sizes: always pad (maybe by 0), a branch on them would fix them
        if is_tracing() or pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        padded_h, padded_w = x.shape[1:3]
        qkv = self.qkv(x).view(batch, padded_h, padded_w, 3, self.num_heads, -1)
        query, key, value = qkv.permute(3, 0, 4, 1, 2, 5).unbind(0)  # B, heads, H, W, d
        out = neighborhood_attention(query, key, value, self.rpb, self.kernel_size, self.attn_impl)
        out = out.permute(0, 2, 3, 1, 4).reshape(batch, padded_h, padded_w, channels)
        if is_tracing() or pad_h or pad_w:
            out = F.pad(out, (0, 0, 0, -pad_w, 0, -pad_h))  # crop; see WindowAttention.forward
        return self.proj(out)

    def extra_repr(self) -> str:
        return (f'embed_dims={self.embed_dims}, num_heads={self.num_heads}, '
                f'kernel_size={self.kernel_size}, attn_impl={self.attn_impl!r}')
