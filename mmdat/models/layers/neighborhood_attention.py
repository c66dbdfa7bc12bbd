"""2D neighborhood attention (Hassani et al., CVPR 2023) with NATTEN 0.14 semantics.

Each query attends to the ``kernel_size x kernel_size`` keys around it. Near the border the
neighborhood is shifted inwards so that it always holds ``kernel_size**2`` keys (it is not
cropped or padded), and each head adds a relative position bias ``rpb[head, dy + K - 1,
dx + K - 1]`` for the key-query offset ``(dy, dx)``. This is what NATTEN's ``natten2dqkrpb`` and
``natten2dav`` compute (dilation 1). NATTEN itself requires maps of at least the kernel size;
:class:`NeighborhoodAttention` handles smaller maps as NATTEN's and the official DAT++ modules
do: it zero-pads the input at the bottom and right up to the kernel size before the qkv
projection (the padded tokens take part as keys, unmasked) and crops the output.
"""
import functools
import inspect
from typing import Callable, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import biased_attention, check_attn_impl

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
        size; callers must not modify them.
    """
    queries = torch.arange(length, device=device)
    # the neighborhood is centred on the query and shifted inwards at the borders
    start = (queries - kernel_size // 2).clamp(0, length - kernel_size)
    keys = start[:, None] + torch.arange(kernel_size, device=device)
    return keys, keys - queries[:, None] + kernel_size - 1


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
        attn_impl (str): ``'sdpa'``, ``'reference'`` or ``'auto'`` (see
            :func:`biased_attention`; with ``kernel_size**2 < 128`` keys, ``'auto'`` runs the
            matmuls on CPU, which are faster there, and SDPA elsewhere), all in pure PyTorch on
            gathered neighborhoods, or ``'natten'``, NATTEN's kernels.

    Returns:
        Tensor: ``(B, heads, H, W, d)``.
    """
    batch, heads, height, width, head_dims = query.shape
    if height < kernel_size or width < kernel_size:
        raise ValueError(f'Neighborhood attention needs maps of at least kernel_size={kernel_size} '
                         f'a side, got {height}x{width}')
    if attn_impl == 'natten':
        functions = natten_functions()
        if functions is None:
            raise RuntimeError("attn_impl='natten' needs a compatible natten package "
                               '(natten2dqkrpb/natten2dav or na2d_qk with rpb)')
        qk_rpb, av = functions
        attn = qk_rpb(query * head_dims**-0.5, key, rpb.to(query.dtype), kernel_size)
        return av(attn.softmax(dim=-1), value, kernel_size)
    if attn_impl not in ('auto', 'sdpa', 'reference'):
        raise ValueError(f'attn_impl must be one of {NA_IMPLS}, got {attn_impl!r}')

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
                           neighborhoods(key), neighborhoods(value), bias, attn_impl)
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
        pad_h = max(0, self.kernel_size - height)
        pad_w = max(0, self.kernel_size - width)
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        padded_h, padded_w = x.shape[1:3]
        qkv = self.qkv(x).view(batch, padded_h, padded_w, 3, self.num_heads, -1)
        query, key, value = qkv.permute(3, 0, 4, 1, 2, 5).unbind(0)  # B, heads, H, W, d
        out = neighborhood_attention(query, key, value, self.rpb, self.kernel_size, self.attn_impl)
        out = out.permute(0, 2, 3, 1, 4).reshape(batch, padded_h, padded_w, channels)
        return self.proj(out[:, :height, :width])

    def extra_repr(self) -> str:
        return (f'embed_dims={self.embed_dims}, num_heads={self.num_heads}, '
                f'kernel_size={self.kernel_size}, attn_impl={self.attn_impl!r}')
