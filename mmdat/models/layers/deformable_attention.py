"""Deformable multi-head attention of DAT (Xia et al., CVPR 2022), v1 formulas."""
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention_math import biased_attention, sampled_position_bias
from .policy import DEFORMABLE, check_attn_impl, resolve_attn_impl
from .tracing import copy_view, is_tracing


def pixel_centre_grid(height: int, width: int, device: torch.device,
                      dtype: torch.dtype) -> torch.Tensor:
    """Normalised ``(y, x)`` coordinates of pixel centres, ``(i + 0.5) / n * 2 - 1``: ``(H, W, 2)``."""
    ys = (torch.arange(height, device=device, dtype=dtype) + 0.5) * (2 / height) - 1
    xs = (torch.arange(width, device=device, dtype=dtype) + 0.5) * (2 / width) - 1
    return torch.stack(torch.meshgrid(ys, xs, indexing='ij'), dim=-1)


def deformable_attention_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, queries: torch.Tensor,
                         positions: torch.Tensor, table: torch.Tensor, attn_impl: str = 'sdpa',
                         bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The attention of :class:`DeformableAttention` once keys and values are sampled: the path
    resolved once for the call (:func:`~mmdat.models.layers.policy.resolve_attn_impl`), then its
    kernel or the materialised bias (:func:`~mmdat.models.layers.attention_math.
    sampled_position_bias`, then :func:`~mmdat.models.layers.attention_math.biased_attention`).

    Args:
        query (Tensor): ``(B, heads, H * W, head_dims)``.
        key (Tensor): ``(B, heads, Nk, head_dims)``.
        value (Tensor): ``(B, heads, Nk, head_dims)``.
        queries (Tensor): Query points ``(H, W, 2)``, a separable grid of normalised ``(y, x)``.
        positions (Tensor): Key positions ``(B * groups, Nk, 2)``.
        table (Tensor): Position bias table ``(heads, Th, Tw)``.
        attn_impl (str): One of the values of :class:`DeformableAttention`.
        bias (Tensor, optional): The materialised bias, when the caller has it already.
    """
    bias_grad = torch.is_grad_enabled() and (positions.requires_grad or table.requires_grad)
    choice = resolve_attn_impl(attn_impl, DEFORMABLE, query.device, query.dtype, key.shape[-2], bias_grad,
                               row_queries=queries.shape[1])
    if choice.kernel is not None:
        return choice.op(query, key, value, queries, positions, table)
    if bias is None:
        bias = sampled_position_bias(queries, positions, table, query.shape[0])
    return biased_attention(query, key, value, bias, choice.attention)


class OffsetNetwork(nn.Module):
    """Turns the queries of one channel group into a 2D offset per reference point.

    Depthwise conv -> LayerNorm -> GELU -> 1x1 projection to ``(dy, dx)`` without bias.

    Args:
        channels (int): Channels of one offset group.
        kernel_size (int): Kernel of the depthwise conv (odd, so the map size is kept).
    """

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f'offset kernel_size must be odd, got {kernel_size}')
        self.dwconv = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2,
                                groups=channels)
        self.norm = nn.LayerNorm(channels)
        self.act = nn.GELU()
        self.proj = nn.Linear(channels, 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x (Tensor): ``(N, C, H, W)``. Returns: raw offsets ``(N, H, W, 2)`` as (dy, dx)."""
        x = self.dwconv(x).permute(0, 2, 3, 1)
        return self.proj(self.act(self.norm(x)))


