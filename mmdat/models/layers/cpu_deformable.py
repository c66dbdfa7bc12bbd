"""Deformable attention on CPU without an ``N x N`` tensor: a C++ kernel built on first use.

The kernel (``csrc/deformable_attention_cpu.cpp``) computes what
:func:`~mmdat.models.layers.attention_math.reference_deformable_attention` computes,
for queries on a separable grid (rows ``ys``, columns ``xs``), one query row at a time and over
blocks of keys with an online softmax (flash-attention style): the bias is sampled inside the
loop, so memory grows with ``row x block`` rather than ``N x N``. Forward also returns the
log-sum-exp of each query's scores, from which backward recomputes the probabilities, and gives
gradients for the queries, keys, values, key positions and table. On machines with AVX-512 the
float32 hot loops use it (register permutes for the bias, a vector exp); elsewhere, and for
float64, portable loops.

It is built on first use by :mod:`~mmdat.models.layers.cpu_build`; where that fails (no C++
compiler), :func:`cpu_kernel_available` is False after one warning, and the deformable blocks use
the materialised bias instead.

The kernel interface of :mod:`mmdat.models.layers.policy`: :func:`installed`, :func:`supports`
and :func:`op`.
"""
import functools
from typing import Tuple

import torch

from . import cpu_build
from .attention_math import check_deformable_inputs

#: The kernel's source (a file of ``csrc``) and the prefix of its builds' names.
SOURCE, BUILD_PREFIX = 'deformable_attention_cpu.cpp', 'mmdat_deformable_cpu'
#: Input dtypes the kernel takes (it computes in the input's dtype).
SUPPORTED_DTYPES = (torch.float32, torch.float64)


@functools.lru_cache(maxsize=1)
def cpu_kernel_available() -> bool:
    """Build (once per machine and source version) and load the kernel; False, after one
    warning, when it cannot be built."""
    return cpu_build.build_or_warn(SOURCE, BUILD_PREFIX, 'deformable attention', 'the materialised position bias')


