"""Window attention and shifted-window attention for maps of any size."""
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention_math import MASK_VALUE, biased_attention
from .policy import WINDOW, check_attn_impl, resolve_attn_impl
from .tracing import copy_view, eager_cache, pad_to_multiple


def _axis_labels(size, padded, window_size: int, shift_size: int,
                 device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Seam region (0-2) and padding flag of each position of one axis of the rolled map."""
    positions = torch.arange(padded, device=device)
    is_pad = torch.roll((positions >= size).long(), -shift_size, 0) if shift_size else positions >= size
    # In the rolled frame the last window of the axis joins pixels from both ends of the map;
    # the seam sits shift_size from the end.
    region = ((positions >= padded - window_size).long() + (positions >= padded - shift_size).long()
              if shift_size else torch.zeros_like(positions))
    return region, is_pad.long()


def build_window_attention_mask(height, width, window_size: int, shift_size: int,
                                device: torch.device) -> torch.Tensor:
    """Mask of the keys each query may attend to, per window, for one map size.

    The map of ``height x width`` is padded at the bottom and right to a multiple of
    ``window_size`` and, when ``shift_size > 0``, rolled up and left by ``shift_size``.
    A query may attend to a key only if both lie in the same region: the same side of every
    wrap-around seam made by the roll, and both real pixels or both padding. The result
    therefore does not depend on how much padding there is. Built from ``arange`` and
    comparisons only, so ``height`` and ``width`` may be traced or symbolic sizes.

    Returns:
        Tensor: ``(num_windows, 1, window_size**2, window_size**2)`` holding 0 where attention
        is allowed and :data:`MASK_VALUE` elsewhere.
    """
    padded_h = height + pad_to_multiple(height, window_size)
    padded_w = width + pad_to_multiple(width, window_size)
    row_region, row_pad = _axis_labels(height, padded_h, window_size, shift_size, device)
    col_region, col_pad = _axis_labels(width, padded_w, window_size, shift_size, device)
    region = row_region[:, None] * 3 + col_region[None, :]
    label = region * 2 + torch.maximum(row_pad[:, None], col_pad[None, :])

    label = label.view(padded_h // window_size, window_size, padded_w // window_size, window_size)
    label = label.permute(0, 2, 1, 3).reshape(-1, window_size * window_size)
    blocked = label[:, :, None] != label[:, None, :]
    mask = torch.zeros_like(blocked, dtype=torch.float32).masked_fill(blocked, MASK_VALUE)
    return mask.unsqueeze(1)


@eager_cache(64, traced=build_window_attention_mask)
def window_attention_mask(height: int, width: int, window_size: int, shift_size: int,
                          device: torch.device) -> Optional[torch.Tensor]:
    """:func:`build_window_attention_mask`, and for eager calls cached per size and ``None``
    when every key is allowed (no shift and no padding). Callers must not modify the result.

    Traced and compiled calls always build the mask in the graph: a cache would hold traced
    values and the ``None`` branch would fix the map size (see
    :func:`~mmdat.models.layers.tracing.eager_cache`).
    """
    if shift_size == 0 and height % window_size == 0 and width % window_size == 0:
        return None
    return build_window_attention_mask(height, width, window_size, shift_size, device)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside non-overlapping (optionally shifted) windows.

    The map is padded to a multiple of the window and cropped back; padded keys are masked, so
    the output on real pixels is the same whatever the padding. Each head has a learnable
    relative position bias indexed by the query-key offset inside the window.

    Args:
        embed_dims (int): Channels of the input and output.
        num_heads (int): Attention heads; must divide ``embed_dims``.
        window_size (int): Side of the square windows.
        shift_size (int): Cyclic shift of the windows; 0 for plain windows, otherwise in
            ``(0, window_size)``.
        attn_impl (str): ``'auto'``, ``'sdpa'`` or ``'reference'``
            (:func:`~mmdat.models.layers.policy.resolve_attn_impl`).
    """
    #: What this layer computes, for the attention policy (:mod:`mmdat.models.layers.policy`).
    LAYER = WINDOW

    def __init__(self, embed_dims: int, num_heads: int, window_size: int, shift_size: int = 0,
                 attn_impl: str = 'sdpa'):
        super().__init__()
        if embed_dims % num_heads != 0:
            raise ValueError(f'embed_dims ({embed_dims}) must be divisible by num_heads ({num_heads})')
        if not 0 <= shift_size < window_size:
            raise ValueError(f'shift_size must be in [0, window_size={window_size}), got {shift_size}')
        self.embed_dims = embed_dims
        self.num_heads = num_heads
        self.window_size = window_size
        self.shift_size = shift_size
        self.attn_impl = check_attn_impl(attn_impl, self.LAYER, type(self).__name__)

        self.qkv = nn.Linear(embed_dims, embed_dims * 3)
        self.proj = nn.Linear(embed_dims, embed_dims)
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size - 1)**2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

        coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size),
                                            indexing='ij')).flatten(1)
        offsets = (coords[:, :, None] - coords[:, None, :]) + (window_size - 1)
        index = offsets[0] * (2 * window_size - 1) + offsets[1]
        self.register_buffer('relative_position_index', index, persistent=False)

    def relative_position_bias(self) -> torch.Tensor:
        """The bias of every query-key pair of a window: ``(num_heads, ws*ws, ws*ws)``."""
        bias = self.relative_position_bias_table[self.relative_position_index]
        return bias.permute(2, 0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x (Tensor): ``(B, H, W, C)``. Returns: Tensor ``(B, H, W, C)``."""
        batch, height, width, channels = x.shape
        ws, shift = self.window_size, self.shift_size
        pad_h, pad_w = pad_to_multiple(height, ws), pad_to_multiple(width, ws)
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        padded_h, padded_w = x.shape[1:3]
        if shift:
            x = torch.roll(x, (-shift, -shift), dims=(1, 2))

        rows, cols = padded_h // ws, padded_w // ws
        windows = x.view(batch, rows, ws, cols, ws, channels).permute(0, 1, 3, 2, 4, 5)
        windows = copy_view(windows, batch, rows * cols, ws * ws, channels)
        qkv = self.qkv(windows).view(batch, rows * cols, ws * ws, 3, self.num_heads,
                                     channels // self.num_heads)
        query, key, value = qkv.permute(3, 0, 1, 4, 2, 5).unbind(0)  # B, nW, heads, N, d

        bias = self.relative_position_bias()
        mask = window_attention_mask(height, width, ws, shift, x.device)
        if mask is not None:
            bias = bias + mask
        choice = resolve_attn_impl(self.attn_impl, self.LAYER, query.device, query.dtype, ws * ws, bias.requires_grad)
        out = biased_attention(query, key, value, bias, choice.attention)

        out = copy_view(out.transpose(2, 3), batch, rows, cols, ws, ws, channels)
        out = copy_view(out.transpose(2, 3), batch, padded_h, padded_w, channels)
        if shift:
            out = torch.roll(out, (shift, shift), dims=(1, 2))
        # cropped by negative padding: a slice [:height] of a symbolic size makes torch.export
        # guard on height <= padded_h, which it cannot prove
        out = F.pad(out, (0, 0, 0, -pad_w, 0, -pad_h))
        return self.proj(out)