class DeformableAttention(nn.Module):
    """Deformable multi-head attention with a deformable relative position bias.

    Channels are split into ``num_groups`` groups. For each group an :class:`OffsetNetwork`
    turns the queries into offsets that move a uniform grid of reference points (one per
    pixel); keys and values are bilinearly sampled at the moved points and shared by all
    queries. Each head adds a bias read by bilinear sampling from a learnable table at half
    the normalised query-key displacement, so the same table serves any map size.

    Args:
        embed_dims (int): Channels of the input and output.
        num_heads (int): Attention heads; must divide ``embed_dims``.
        num_groups (int): Offset groups; must divide ``num_heads``.
        offset_kernel_size (int): Depthwise kernel of the offset network.
        table_size (int | tuple[int, int]): Map size the position bias table is made for
            (the map size at pre-training resolution); the table has ``2 * size - 1`` entries a side.
        offset_range_factor (float): Offsets are ``tanh(raw) * factor / (H, W)`` in normalised
            coordinates, i.e. at most ``factor / 2`` pixels.
        attn_impl (str): ``'sdpa'`` or ``'reference'`` (the materialised bias, see
            :func:`~mmdat.models.layers.attention_math.biased_attention`), ``'fused'`` (the
            bias is sampled inside the attention kernel and no ``N x N`` tensor is stored;
            C++ on CPU, Triton on CUDA), or ``'auto'``; see
            :func:`~mmdat.models.layers.policy.resolve_attn_impl`.
    """
    #: What this layer computes, for the attention policy (:mod:`mmdat.models.layers.policy`).
    LAYER = DEFORMABLE

    def __init__(self, embed_dims: int, num_heads: int, num_groups: int, offset_kernel_size: int,
                 table_size: Union[int, Sequence[int]], offset_range_factor: float = 2.0,
                 attn_impl: str = 'sdpa'):
        super().__init__()
        if embed_dims % num_heads != 0:
            raise ValueError(f'embed_dims ({embed_dims}) must be divisible by num_heads ({num_heads})')
        if num_groups < 1 or num_heads % num_groups != 0:
            raise ValueError(f'num_heads ({num_heads}) must be divisible by num_groups ({num_groups})')
        table_h, table_w = (table_size, table_size) if isinstance(table_size, int) else table_size
        self.embed_dims = embed_dims
        self.num_heads = num_heads
        self.num_groups = num_groups
        self.offset_range_factor = offset_range_factor
        self.attn_impl = check_attn_impl(attn_impl, self.LAYER, type(self).__name__)

        self.proj_q = nn.Linear(embed_dims, embed_dims)
        self.proj_k = nn.Linear(embed_dims, embed_dims)
        self.proj_v = nn.Linear(embed_dims, embed_dims)
        self.proj_out = nn.Linear(embed_dims, embed_dims)
        self.offset_net = OffsetNetwork(embed_dims // num_groups, offset_kernel_size)
        self.rpe_table = nn.Parameter(torch.zeros(num_heads, 2 * table_h - 1, 2 * table_w - 1))
        nn.init.trunc_normal_(self.rpe_table, std=0.01)
        #: Set by :func:`mmdat.models.utils.record_deformable_attention` while recording; the
        #: forward pass calls it with what it computed. ``None`` (the default) costs one check.
        self.recorder = None

    def _split_groups(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C)`` -> ``(B * groups, C / groups, H, W)``."""
        batch, height, width, _ = x.shape
        group_dims = self.embed_dims // self.num_groups
        x = x.view(batch, height, width, self.num_groups, group_dims).permute(0, 3, 4, 1, 2)
        return copy_view(x, batch * self.num_groups, group_dims, height, width)

    def sampling_positions(self, query: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Reference points and the deformed sampling positions of each offset group.

        Args:
            query (Tensor): Projected queries ``(B, H, W, C)``.

        Returns:
            tuple[Tensor, Tensor]: ``reference`` ``(H, W, 2)`` and ``positions``
            ``(B * groups, H, W, 2)``, both normalised ``(y, x)`` in ``[-1, 1]`` coordinates
            of the map (``align_corners=True`` convention of :func:`F.grid_sample`).
        """
        height, width = query.shape[1:3]
        offset = self.offset_net(self._split_groups(query)).tanh()
        # per-axis scales as scalars, not a tensor made from the sizes, which tracing would fix
        offset = torch.cat((offset[..., :1] * (self.offset_range_factor / height),
                            offset[..., 1:] * (self.offset_range_factor / width)), dim=-1)
        reference = pixel_centre_grid(height, width, query.device, offset.dtype)
        return reference, reference + offset

    def query_points(self, height: int, width: int, reference: torch.Tensor) -> torch.Tensor:
        """Normalised ``(y, x)`` positions of the queries for the position bias: ``(H, W, 2)``.

        In DAT v1 there is one reference point per query, at the query's pixel centre.
        """
        return reference

    def position_bias(self, queries: torch.Tensor, positions: torch.Tensor,
                      batch: int) -> torch.Tensor:
        """Bias of each head for every (query, sampled key) pair: ``(B, heads, Nq, Nk)``.

        Args:
            queries (Tensor): Query positions ``(H, W, 2)`` (see :meth:`query_points`).
            positions (Tensor): Key positions ``(B * groups, Hk, Wk, 2)``.
            batch (int): Batch size ``B``.
        """
        return sampled_position_bias(queries, positions, self.rpe_table, batch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x (Tensor): ``(B, H, W, C)``. Returns: Tensor ``(B, H, W, C)``."""
        batch, height, width, channels = x.shape
        query = self.proj_q(x)
        reference, positions = self.sampling_positions(query)
        queries = self.query_points(height, width, reference)

        sampled = F.grid_sample(self._split_groups(x), positions.flip(-1).to(x.dtype),
                                mode='bilinear', padding_mode='zeros', align_corners=True)
        num_keys = positions.shape[1] * positions.shape[2]
        sampled = sampled.view(batch, channels, num_keys).transpose(1, 2)  # B, Nk, C

        def heads(t: torch.Tensor, length) -> torch.Tensor:
            return t.reshape(batch, length, self.num_heads, channels // self.num_heads).transpose(1, 2)

        query = heads(query, height * width)
        key, value = heads(self.proj_k(sampled), num_keys), heads(self.proj_v(sampled), num_keys)
        bias = None
        if self.recorder is not None:  # recording needs the bias materialised, whatever the path
            bias = self.position_bias(queries, positions, batch)
            self.recorder(reference, positions, query, key, bias, (height, width))
        out = deformable_attention_op(query, key, value, queries, positions.flatten(1, 2), self.rpe_table,
                                   self.attn_impl, bias)
        out = out.transpose(1, 2)
        # the CPU kernel's output is laid out (B, N, heads, d) already: merging the heads is a view
        out = (out.view(batch, height, width, channels) if not is_tracing() and out.is_contiguous()
               else copy_view(out, batch, height, width, channels))
        return self.proj_out(out)