class CPUDeformableAttentionFunction(torch.autograd.Function):
    """Autograd function of :func:`cpu_deformable_attention` (inputs already validated)."""

    @staticmethod
    def forward(ctx, query, key, value, ys, xs, positions, table):
        out, lse = torch.ops.mmdat_deformable_cpu.forward(query, key, value, ys, xs, positions, table)
        ctx.save_for_backward(query, key, value, out, lse, ys, xs, positions, table)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        query, key, value, out, lse, ys, xs, positions, table = ctx.saved_tensors
        batch, heads = query.shape[:2]
        groups = positions.shape[0] // batch
        dq, dk, dv, dpos, dtable = torch.ops.mmdat_deformable_cpu.backward(
            _rows(grad_out), query, key, value, out, lse, ys, xs, positions, table)
        # heads of one offset group share its positions; every batch entry reads the same table
        dpos = dpos.view(batch, groups, heads // groups, -1, 2).sum(2).view(batch * groups, -1, 2)
        return dq, dk, dv, None, None, dpos, dtable.sum(0)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` ``(B, heads, Nq, d)`` as the kernel reads it: any strides but contiguous head dims
    (the module's heads are a view of ``(B, Nq, heads, d)``, which needs no copy)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _check_inputs(query, key, value, ys, xs, positions, table) -> None:
    tensors = dict(query=query, key=key, value=value, ys=ys, xs=xs, positions=positions, table=table)
    check_deformable_inputs(tensors)
    for name, t in tensors.items():
        if t.device.type != 'cpu' or t.dtype != query.dtype:
            raise TypeError(f'All inputs must be CPU tensors of one dtype of {SUPPORTED_DTYPES}, '
                            f'got {name} {t.dtype} on {t.device} (query: {query.dtype})')
    if query.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f'The CPU kernel takes {SUPPORTED_DTYPES}, got {query.dtype}')
    if ys.dim() != 1 or xs.dim() != 1 or ys.numel() * xs.numel() != query.shape[2]:
        raise ValueError(f'ys and xs must be 1-D with len(ys) * len(xs) = Nq = {query.shape[2]}, got '
                         f'{tuple(ys.shape)} and {tuple(xs.shape)}')
    if ys.requires_grad or xs.requires_grad:
        raise ValueError('The CPU kernel gives no gradient for the query coordinates; pass tensors '
                         'that do not require grad')


def cpu_deformable_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             ys: torch.Tensor, xs: torch.Tensor, positions: torch.Tensor,
                             table: torch.Tensor) -> torch.Tensor:
    """Deformable attention with the sampled relative position bias, on CPU, without ``N x N``.

    The same computation as :func:`~mmdat.models.layers.attention_math.
    reference_deformable_attention` with ``queries`` the grid of ``(ys[r], xs[c])`` in row-major
    order (query ``r * len(xs) + c``).

    Args:
        query (Tensor): ``(B, heads, Nq, head_dims)``, float32 or float64.
        key (Tensor): ``(B, heads, Nk, head_dims)``.
        value (Tensor): ``(B, heads, Nk, head_dims)``.
        ys (Tensor): Normalised y of the query rows ``(H, )``.
        xs (Tensor): Normalised x of the query columns ``(W, )``; ``H * W = Nq``.
        positions (Tensor): Key positions ``(B * groups, Nk, 2)``, normalised ``(y, x)``.
        table (Tensor): Per-head bias table ``(heads, Th, Tw)``.

    Returns:
        Tensor: ``(B, heads, Nq, head_dims)``, laid out as ``(B, Nq, heads, head_dims)`` so that
        merging the heads is a view.
    """
    _check_inputs(query, key, value, ys, xs, positions, table)
    if not cpu_kernel_available():
        raise RuntimeError('The CPU deformable attention kernel is not available (see the warning '
                           'given when it failed to build)')
    key, value, ys, xs, positions, table = (t.contiguous() for t in (key, value, ys, xs, positions, table))
    return CPUDeformableAttentionFunction.apply(_rows(query), key, value, ys, xs, positions, table)


def work_split(batch: int, heads: int, rows: int, threads: int) -> Tuple[int, int]:
    """The parallel tasks of the kernel at these shapes and thread count, as the kernel itself
    counts them (it is asked; the rule lives in the C++ source only): forward, one task per query
    row of each (batch, head), shared out among the threads; backward, those rows cut into one
    run per thread (at most one per row).

    Args:
        batch (int): Batch size ``B``.
        heads (int): Attention heads.
        rows (int): Query rows ``H`` of the grid.
        threads (int): torch's CPU threads.

    Returns:
        tuple[int, int]: ``(forward tasks, backward tasks)``.
    """
    if min(batch, heads, rows, threads) < 1:
        raise ValueError(f'batch, heads, rows and threads must be >= 1, got {(batch, heads, rows, threads)}')
    if not cpu_kernel_available():
        raise RuntimeError('The CPU deformable attention kernel is not available (see the warning '
                           'given when it failed to build)')
    forward, backward = torch.ops.mmdat_deformable_cpu.work_split(batch, heads, rows, threads)
    return forward, backward


def grid_axes(grid: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The row ys and column xs of a separable ``(H, W, 2)`` grid of ``(y, x)`` points."""
    return grid[:, 0, 0], grid[0, :, 1]


#: What the kernel needs, for error messages.
REQUIREMENT = 'a C++ compiler (the CPU kernel is built on first use) and float32 or float64 inputs'


def installed() -> bool:
    """Whether the kernel can be built or loaded here (a C++ compiler, or a build made before),
    without building it."""
    return cpu_build.installed(SOURCE, BUILD_PREFIX)


def supports(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the kernel runs on tensors of this device and dtype (building it the first time)."""
    return device.type == 'cpu' and dtype in SUPPORTED_DTYPES and cpu_kernel_available()


def op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, queries: torch.Tensor,
       positions: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """:func:`cpu_deformable_attention` with the deformable kernels' arguments: ``queries`` a
    separable ``(H, W, 2)`` grid, ``positions`` and ``table`` in any float dtype (cast to the
    query's)."""
    ys, xs = grid_axes(queries.to(query.dtype))
    return cpu_deformable_attention(query, key, value, ys, xs, positions.to(query.dtype),
                                    table.to(query.dtype))
