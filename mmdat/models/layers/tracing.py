"""Shape arithmetic that TorchScript tracing, torch.export and torch.compile follow.

When a model is traced or compiled, sizes read from ``tensor.shape`` are not plain ints: 0-dim
tensors under TorchScript tracing (``torch.onnx.export(dynamo=False)``), ``SymInt`` under
torch.export and dynamic torch.compile. Python branches on them and caches keyed by them bake
the first input size into the graph, so layers ask :func:`is_tracing` and then build their
masks and index tables from the sizes, uncached and without branching on them
(:func:`eager_cache`).
"""
import functools
from typing import Callable, Optional

import torch


def is_tracing() -> bool:
    """Whether the forward pass is being traced, exported or compiled rather than run eagerly."""
    return is_exporting() or torch.compiler.is_compiling()


def is_exporting() -> bool:
    """Whether the forward pass is being exported (ONNX, TorchScript tracing, torch.export):
    there only standard operators can be recorded, not mmdat's kernels."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting()


def eager_cache(maxsize: int, traced: Optional[Callable] = None) -> Callable[[Callable], Callable]:
    """Cache a builder of index tables or masks for eager calls, keyed by its arguments.

    The cached tensors are built outside ``inference_mode`` (so that they also serve calls that
    record gradients) and must not be modified by callers. While tracing or compiling
    (:func:`is_tracing`) nothing is cached and ``traced`` (by default the builder itself) is
    called instead: a cache keyed by traced sizes would bake them into the graph.

    Args:
        maxsize (int): Entries kept (least recently used first out).
        traced (Callable, optional): What traced calls run instead, with the same arguments.
    """

    def decorate(build: Callable) -> Callable:

        @functools.lru_cache(maxsize=maxsize)
        def cached(*args):
            with torch.inference_mode(False):
                return build(*args)

        @functools.wraps(build)
        def call(*args):
            return (traced or build)(*args) if is_tracing() else cached(*args)

        call.cache_clear, call.cache_info = cached.cache_clear, cached.cache_info
        return call

    return decorate


def pad_to_multiple(size, multiple: int):
    """Padding that brings ``size`` up to a multiple of ``multiple``: ``ceil(size / m) * m - size``.

    Works on ints, traced 0-dim tensors and ``SymInt``. Floor division rather than
    ``-size % multiple``: inductor fails to recompile for a new size on ``%`` of a symbolic
    size (``TensorReferenceAnalysis`` has no ``python_mod``, torch 2.13).
    """
    return (size + multiple - 1) // multiple * multiple - size


def clamp_size_min(size, low: int):
    """``max(size, low)`` for an int, a traced 0-dim tensor (TorchScript) or a ``SymInt``.

    The builtin ``max`` would turn a traced size into a constant.
    """
    if isinstance(size, torch.Tensor):
        return size.clamp(min=low)
    return torch.sym_max(size, low)


def copy_view(tensor: torch.Tensor, *shape) -> torch.Tensor:
    """``tensor.reshape(*shape)`` through a contiguous copy, with explicit sizes (no ``-1``).

    ``reshape`` of a permuted tensor decides between a view and a copy from its strides, and
    with symbolic sizes torch.export then guards on sizes being 1 (or records a view that the
    ONNX decomposition of SDPA, with other strides, cannot apply). A copy is always valid; where
    the tensor is permuted, ``reshape`` copied in eager mode anyway.
    """
    return tensor.clone(memory_format=torch.contiguous_format).view(*shape)
