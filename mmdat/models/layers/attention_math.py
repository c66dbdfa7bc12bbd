"""The math that every path is checked against, written once.

Used by the model's layers, by the kernels (their reference and input checks), by the recorder
(:mod:`mmdat.models.utils.recording`) and by the tests: the attention probabilities, attention
with a materialised bias, the deformable position bias, the reference deformable and
neighborhood attention, and the hidden map of DAT++'s MLP (its depthwise conv and GELU). Nothing
here chooses a path: the caller names it.
"""
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from .tracing import eager_cache

#: Added to the scores of keys a query must not see. A large finite value rather than ``-inf``
#: so that a query whose keys are all masked (a padded query, cropped later) gets a finite
#: uniform softmax instead of NaN; it is also the value of the official shifted-window mask.
MASK_VALUE = -100.0

#: How :func:`biased_attention` combines scores and values.
BIASED_ATTENTION = ('sdpa', 'reference')


def attention_probabilities(query: torch.Tensor, key: torch.Tensor,
                            bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d) + bias)`` over the keys: ``(..., Nq, Nk)``."""
    scores = (query * query.shape[-1]**-0.5) @ key.transpose(-2, -1)
    if bias is not None:
        scores = scores + bias
    return scores.softmax(dim=-1)


def biased_attention(query: torch.Tensor,
                     key: torch.Tensor,
                     value: torch.Tensor,
                     bias: Optional[torch.Tensor],
                     attention: str = 'sdpa') -> torch.Tensor:
    """Softmax attention ``softmax(q k^T / sqrt(d) + bias) v`` with a materialised bias.

    Args:
        query (Tensor): ``(..., num_heads, num_queries, head_dims)``.
        key (Tensor): ``(..., num_heads, num_keys, head_dims)``.
        value (Tensor): ``(..., num_heads, num_keys, head_dims)``.
        bias (Tensor, optional): Additive bias broadcastable to
            ``(..., num_heads, num_queries, num_keys)``.
        attention (str): ``'sdpa'`` runs :func:`F.scaled_dot_product_attention` with the bias as
            ``attn_mask``; ``'reference'`` spells the same computation out
            (:func:`attention_probabilities`).

    Returns:
        Tensor: ``(..., num_heads, num_queries, head_dims)``.
    """
    if attention not in BIASED_ATTENTION:
        raise ValueError(f'attention must be one of {BIASED_ATTENTION}, got {attention!r}')
    if attention == 'sdpa':
        if bias is not None:
            # SDPA requires a float mask in the query's dtype (e.g. under autocast).
            bias = bias.to(query.dtype)
        return F.scaled_dot_product_attention(query, key, value, attn_mask=bias)
    return attention_probabilities(query, key, bias).to(value.dtype) @ value


def sampled_position_bias(queries: torch.Tensor, positions: torch.Tensor, table: torch.Tensor,
                          batch: int) -> torch.Tensor:
    """Deformable relative position bias of each head for every (query, key): ``(B, heads, Nq, Nk)``.

    For head ``h`` of offset group ``g = h // (heads / groups)``: the bilinear sample of
    ``table[h]`` (``align_corners=True``, zero outside) at half the normalised displacement
    ``query - key``. The sampling grid is one broadcast subtraction of the halved, ``(x, y)``-
    ordered query and key points (halving is exact, so this is bitwise ``((q - k) / 2)`` flipped,
    without an ``Nq x Nk`` flip and multiply).

    Args:
        queries (Tensor): Query points ``(..., 2)`` as normalised ``(y, x)``, ``Nq`` of them.
        positions (Tensor): Key positions ``(B * groups, ..., 2)``, ``Nk`` per group.
        table (Tensor): ``(heads, Th, Tw)``.
        batch (int): ``B``.
    """
    num_heads = table.shape[0]
    num_groups = positions.shape[0] // batch
    query_xy = (queries.reshape(1, -1, 1, 2) * 0.5).flip(-1)
    key_xy = (positions.reshape(positions.shape[0], 1, -1, 2) * 0.5).flip(-1)
    grid = query_xy.to(key_xy.dtype) - key_xy
    grouped = table.to(grid.dtype).expand(batch, -1, -1, -1)
    grouped = grouped.reshape(batch * num_groups, num_heads // num_groups, *table.shape[1:])
    bias = F.grid_sample(grouped, grid, mode='bilinear', padding_mode='zeros', align_corners=True)
    return bias.view(batch, num_heads, query_xy.shape[1], -1)


def reference_deformable_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                   queries: torch.Tensor, positions: torch.Tensor,
                                   table: torch.Tensor) -> torch.Tensor:
    """Deformable attention with the materialised sampled bias: what every deformable kernel
    computes without an ``N x N`` tensor (their oracle; any float dtype, float64 included).

    ``softmax(q k^T / sqrt(d) + bias) v`` per head, where for batch ``b``, head ``h`` of offset
    group ``g = h // (heads / groups)``, query ``i`` and key ``j``::

        bias = grid_sample(table[h], (queries[i] - positions[b * groups + g, j]) * 0.5,
                           mode='bilinear', padding_mode='zeros', align_corners=True)

    Args:
        query (Tensor): ``(B, heads, Nq, head_dims)``.
        key (Tensor): ``(B, heads, Nk, head_dims)``.
        value (Tensor): ``(B, heads, Nk, head_dims)``.
        queries (Tensor): Query points ``(..., 2)``, ``Nq`` of them, normalised ``(y, x)``.
        positions (Tensor): Key positions ``(B * groups, Nk, 2)``, normalised ``(y, x)``.
        table (Tensor): Per-head bias table ``(heads, Th, Tw)``.
    """
    bias = sampled_position_bias(queries, positions, table, query.shape[0])
    return attention_probabilities(query, key, bias).to(value.dtype) @ value


def check_deformable_inputs(tensors: Dict[str, torch.Tensor]) -> None:
    """The checks every deformable attention kernel makes of its inputs' types and shapes.

    Args:
        tensors (dict): ``query``, ``key``, ``value`` ``(B, heads, N, head_dims)``,
            ``positions`` ``(B * groups, Nk, 2)``, ``table`` ``(heads, Th, Tw)`` and the
            kernel's query points under their own names (checked to be tensors only).
    """
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f'{name} must be a Tensor, got {type(t).__name__}')
    query, key, value = tensors['query'], tensors['key'], tensors['value']
    positions, table = tensors['positions'], tensors['table']
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError('query, key and value must be (B, heads, N, head_dims), got shapes '
                         f'{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}')
    batch, num_heads, num_queries, head_dims = query.shape
    if key.shape != value.shape or key.shape[:2] != (batch, num_heads) or key.shape[3] != head_dims:
        raise ValueError(f'key and value must be (B, heads, Nk, head_dims) matching query '
                         f'{tuple(query.shape)}, got {tuple(key.shape)} and {tuple(value.shape)}')
    num_keys = key.shape[2]
    if min(batch, num_heads, num_queries, num_keys, head_dims) == 0:
        raise ValueError(f'Empty attention inputs: query {tuple(query.shape)}, key {tuple(key.shape)}')
    if (positions.dim() != 3 or positions.shape[0] % batch or positions.shape[1:] != (num_keys, 2)
            or num_heads % (positions.shape[0] // batch)):
        raise ValueError(f'positions must be (B * groups, Nk, 2) with groups dividing heads '
                         f'({num_heads}), B = {batch}, Nk = {num_keys}; got {tuple(positions.shape)}')
    if table.dim() != 3 or table.shape[0] != num_heads or min(table.shape[1:]) < 1:
        raise ValueError(f'table must be (heads, Th, Tw) with heads = {num_heads}, got {tuple(table.shape)}')


def build_neighborhood_indices(length, kernel_size: int,
                               device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Keys and bias entries of each query along one axis of ``length`` pixels.

    ``length`` may be a traced or symbolic size (the tables are built from ``arange`` alone).

    Returns:
        tuple[Tensor, Tensor]: ``keys`` ``(length, kernel_size)``, the key index of each query
        and neighborhood slot, and ``bias`` of the same shape, the index into an axis of the
        ``2 * kernel_size - 1`` bias table (``key - query + kernel_size - 1``).
    """
    queries = torch.arange(length, device=device)
    # the neighborhood is centred on the query and shifted inwards at the borders; the last
    # start is length - kernel_size, read off the last query rather than from length
    start = (queries - kernel_size // 2).clamp(min=0)
    start = torch.minimum(start, queries[-1] - (kernel_size - 1))
    keys = start[:, None] + torch.arange(kernel_size, device=device)
    return keys, keys - queries[:, None] + kernel_size - 1


#: :func:`build_neighborhood_indices`, cached per size for eager calls (see
#: :func:`~mmdat.models.layers.tracing.eager_cache`).
neighborhood_indices = eager_cache(64)(build_neighborhood_indices)


def reference_neighborhood_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                     rpb: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Neighborhood attention with NATTEN 0.14 semantics, spelt out: every query's
    ``kernel_size**2`` keys and values gathered (copies of them), then matmuls and softmax.

    The oracle of the neighborhood kernels, and the path of traced and compiled code (its index
    tables are built in the graph).

    Args:
        query (Tensor): ``(B, heads, H, W, d)``, not yet scaled.
        key (Tensor): ``(B, heads, H, W, d)``.
        value (Tensor): ``(B, heads, H, W, d)``.
        rpb (Tensor): ``(heads, 2 * kernel_size - 1, 2 * kernel_size - 1)``.
        kernel_size (int): Odd neighborhood side; ``H`` and ``W`` must be at least this.

    Returns:
        Tensor: ``(B, heads, H, W, d)``.
    """
    batch, heads, height, width, head_dims = query.shape
    rows, row_bias = neighborhood_indices(height, kernel_size, query.device)
    cols, col_bias = neighborhood_indices(width, kernel_size, query.device)
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


def depthwise_conv(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The depthwise ``K x K`` conv (stride 1, zero padding ``K // 2``) of a channels-last map.

    Args:
        h (Tensor): ``(B, H, W, C)``.
        weight (Tensor): ``(C, 1, K, K)``, cast to ``h``'s dtype (as autocast does in forward).
        bias (Tensor): ``(C, )``, cast alike.

    Returns:
        Tensor: ``(B, H, W, C)``, a new tensor of ``h``'s layout.
    """
    conv = F.conv2d(h.permute(0, 3, 1, 2), weight.to(h.dtype), bias.to(h.dtype), padding=weight.shape[-1] // 2,
                    groups=h.shape[-1])
    return conv.permute(0, 2, 3, 1)


def reference_dwconv_gelu(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """DAT++'s MLP between its linear layers: ``gelu(h + depthwise_conv(h))`` (exact GELU)."""
    return F.gelu(h + depthwise_conv(h, weight, bias))
