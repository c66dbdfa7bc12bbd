"""The blocks' MLP, which keeps one hidden tensor for backward instead of two or three.

DAT's MLP is ``fc2(gelu(fc1(x)))``; DAT++'s inserts a residual 3x3 depthwise conv,
``fc2(gelu(h + dwconv(h)))`` with ``h = fc1(x)``. Plain autograd keeps every hidden tensor
(4x the block's channels each) for backward: ``h``, the GELU's output (``fc2``'s input) and,
in DAT++, the GELU's input (the conv's sum). In training the MLPs then keep more than half of
what a DAT++ backbone stores (docs/benchmarks.md). :class:`MLP` keeps ``h`` alone and recomputes
the conv and GELU from it in backward: the cheap, memory-bound operators, never the matmuls.
Outputs and gradients are those of the plain operators, in the same dtypes (the same operators
run, except DAT++'s conv, sum and GELU on CPU, which run in one kernel where it builds:
:mod:`~mmdat.models.layers.cpu_dwconv_gelu`).
"""
from types import ModuleType
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention_math import depthwise_conv
from .policy import mlp_activation_kernel
from .tracing import is_tracing


def _preactivation(h: torch.Tensor, dwconv_weight: Optional[torch.Tensor],
                   dwconv_bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The GELU's input: ``h``, or ``h + dwconv3x3(h)`` in a new tensor (the conv's output)."""
    if dwconv_weight is None:
        return h
    # the conv's parameters are cast to h's dtype: what autocast does in forward, and what
    # backward, outside autocast, must repeat
    hidden = depthwise_conv(h, dwconv_weight, dwconv_bias)
    hidden += h
    return hidden


def _activation(h: torch.Tensor, dwconv_weight: Optional[torch.Tensor], dwconv_bias: Optional[torch.Tensor],
                reuse_h: bool = False, kernel: Optional[ModuleType] = None) -> torch.Tensor:
    """``gelu(h)``, or ``gelu(h + dwconv3x3(h))``, for ``h`` of shape ``(B, H, W, C)``.

    ``kernel`` (the module of :func:`~mmdat.models.layers.policy.mlp_activation_kernel`'s
    kernel, for calls autograd does not record) computes the conv, sum and GELU in one pass.
    Otherwise, where autograd does not record the call, the sum and the GELU run in place in one
    new tensor (the conv's output), or in ``h`` itself with ``reuse_h`` and no conv: on CPU every
    new tensor of this size costs page faults as well as the pass over it.
    """
    if kernel is not None:
        return kernel.activation(h, dwconv_weight, dwconv_bias)
    hidden = _preactivation(h, dwconv_weight, dwconv_bias)
    if (hidden is h and not reuse_h) or (torch.is_grad_enabled() and hidden.requires_grad):
        return F.gelu(hidden)
    return torch.ops.aten.gelu_(hidden)


class _RecomputedActivationLinear(torch.autograd.Function):
    """``F.linear(_activation(h, ...), weight, bias)``, keeping only ``h`` (and the weights).

    Backward recomputes the activation from ``h`` and runs the operators autograd would run for
    the GELU, the conv and the linear layer, in place where it can; with ``kernel`` (see
    :func:`_activation`), the kernel's forward and backward instead of the conv and GELU.
    """

    @staticmethod
    def forward(ctx, h, dwconv_weight, dwconv_bias, weight, bias, kernel):
        out = F.linear(_activation(h, dwconv_weight, dwconv_bias, kernel=kernel), weight, bias)
        ctx.save_for_backward(h, dwconv_weight, dwconv_bias, weight)
        ctx.bias_dtype = bias.dtype
        ctx.kernel = kernel
        return out

    @staticmethod
    def backward(ctx, grad_out):
        h, dwconv_weight, dwconv_bias, weight = ctx.saved_tensors
        needs_h, needs_dw_weight, needs_dw_bias, needs_weight, needs_bias = ctx.needs_input_grad[:5]
        if torch.is_grad_enabled():  # create_graph=True: a backward that can be differentiated again
            return _RecomputedActivationLinear.differentiable_backward(ctx, grad_out)
        kernel = ctx.kernel if grad_out.dtype == h.dtype else None
        if kernel is not None:
            hidden, activated = None, kernel.activation(h, dwconv_weight, dwconv_bias)
        else:
            hidden = _preactivation(h, dwconv_weight, dwconv_bias)
            activated = F.gelu(hidden)
        # forward's linear ran in grad_out's dtype (autocast casts its inputs to it)
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
        grad_weight = grad_bias = None
        if needs_weight:
            activated_2d = activated.reshape(-1, activated.shape[-1]).to(grad_out.dtype)
            grad_weight = (grad_2d.t() @ activated_2d).to(weight.dtype)
        if needs_bias:
            grad_bias = grad_2d.sum(0).to(ctx.bias_dtype)
        if not (needs_h or needs_dw_weight or needs_dw_bias):
            return None, None, None, grad_weight, grad_bias, None
        # the activation's gradient overwrites the activation, no longer needed
        if activated.dtype == grad_out.dtype:
            grad_activated = torch.matmul(grad_2d, weight.to(grad_out.dtype),
                                          out=activated.view(-1, activated.shape[-1])).view(activated.shape)
        else:
            grad_activated = (grad_out @ weight.to(grad_out.dtype)).to(activated.dtype)
        if kernel is not None:
            grad_h, grad_dw_weight, grad_dw_bias = kernel.activation_backward(grad_activated, h, dwconv_weight,
                                                                              dwconv_bias)
            return (grad_h, grad_dw_weight.to(dwconv_weight.dtype), grad_dw_bias.to(dwconv_bias.dtype), grad_weight,
                    grad_bias, None)
        grad_hidden = torch.ops.aten.gelu_backward.grad_input(grad_activated, hidden, grad_input=activated)
        del grad_activated, hidden
        if dwconv_weight is None:
            return grad_hidden, None, None, grad_weight, grad_bias, None
        channels = h.shape[-1]
        grad_h, grad_dw_weight, grad_dw_bias = torch.ops.aten.convolution_backward(
            grad_hidden.permute(0, 3, 1, 2), h.permute(0, 3, 1, 2), dwconv_weight.to(h.dtype), [channels],
            [1, 1], [dwconv_weight.shape[-1] // 2] * 2, [1, 1], False, [0, 0], channels,
            [needs_h, needs_dw_weight, needs_dw_bias])
        if needs_h:
            grad_h = grad_h.permute(0, 2, 3, 1)
            grad_h += grad_hidden  # the residual path
        return (grad_h, None if grad_dw_weight is None else grad_dw_weight.to(dwconv_weight.dtype),
                None if grad_dw_bias is None else grad_dw_bias.to(dwconv_bias.dtype), grad_weight, grad_bias, None)

    @staticmethod
    def differentiable_backward(ctx, grad_out):
        """Backward through autograd on the recomputed operators (for higher derivatives)."""
        inputs = ctx.saved_tensors
        with torch.enable_grad():
            activated = _activation(*inputs[:3]).to(grad_out.dtype)
            out = F.linear(activated, inputs[3].to(grad_out.dtype))
        wanted = [t for t, needs in zip(inputs, ctx.needs_input_grad) if needs]
        found = iter(torch.autograd.grad(out, wanted, grad_out, create_graph=True))
        grads = [next(found) if needs else None for needs in ctx.needs_input_grad[:4]]
        grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0) if ctx.needs_input_grad[4] else None
        return (*grads, grad_bias, None)


class MLP(nn.Module):
    """Two linear layers with GELU between, on channels-last maps ``(B, H, W, C)``.

    With ``dwconv=True`` (DAT++) the hidden map goes through a residual 3x3 depthwise conv
    before the GELU; on CPU a C++ kernel computes the conv, the sum and the GELU in one pass
    where it builds and passed its self-check (:func:`~mmdat.models.layers.policy.
    mlp_activation_kernel`). When gradients are recorded (eager mode), only the first layer's
    output is kept for backward (see the module's docstring); while tracing, the plain operators
    run.

    Args:
        embed_dims (int): Input and output channels.
        hidden_dims (int): Channels of the hidden layer.
        dwconv (bool): Add the residual depthwise conv of DAT++.
    """

    def __init__(self, embed_dims: int, hidden_dims: int, dwconv: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(embed_dims, hidden_dims)
        self.dwconv = nn.Conv2d(hidden_dims, hidden_dims, 3, 1, 1, groups=hidden_dims) if dwconv else None
        self.fc2 = nn.Linear(hidden_dims, embed_dims)

    def _dwconv_params(self) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        return (self.dwconv.weight, self.dwconv.bias) if self.dwconv is not None else (None, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x (Tensor): ``(B, H, W, C)``. Returns: Tensor ``(B, H, W, C)``."""
        h = self.fc1(x)
        if is_tracing():  # exporters and compilers record the plain operators
            return self.fc2(_activation(h, *self._dwconv_params()))
        found = mlp_activation_kernel(h.device, h.dtype) if self.dwconv is not None else None
        return self.from_hidden(h, found.module if found is not None else None)

    def from_hidden(self, h: torch.Tensor, kernel: Optional[ModuleType]) -> torch.Tensor:
        """The MLP after its first linear layer, in eager mode: what :meth:`forward` runs with
        the kernel :func:`~mmdat.models.layers.policy.mlp_activation_kernel` picks, and what the
        benchmark times with and without it.

        Args:
            h (Tensor): ``fc1``'s output, ``(B, H, W, hidden_dims)``.
            kernel (ModuleType, optional): The module of the kernel for DAT++'s conv and GELU
                (:mod:`~mmdat.models.layers.cpu_dwconv_gelu`), or None for the plain operators.
        """
        if kernel is not None and self.dwconv is None:
            raise ValueError('kernel applies to the MLP of DAT++ (dwconv=True) only')
        if torch.is_grad_enabled():
            return _RecomputedActivationLinear.apply(h, *self._dwconv_params(), self.fc2.weight, self.fc2.bias, kernel)
        return self.fc2(_activation(h, *self._dwconv_params(), reuse_h=True, kernel=kernel))
