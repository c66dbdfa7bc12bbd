"""Neighborhood attention on CPU with exactly ``K**2`` scores per query: a C++ kernel built on
first use.

The kernel (``csrc/neighborhood_attention_cpu.cpp``) computes what
:func:`~mmdat.models.layers.attention_math.reference_neighborhood_attention` computes (NATTEN
0.14 semantics, dilation 1) without copying any key: 16 queries of a row at a time score their
``K x K`` keys as vector products with shifted key rows, where the tiles
(:mod:`~mmdat.models.layers.neighborhood_tiles`) score a halo of ``(T + K - 1)**2`` and
recompute it in backward. It reads q, k and v with their strides (the module's views of one
qkv projection). Forward keeps each query's log-sum-exp when gradients will be needed; backward
recomputes the scores and gives gradients for the query, key, value and bias table, with results
that do not depend on the number of threads. Work is split over runs of query rows of each
(batch, head). It is built on first use by :mod:`~mmdat.models.layers.cpu_build`;
where that fails, the neighborhood blocks use the tiles.

The kernel interface of :mod:`mmdat.models.layers.policy`: :func:`installed`, :func:`supports`
and :func:`op`.
"""
import functools

import torch

from . import cpu_build

#: The kernel's source (a file of ``csrc``) and the prefix of its builds' names.
SOURCE, BUILD_PREFIX = 'neighborhood_attention_cpu.cpp', 'mmdat_neighborhood_cpu'
#: Input dtypes the kernel takes (it computes in the input's dtype).
SUPPORTED_DTYPES = (torch.float32, torch.float64)
#: Kernel sides it takes: odd, 3 to 13 (a query's scores live on the stack); DAT++ uses 7.
KERNEL_SIZES = tuple(range(3, 14, 2))
#: What the kernel needs, for error messages.
REQUIREMENT = 'a C++ compiler (the CPU kernel is built on first use) and float32 or float64 inputs'


@functools.lru_cache(maxsize=1)
def kernel_available() -> bool:
    """Build (once per machine and source version) and load the kernel; False, after one
    warning, when it cannot be built."""
    return cpu_build.build_or_warn(SOURCE, BUILD_PREFIX, 'neighborhood attention', 'the tiles')


class CPUNeighborhoodAttentionFunction(torch.autograd.Function):
    """Autograd function of :func:`cpu_neighborhood_attention` (inputs already validated)."""

    @staticmethod
    def forward(ctx, query, key, value, rpb, kernel_size, with_lse):
        out, lse = torch.ops.mmdat_neighborhood_cpu.forward(query, key, value, rpb, kernel_size, with_lse)
        ctx.kernel_size = kernel_size
        ctx.save_for_backward(query, key, value, rpb, lse)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        query, key, value, rpb, lse = ctx.saved_tensors
        dq, dk, dv, drpb = torch.ops.mmdat_neighborhood_cpu.backward(grad_out, query, key, value, rpb, lse,
                                                                     ctx.kernel_size)
        return dq, dk, dv, drpb, None, None


def check_inputs(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rpb: torch.Tensor,
                 kernel_size: int) -> None:
    """Raise a clear error for inputs the kernel does not take."""
    if not isinstance(kernel_size, int) or kernel_size not in KERNEL_SIZES:
        raise ValueError(f'The CPU neighborhood kernel takes kernel_size in {KERNEL_SIZES}, got {kernel_size!r}')
    for name, t in dict(query=query, key=key, value=value, rpb=rpb).items():
        if t.device.type != 'cpu' or t.dtype not in SUPPORTED_DTYPES or t.dtype != query.dtype:
            raise TypeError(f'The CPU neighborhood kernel takes CPU tensors of one dtype of {SUPPORTED_DTYPES}, '
                            f'got {name} {t.dtype} on {t.device} (query: {query.dtype})')
    if query.dim() != 5 or key.shape != query.shape or value.shape != query.shape:
        raise ValueError('query, key and value must be (B, heads, H, W, d) of one shape, got '
                         f'{tuple(query.shape)}, {tuple(key.shape)} and {tuple(value.shape)}')
    height, width = query.shape[2:4]
    if height < kernel_size or width < kernel_size:
        raise ValueError(f'The CPU neighborhood kernel needs maps of at least kernel_size={kernel_size} a side, '
                         f'got {height}x{width}')
    side = 2 * kernel_size - 1
    if tuple(rpb.shape) != (query.shape[1], side, side):
        raise ValueError(f'rpb must be (heads, 2 * kernel_size - 1, 2 * kernel_size - 1) = '
                         f'{(query.shape[1], side, side)}, got {tuple(rpb.shape)}')


def cpu_neighborhood_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rpb: torch.Tensor,
                               kernel_size: int) -> torch.Tensor:
    """Neighborhood attention with a relative position bias on CPU, ``K**2`` scores per query.

    The same computation as :func:`~mmdat.models.layers.attention_math.
    reference_neighborhood_attention`.

    Args:
        query (Tensor): ``(B, heads, H, W, d)``, float32 or float64, not yet scaled.
        key (Tensor): ``(B, heads, H, W, d)``.
        value (Tensor): ``(B, heads, H, W, d)``.
        rpb (Tensor): ``(heads, 2 * kernel_size - 1, 2 * kernel_size - 1)``, the query's dtype.
        kernel_size (int): Odd neighborhood side in :data:`KERNEL_SIZES`; ``H`` and ``W`` must be
            at least this.

    Returns:
        Tensor: ``(B, heads, H, W, d)``.
    """
    check_inputs(query, key, value, rpb, kernel_size)
    if not kernel_available():
        raise RuntimeError('The CPU neighborhood attention kernel is not available (see the warning given '
                           'when it failed to build)')
    with_lse = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value, rpb))
    # the kernel reads query, key and value with their strides (views of one qkv projection)
    return CPUNeighborhoodAttentionFunction.apply(query, key, value, rpb.contiguous(), kernel_size, with_lse)


def installed() -> bool:
    """Whether the kernel can be built or loaded here (a C++ compiler, or a build made before),
    without building it."""
    return cpu_build.installed(SOURCE, BUILD_PREFIX)


def supports(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the kernel runs on tensors of this device and dtype (building it the first time)."""
    return device.type == 'cpu' and dtype in SUPPORTED_DTYPES and kernel_available()


def op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rpb: torch.Tensor,
       kernel_size: int) -> torch.Tensor:
    """:func:`cpu_neighborhood_attention` with the neighborhood kernels' arguments: ``rpb`` in
    any float dtype (cast to the query's)."""
    return cpu_neighborhood_attention(query, key, value, rpb.to(query.dtype), kernel_size)
