"""NATTEN's neighborhood attention kernels (the optional natten package), NATTEN 0.14 semantics.

The kernel interface of :mod:`mmdat.models.layers.policy`: :func:`installed`, :func:`supports`
and :func:`op`, which computes what
:func:`~mmdat.models.layers.attention_math.reference_neighborhood_attention` computes.
"""
import functools
import inspect
from typing import Callable, Optional, Tuple

import torch

#: What the kernels need, for error messages.
REQUIREMENT = 'a compatible natten package (natten2dqkrpb/natten2dav or na2d_qk with rpb)'


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


def installed() -> bool:
    """Whether a compatible natten is installed (see :func:`natten_functions`)."""
    return natten_functions() is not None


def supports(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether natten's kernels are there (natten checks devices and dtypes itself)."""
    return installed()


def op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rpb: torch.Tensor,
       kernel_size: int) -> torch.Tensor:
    """Neighborhood attention through natten's kernels: ``(B, heads, H, W, d)`` tensors, the
    query not yet scaled, ``rpb`` ``(heads, 2K - 1, 2K - 1)``."""
    functions = natten_functions()
    if functions is None:
        raise RuntimeError(f"attn_impl='natten' needs {REQUIREMENT}")
    qk_rpb, av = functions
    attn = qk_rpb(query * query.shape[-1]**-0.5, key, rpb.to(query.dtype), kernel_size)
    return av(attn.softmax(dim=-1), value, kernel_size)
