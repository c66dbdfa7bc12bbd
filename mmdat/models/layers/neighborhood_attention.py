"""2D neighborhood attention (Hassani et al., CVPR 2023) with NATTEN 0.14 semantics.

Each query attends to the ``kernel_size x kernel_size`` keys around it. Near the border the
neighborhood is shifted inwards so that it always holds ``kernel_size**2`` keys (it is not
cropped or padded), and each head adds a relative position bias ``rpb[head, dy + K - 1,
dx + K - 1]`` for the key-query offset ``(dy, dx)``. This is what NATTEN's ``natten2dqkrpb`` and
``natten2dav`` compute (dilation 1). NATTEN itself requires maps of at least the kernel size;
:class:`NeighborhoodAttention` handles smaller maps as NATTEN's and the official DAT++ modules
do: it zero-pads the input at the bottom and right up to the kernel size before the qkv
projection (the padded tokens take part as keys, unmasked) and crops the output.

The paths (:mod:`mmdat.models.layers.policy`): ``'reference'`` gathers every query's ``K**2``
keys and values (:func:`~mmdat.models.layers.attention_math.reference_neighborhood_attention`,
the oracle of the tests, and the path of traced and compiled code); ``'sdpa'`` tiles the map
(:mod:`~mmdat.models.layers.neighborhood_tiles`); ``'fused'`` computes exactly ``K**2``
scores per query in a C++ kernel on CPU (:mod:`~mmdat.models.layers.cpu_neighborhood`; the
tiles elsewhere); ``'natten'`` runs natten's kernels (:mod:`~mmdat.models.layers.natten_kernel`).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention_math import reference_neighborhood_attention
from .neighborhood_tiles import halo_keys, tile_side
from .policy import NEIGHBORHOOD, check_attn_impl, resolve_attn_impl
from .tracing import clamp_size_min, is_tracing


def neighborhood_attention(query: torch.Tensor,
                           key: torch.Tensor,
                           value: torch.Tensor,
                           rpb: torch.Tensor,
                           kernel_size: int,
                           attn_impl: str = 'sdpa',
                           with_cp: bool = False) -> torch.Tensor:
    """Neighborhood attention with a relative position bias, NATTEN 0.14 semantics.

    Args:
        query, key, value, rpb, kernel_size: As in
            :func:`~mmdat.models.layers.attention_math.reference_neighborhood_attention`.
        attn_impl (str): ``'reference'``: every query's ``kernel_size**2`` keys and values
            gathered (copies of them), then matmuls and softmax: simple, the oracle of the
            tests, and memory-hungry. ``'sdpa'``: tiles of ``T x T`` queries (``T`` from
            :data:`~mmdat.models.layers.neighborhood_tiles.NA_TILES`) against the keys of their
            halo (``(T + kernel_size - 1)**2``, masked to each query's neighborhood) through
            SDPA, with no per-query copies; in training the tiles are recomputed in backward,
            so only the inputs are kept. ``'fused'``: on CPU (float32, float64) a C++ kernel
            that scores each query's ``kernel_size**2`` keys in place and keeps one
            log-sum-exp a query for backward; elsewhere the tiles through SDPA. ``'auto'``: on CPU
            the C++ kernel where it builds; otherwise natten's kernels where installed (not
            with ``with_cp``), otherwise the tiles, their attention through SDPA or matmuls as
            :func:`~mmdat.models.layers.policy.materialised_attention` picks (on CPU, matmuls
            when the bias needs a gradient). ``'natten'``: natten's kernels.
        with_cp (bool): The call is recomputed in backward (gradient checkpointing): ``'auto'``
            then leaves out kernels whose backward refuses it (natten 0.14's reads its saved
            tensors twice).

    Returns:
        Tensor: ``(B, heads, H, W, d)``.
    """
    height, width = query.shape[2:4]
    # a check on traced sizes would fix them; NeighborhoodAttention pads small maps anyway
    if not is_tracing() and (height < kernel_size or width < kernel_size):
        raise ValueError(f'Neighborhood attention needs maps of at least kernel_size={kernel_size} '
                         f'a side, got {height}x{width}')
    check_attn_impl(attn_impl, NEIGHBORHOOD, 'neighborhood attention')
    # keys per query of the tiles' attention (traced code runs the reference, whatever it is)
    num_keys = kernel_size**2 if is_tracing() else halo_keys(height, width, kernel_size,
                                                               tile_side(query, key, value, rpb))
    bias_grad = torch.is_grad_enabled() and rpb.requires_grad
    choice = resolve_attn_impl(attn_impl, NEIGHBORHOOD, query.device, query.dtype, num_keys, bias_grad,
                               checkpointed=with_cp)
    if choice.kernel is None:
        return reference_neighborhood_attention(query, key, value, rpb, kernel_size)
    return choice.op(query, key, value, rpb, kernel_size)


class NeighborhoodAttention(nn.Module):
    """Multi-head 2D neighborhood attention with a relative position bias (DAT++ blocks).

    Maps smaller than the kernel are zero-padded at the bottom and right up to the kernel size
    before the qkv projection and cropped back afterwards, as in NATTEN's and the official
    DAT++ modules, so results match theirs at every map size.

    Args:
        embed_dims (int): Channels of the input and output.
        num_heads (int): Attention heads; must divide ``embed_dims``.
        kernel_size (int): Odd neighborhood side, at least 3.
        attn_impl (str): ``'auto'``, ``'fused'``, ``'sdpa'``, ``'reference'`` or ``'natten'``; see
            :func:`neighborhood_attention`.
        with_cp (bool): The block holding this layer is recomputed in backward (gradient
            checkpointing); see :func:`neighborhood_attention`.
    """
    #: What this layer computes, for the attention policy (:mod:`mmdat.models.layers.policy`).
    LAYER = NEIGHBORHOOD

    def __init__(self, embed_dims: int, num_heads: int, kernel_size: int = 7,
                 attn_impl: str = 'sdpa', with_cp: bool = False):
        super().__init__()
        if embed_dims % num_heads != 0:
            raise ValueError(f'embed_dims ({embed_dims}) must be divisible by num_heads ({num_heads})')
        if not isinstance(kernel_size, int) or kernel_size < 3 or kernel_size % 2 != 1:
            raise ValueError(f'kernel_size must be an odd int >= 3, got {kernel_size!r}')
        self.embed_dims = embed_dims
        self.num_heads = num_heads
        self.kernel_size = kernel_size
        self.attn_impl = check_attn_impl(attn_impl, self.LAYER, type(self).__name__)
        self.with_cp = with_cp

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
        out = neighborhood_attention(query, key, value, self.rpb, self.kernel_size, self.attn_impl, self.with_cp)
        out = out.permute(0, 2, 3, 1, 4).reshape(batch, padded_h, padded_w, channels)
        if is_tracing() or pad_h or pad_w:
            out = F.pad(out, (0, 0, 0, -pad_w, 0, -pad_h))  # crop; see WindowAttention.forward
        return self.proj(out)

    def extra_repr(self) -> str:
        return (f'embed_dims={self.embed_dims}, num_heads={self.num_heads}, '
                f'kernel_size={self.kernel_size}, attn_impl={self.attn_impl!r}')
