"""Multi-head attention with an additive bias, through SDPA or a plain reference path."""
from typing import Optional

import torch
import torch.nn.functional as F

#: Attention implementations a user may ask for. ``'auto'`` picks the fastest one available for
#: the input at call time: the fused Triton kernel for deformable attention on CUDA (when Triton
#: is installed), SDPA otherwise, except on CPU for short key sequences and biases that need a
#: gradient (see :func:`biased_attention`). ``'fused'`` forces that kernel in the deformable
#: blocks; the window blocks have no fused kernel and use SDPA under ``'fused'``.
ATTN_IMPLS = ('auto', 'sdpa', 'reference', 'fused')

#: Under ``'auto'`` on CPU, attention over fewer keys than this runs the matmul path: there the
#: window blocks (49 keys) ran 1.13-1.23x faster through matmuls than through SDPA in
#: inference, while the deformable blocks ran 1.2-1.4x faster through SDPA from 196 keys on.
#: Measured with torch 2.13 on 2 cores; see docs/benchmarks.md.
CPU_SDPA_MIN_KEYS = 128

#: Added to the scores of keys a query must not see. A large finite value rather than ``-inf``
#: so that a query whose keys are all masked (a padded query, cropped later) gets a finite
#: uniform softmax instead of NaN; it is also the value of the official shifted-window mask.
MASK_VALUE = -100.0


def check_attn_impl(attn_impl: str) -> str:
    """Validate ``attn_impl``. ``'auto'`` is kept: it is resolved per call, from the input's device."""
    if attn_impl not in ATTN_IMPLS:
        raise ValueError(f'attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}')
    return attn_impl


def biased_attention(query: torch.Tensor,
                     key: torch.Tensor,
                     value: torch.Tensor,
                     bias: Optional[torch.Tensor],
                     attn_impl: str = 'sdpa') -> torch.Tensor:
    """Softmax attention ``softmax(q k^T / sqrt(d) + bias) v``.

    Args:
        query (Tensor): ``(..., num_heads, num_queries, head_dims)``.
        key (Tensor): ``(..., num_heads, num_keys, head_dims)``.
        value (Tensor): ``(..., num_heads, num_keys, head_dims)``.
        bias (Tensor, optional): Additive bias broadcastable to
            ``(..., num_heads, num_queries, num_keys)``.
        attn_impl (str): ``'sdpa'`` runs :func:`F.scaled_dot_product_attention` with the bias as
            ``attn_mask``; ``'reference'`` spells the same computation out with matmuls.
            ``'fused'`` means SDPA here (a materialised bias has no fused kernel); ``'auto'``
            means SDPA too, except on CPU with fewer than :data:`CPU_SDPA_MIN_KEYS` keys or
            with a bias that requires grad: there the matmuls are faster (for such a bias
            SDPA falls back on CPU to its own math path, the same matmuls with more overhead).

    Returns:
        Tensor: ``(..., num_heads, num_queries, head_dims)``.
    """
    if attn_impl == 'auto':
        bias_grad = bias is not None and bias.requires_grad
        matmuls = query.device.type == 'cpu' and (key.shape[-2] < CPU_SDPA_MIN_KEYS or bias_grad)
        attn_impl = 'reference' if matmuls else 'sdpa'
    if attn_impl in ('sdpa', 'fused'):
        if bias is not None:
            # SDPA requires a float mask in the query's dtype (e.g. under autocast).
            bias = bias.to(query.dtype)
        return F.scaled_dot_product_attention(query, key, value, attn_mask=bias)
    if attn_impl == 'reference':
        scores = (query * query.shape[-1]**-0.5) @ key.transpose(-2, -1)
        if bias is not None:
            scores = scores + bias
        return scores.softmax(dim=-1).to(value.dtype) @ value
    raise ValueError(f'attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}')
