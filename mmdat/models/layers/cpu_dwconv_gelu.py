"""The hidden map of DAT++'s MLP on CPU, ``gelu(h + dwconv(h))``, in one pass: a C++ kernel built
on first use.

The kernel (``csrc/dwconv_gelu_cpu.cpp``) computes what
:func:`~mmdat.models.layers.attention_math.reference_dwconv_gelu` computes on channels-last
maps, writing one new tensor where the plain operators write the conv's output and pass over it
twice more (sum, GELU); its backward recomputes the pre-activation on the fly and writes the
GELU's gradient over a buffer the caller gives up, so the MLP's backward allocates two hidden
maps instead of four (:mod:`~mmdat.models.layers.mlp`). Results do not depend on the number of
threads. Where the kernel does not build, the MLP runs the plain operators.

The kernel interface of :mod:`mmdat.models.layers.policy`: :func:`installed`, :func:`supports`
and :func:`op` (differentiable, for the self-check); the MLP calls :func:`activation` and
:func:`activation_backward`.
"""
import functools
from typing import Tuple

import torch

from . import cpu_build

#: The kernel's source (a file of ``csrc``) and the prefix of its builds' names.
SOURCE, BUILD_PREFIX = 'dwconv_gelu_cpu.cpp', 'mmdat_dwconv_gelu_cpu'
#: Input dtypes the kernel takes (it computes in the input's dtype).
SUPPORTED_DTYPES = (torch.float32, torch.float64)
#: What the kernel needs, for error messages.
REQUIREMENT = 'a C++ compiler (the CPU kernel is built on first use) and float32 or float64 inputs'


@functools.lru_cache(maxsize=1)
def kernel_available() -> bool:
    """Build (once per machine and source version) and load the kernel; False, after one
    warning, when it cannot be built."""
    return cpu_build.build_or_warn(SOURCE, BUILD_PREFIX, 'depthwise conv and GELU', 'the plain operators')


def installed() -> bool:
    """Whether the kernel can be built or loaded here (a C++ compiler, or a build made before),
    without building it."""
    return cpu_build.installed(SOURCE, BUILD_PREFIX)


def supports(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the kernel runs on tensors of this device and dtype (building it the first time)."""
    return device.type == 'cpu' and dtype in SUPPORTED_DTYPES and kernel_available()


def _taps(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The conv weight ``(C, 1, K, K)`` as the kernel takes it: ``(K * K, C)``, tap major."""
    return weight.detach().to(dtype).reshape(weight.shape[0], -1).t().contiguous()


def _check(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Raise a clear error for inputs the kernel does not take, or when it is not built."""
    if h.device.type != 'cpu' or h.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f'The CPU depthwise conv and GELU kernel takes CPU tensors of {SUPPORTED_DTYPES}, got '
                        f'{h.dtype} on {h.device}')
    side = weight.shape[-1]
    if h.dim() != 4 or tuple(weight.shape) != (h.shape[-1], 1, side, side) or side % 2 == 0 \
            or tuple(bias.shape) != (h.shape[-1], ):
        raise ValueError(f'Expected h (B, H, W, C), weight (C, 1, K, K) with K odd and bias (C, ), got '
                         f'{tuple(h.shape)}, {tuple(weight.shape)} and {tuple(bias.shape)}')
    if not kernel_available():
        raise RuntimeError('The CPU depthwise conv and GELU kernel is not available (see the warning given when it '
                           'failed to build)')


def activation(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``gelu(h + dwconv(h))`` in a new tensor, outside autograd (the weights are cast to
    ``h``'s dtype).

    Args:
        h (Tensor): ``(B, H, W, C)``, float32 or float64, on CPU.
        weight (Tensor): ``(C, 1, K, K)``, ``K`` odd.
        bias (Tensor): ``(C, )``.
    """
    _check(h, weight, bias)
    return torch.ops.mmdat_dwconv_gelu_cpu.forward(h.detach().contiguous(), _taps(weight, h.dtype),
                                                   bias.detach().to(h.dtype).contiguous())


def activation_backward(grad: torch.Tensor, h: torch.Tensor, weight: torch.Tensor,
                        bias: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of :func:`activation` for ``h``, ``weight`` and ``bias`` (in ``h``'s
    dtype), given the gradient of its output, ``grad``, which is overwritten (it must be a
    contiguous tensor the caller no longer needs)."""
    _check(h, weight, bias)
    grad_h, grad_taps, grad_bias = torch.ops.mmdat_dwconv_gelu_cpu.backward(
        grad, h.detach().contiguous(), _taps(weight, h.dtype), bias.detach().to(h.dtype).contiguous())
    return grad_h, grad_taps.t().reshape(weight.shape), grad_bias


class CPUDWConvGELUFunction(torch.autograd.Function):
    """Autograd function of :func:`op`."""

    @staticmethod
    def forward(ctx, h, weight, bias):
        ctx.save_for_backward(h, weight, bias)
        return activation(h, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        h, weight, bias = ctx.saved_tensors
        grad_h, grad_weight, grad_bias = activation_backward(grad_out.to(h.dtype).contiguous().clone(), h, weight,
                                                             bias)
        return grad_h, grad_weight.to(weight.dtype), grad_bias.to(bias.dtype)


def op(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """:func:`~mmdat.models.layers.attention_math.reference_dwconv_gelu` through the kernel,
    with gradients for ``h``, ``weight`` and ``bias``."""
    return CPUDWConvGELUFunction.apply(h, weight, bias)
