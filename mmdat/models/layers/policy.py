"""Which attention implementation each call runs: one table, read by every rule (and which
kernel DAT++'s MLPs run, :func:`mlp_activation_kernel`).

:data:`IMPLEMENTATIONS` names each implementation a user may ask for with ``attn_impl``, the
layers that have it, its kernels (per layer and device, in order of preference), whether they
may run while a model is exported or compiled, and the measured thresholds from which
``'auto'`` picks them. Three rules read it: :func:`check_attn_impl` (at construction),
:func:`resolve_attn_impl` (once per call: the implementation, the kernel and how materialised
scores are combined) and :func:`block_attn_impl` (what a backbone's ``attn_impl`` gives each
block).

Kernels check themselves where they run: the first time a kernel is chosen on a device type
and dtype in a process, :func:`kernel_error` runs it on small inputs against the reference
math (:mod:`mmdat.models.layers.attention_math`), forward and input gradients. A kernel that
raises or disagrees is reported in one warning, and ``'auto'`` leaves it out from then on;
an explicit ``attn_impl`` naming it raises instead. ``MMDAT_SKIP_KERNEL_CHECK=1`` skips the
checks.

Adding a path: a kernel module (``installed()``, ``supports(device, dtype)``, ``op(...)`` with
the signature of its layer's kernels, ``REQUIREMENT``), a :class:`Kernel` and an entry here, and
their tests.
"""
import os
import threading
import warnings
from types import ModuleType
from typing import Dict, NamedTuple, Optional, Tuple

import torch

from . import cpu_deformable, cpu_dwconv_gelu, cpu_neighborhood, natten_kernel, neighborhood_tiles, triton_deformable
from .attention_math import reference_deformable_attention, reference_dwconv_gelu, reference_neighborhood_attention
from .tracing import is_exporting, is_tracing

#: The layers, by what they compute: kernels serve one of them (their ``op`` signature).
WINDOW, NEIGHBORHOOD, DEFORMABLE = 'window', 'neighborhood', 'deformable'
LAYERS = (WINDOW, NEIGHBORHOOD, DEFORMABLE)
#: DAT++'s MLP between its linear layers, ``gelu(h + dwconv(h))``: not an attention layer (no
#: ``attn_impl`` names it), but its kernel is chosen and checked by the same rules.
MLP_ACTIVATION = 'mlp activation'

#: Under ``'auto'`` on CPU, attention over fewer keys than this runs the matmul path: there the
#: window blocks (49 keys) ran 1.13-1.23x faster through matmuls than through SDPA in
#: inference, while the deformable blocks ran 1.2-1.4x faster through SDPA from 196 keys on.
#: Measured with torch 2.13 on 2 cores; see docs/benchmarks.md.
CPU_SDPA_MIN_KEYS = 128

#: Under ``'auto'`` on CPU, deformable attention runs the C++ kernel (when it builds) where each
#: of its tasks, one query row against all keys, computes at least this many scores
#: (``row_queries * num_keys``); below, the kernel's fixed cost per row outweighs the bias it
#: saves. Each deformable block of DAT-T and DAT-T++ at 224, 512 and 384x640, timed alone
#: against the materialised bias (batch 1, 2 threads, in turns): in training 0.96-0.97x as fast
#: at 343 scores a row, 1.02-1.07x at 686-1,372, 1.1-1.2x at 2,744-4,800 and 1.4-4.3x from
#: 8,192; in inference 1.1-1.4x at 343-4,800 and 1.5-3.4x from 8,192 (it also keeps no
#: ``heads x N x N`` tensor for backward); see docs/benchmarks.md.
CPU_KERNEL_MIN_ROW_SCORES = 512

#: Set to ``1`` to skip the kernels' self-checks (:func:`kernel_error`).
SKIP_CHECK_VARIABLE = 'MMDAT_SKIP_KERNEL_CHECK'
#: Largest relative error (norm of the difference over the norm of the reference) a kernel's
#: self-check accepts, per input dtype.
CHECK_TOLERANCES = {torch.float64: 1e-8, torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


class Kernel(NamedTuple):
    """A kernel: a module computing one layer (an attention, or the MLP's activation) on some
    devices.

    Attributes:
        name (str): Its name in warnings and errors.
        module (ModuleType): ``installed()``, ``supports(device, dtype)``, ``op(...)`` and
            ``REQUIREMENT``; ``op`` takes the layer's kernel arguments (deformable: ``query,
            key, value, queries (H, W, 2), positions, table``; neighborhood: ``query, key,
            value, rpb, kernel_size``; MLP activation: ``h, weight, bias``).
        layer (str): The layer it computes (one of :data:`LAYERS`, or :data:`MLP_ACTIVATION`).
        auto_min_row_scores (dict): Device type (``'*'``: any) -> ``'auto'`` picks the kernel
            there from this many scores per query row (``row_queries * num_keys``); not on the
            devices absent.
        compile_safe (bool): ``torch.compile`` can trace it (else compiled code runs without it).
        export_safe (bool): Exporters can record it (else exported graphs run without it).
        checkpoint_safe (bool): Its backward works under non-reentrant checkpointing (else
            ``'auto'`` leaves it out of checkpointed blocks).
        self_check (bool): Native code, built or generated on the user's machine: checked on
            first use (:func:`kernel_error`).
        takes_attention (bool): It materialises scores and takes how to combine them
            (``'sdpa'`` or ``'reference'``) as its last argument.
    """
    name: str
    module: ModuleType
    layer: str
    auto_min_row_scores: Dict[str, int]
    compile_safe: bool = False
    export_safe: bool = False
    checkpoint_safe: bool = True
    self_check: bool = True
    takes_attention: bool = False


class Implementation(NamedTuple):
    """A value of ``attn_impl``.

    Attributes:
        layers (tuple[str]): The layers that have it.
        kernels (tuple[Kernel]): Its kernels, in order of preference; a layer without one, or
            a call where none may run (exporting, compiling), computes the materialised bias.
        attention (str): How the materialised scores are combined (``'sdpa'`` or
            ``'reference'``, see :func:`~mmdat.models.layers.attention_math.biased_attention`).
    """
    layers: Tuple[str, ...]
    kernels: Tuple[Kernel, ...]
    attention: str


CPU_DEFORMABLE = Kernel('C++ deformable attention', cpu_deformable, DEFORMABLE,
                        auto_min_row_scores={'cpu': CPU_KERNEL_MIN_ROW_SCORES})
TRITON_DEFORMABLE = Kernel('Triton deformable attention', triton_deformable, DEFORMABLE,
                           auto_min_row_scores={'cuda': 0}, compile_safe=True)
NATTEN = Kernel('natten neighborhood attention', natten_kernel, NEIGHBORHOOD, auto_min_row_scores={'*': 0},
                checkpoint_safe=False)
NEIGHBORHOOD_TILES = Kernel('neighborhood tiles', neighborhood_tiles, NEIGHBORHOOD, auto_min_row_scores={'*': 0},
                            self_check=False, takes_attention=True)
#: ``'auto'`` runs it on CPU wherever it builds: at every DAT-T++ stage map of 224, 512 and
#: 800x1333 it ran 1.9-5.7x faster than the tiles in inference and 3.2-7.0x in training (op
#: alone, batch 1, one thread, in turns; faster still with two); docs/benchmarks.md.
CPU_NEIGHBORHOOD = Kernel('C++ neighborhood attention', cpu_neighborhood, NEIGHBORHOOD,
                          auto_min_row_scores={'cpu': 0})
#: DAT++'s MLPs run it on CPU wherever it builds: DAT-T++'s whole MLPs (batch 2, 2 threads) ran
#: 1.09-1.21x faster in training at the large maps of 512 and 800x1333, 0.97-1.16x elsewhere,
#: and 0.95-1.13x in inference; the backbone 6% faster in inference at 800x1333
#: (docs/benchmarks.md). No ``attn_impl`` names it, so no ``'auto'`` threshold:
#: :func:`mlp_activation_kernel` is its rule.
CPU_DWCONV_GELU = Kernel('C++ depthwise conv and GELU', cpu_dwconv_gelu, MLP_ACTIVATION, auto_min_row_scores={})
#: The tiles again, for ``'fused'`` neighborhood blocks where the C++ kernel does not take the
#: input (CUDA, half precision): never picked by ``'auto'`` under this name.
FUSED_TILES = NEIGHBORHOOD_TILES._replace(auto_min_row_scores={})

#: Every ``attn_impl`` but ``'auto'``, in the order ``'auto'`` tries their kernels.
IMPLEMENTATIONS: Dict[str, Implementation] = {
    # deformable blocks sample the position bias inside a kernel and store no N x N tensor;
    # neighborhood blocks compute K**2 scores a query on CPU (elsewhere, the tiles through SDPA)
    'fused': Implementation((DEFORMABLE, NEIGHBORHOOD),
                            (CPU_DEFORMABLE, TRITON_DEFORMABLE, CPU_NEIGHBORHOOD, FUSED_TILES), 'sdpa'),
    'natten': Implementation((NEIGHBORHOOD, ), (NATTEN, ), 'sdpa'),
    # scaled_dot_product_attention with the bias as attn_mask; neighborhood blocks by tiles
    'sdpa': Implementation(LAYERS, (NEIGHBORHOOD_TILES, ), 'sdpa'),
    # the same computation spelt out with matmuls and softmax (the tests' oracle)
    'reference': Implementation(LAYERS, (), 'reference'),
}


def attn_impls() -> Tuple[str, ...]:
    """Every value ``attn_impl`` takes: ``'auto'`` and the names of :data:`IMPLEMENTATIONS`."""
    return ('auto', ) + tuple(IMPLEMENTATIONS)


def layer_impls(layer: str) -> Tuple[str, ...]:
    """The ``attn_impl`` values a layer takes."""
    return ('auto', ) + tuple(name for name, impl in IMPLEMENTATIONS.items() if layer in impl.layers)


def _check_name(attn_impl: str) -> Implementation:
    if attn_impl != 'auto' and attn_impl not in IMPLEMENTATIONS:
        raise ValueError(f'attn_impl must be one of {attn_impls()}, got {attn_impl!r}')
    return IMPLEMENTATIONS.get(attn_impl)


def check_attn_impl(attn_impl: str, layer: Optional[str] = None, name: str = 'this layer') -> str:
    """Validate ``attn_impl`` at construction: a known value, one the layer has, and one with a
    kernel installed here if it needs one. ``'auto'`` is kept: it is resolved per call.

    Args:
        attn_impl (str): The value asked for.
        layer (str, optional): The layer kind (one of :data:`LAYERS`); None checks the value only.
        name (str): The layer's name, for the error message.
    """
    impl = _check_name(attn_impl)
    if layer is not None and attn_impl not in layer_impls(layer):
        raise ValueError(f'{name} supports attn_impl {layer_impls(layer)}, got {attn_impl!r}')
    if impl is not None and impl.kernels and not any(k.module.installed() for k in impl.kernels):
        needs = ' or '.join(k.module.REQUIREMENT for k in impl.kernels)
        raise RuntimeError(f'attn_impl={attn_impl!r} needs {needs}')
    return attn_impl


class Resolved(NamedTuple):
    """What one call runs (see :func:`resolve_attn_impl`).

    Attributes:
        name (str): The implementation (a key of :data:`IMPLEMENTATIONS`).
        kernel (Kernel, optional): The kernel, or None for the materialised bias.
        attention (str): How materialised scores are combined: ``'sdpa'`` or ``'reference'``.
    """
    name: str
    kernel: Optional[Kernel]
    attention: str

    def op(self, *args) -> torch.Tensor:
        """Run the kernel on the layer's kernel arguments."""
        if self.kernel.takes_attention:
            return self.kernel.module.op(*args, self.attention)
        return self.kernel.module.op(*args)


def materialised_attention(device: torch.device, num_keys: int, bias_grad: bool) -> str:
    """How ``'auto'`` combines materialised scores: ``'reference'`` (matmuls) on CPU with fewer
    than :data:`CPU_SDPA_MIN_KEYS` keys or with a bias that needs a gradient (for such a bias
    SDPA falls back on CPU to its own math path, the same matmuls with more overhead),
    ``'sdpa'`` otherwise."""
    if device.type == 'cpu' and (num_keys < CPU_SDPA_MIN_KEYS or bias_grad):
        return 'reference'
    return 'sdpa'


def _may_run_now(kernel: Kernel) -> bool:
    """Whether the kernel may run in this call: not while exporting or compiling unless it is
    safe there."""
    if is_exporting():
        return kernel.export_safe
    return kernel.compile_safe or not torch.compiler.is_compiling()


def _auto_picks(kernel: Kernel, device: torch.device, row_queries: int, num_keys: int, checkpointed: bool) -> bool:
    threshold = kernel.auto_min_row_scores.get(device.type, kernel.auto_min_row_scores.get('*'))
    if threshold is None or (checkpointed and not kernel.checkpoint_safe):
        return False
    # no comparison without a threshold: traced sizes would be guarded on
    return threshold == 0 or row_queries * num_keys >= threshold


def resolve_attn_impl(attn_impl: str, layer: str, device: torch.device, dtype: torch.dtype, num_keys: int,
                      bias_grad: bool, row_queries: int = 1, checkpointed: bool = False) -> Resolved:
    """The path one call runs, resolved once: the implementation, its kernel, and how
    materialised scores are combined.

    An explicit value runs its first kernel for the layer that supports the device and dtype
    (after its self-check, which raises on failure); a value without a kernel for the layer,
    or whose kernels may not run in this call (exporting; compiling a kernel the compiler cannot
    trace), computes the materialised bias. ``'auto'`` tries the kernels of
    :data:`IMPLEMENTATIONS` in order, picking the first that the table lets ``'auto'`` pick for
    the device and size, supports the input and passed its self-check; without one, the
    materialised bias (:func:`materialised_attention`).

    While a model is exported no kernel is picked: the exporters record only standard
    operators, and the graph must serve every size, not only those where a kernel was chosen.

    Args:
        attn_impl (str): The layer's ``attn_impl``.
        layer (str): The layer kind (one of :data:`LAYERS`).
        device (torch.device): Device of the queries.
        dtype (torch.dtype): Dtype of the queries.
        num_keys (int): Keys per query of the materialised attention.
        bias_grad (bool): Whether the bias needs a gradient in this call.
        row_queries (int): Queries per row of the query grid (the width of the attended map):
            the CPU kernel's unit of work is one row against all keys.
        checkpointed (bool): Whether the call is recomputed in backward (gradient checkpointing).
    """
    impl = _check_name(attn_impl)
    if attn_impl not in layer_impls(layer):
        raise ValueError(f'attn_impl must be one of {layer_impls(layer)}, got {attn_impl!r}')
    if impl is None:  # 'auto'
        rule = materialised_attention(device, num_keys, bias_grad)
        for name, candidate in IMPLEMENTATIONS.items():
            for kernel in candidate.kernels:
                if (kernel.layer == layer and _may_run_now(kernel)
                        and _auto_picks(kernel, device, row_queries, num_keys, checkpointed)
                        and kernel.module.supports(device, dtype)
                        and kernel_error(kernel, device, dtype) is None):
                    return Resolved(name, kernel, rule)
        return Resolved(rule, None, rule)
    kernels = [kernel for kernel in impl.kernels if kernel.layer == layer]
    runnable = [kernel for kernel in kernels if _may_run_now(kernel)]
    for kernel in runnable:
        if kernel.module.supports(device, dtype):
            error = kernel_error(kernel, device, dtype, warn=False)
            if error is not None:
                raise RuntimeError(f'attn_impl={attn_impl!r}: the {kernel.name} kernel failed its self-check on '
                                   f"{device.type} {_dtype_name(dtype)} ({error}); use attn_impl='auto'")
            return Resolved(attn_impl, kernel, impl.attention)
    if len(runnable) < len(kernels) or not kernels:  # no kernel for the layer, or none now
        return Resolved(attn_impl, None, impl.attention)
    needs = ' or '.join(kernel.module.REQUIREMENT for kernel in kernels)
    raise RuntimeError(f'attn_impl={attn_impl!r} has no kernel for {device.type} {_dtype_name(dtype)} here '
                       f"(it needs {needs}); use attn_impl='auto'")


def runs_on(attn_impl: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``attn_impl`` can run on tensors of this device and dtype here: every layer that
    has it either needs no kernel (``'auto'``; a layer without a kernel computes the
    materialised bias) or has a kernel that supports them."""
    impl = _check_name(attn_impl)
    if impl is None:
        return True
    for layer in impl.layers:
        kernels = [kernel for kernel in impl.kernels if kernel.layer == layer]
        if kernels and not any(kernel.module.supports(device, dtype) for kernel in kernels):
            return False
    return True


def mlp_activation_kernel(device: torch.device, dtype: torch.dtype) -> Optional[Kernel]:
    """The kernel DAT++'s MLP computes ``gelu(h + dwconv(h))`` with on this device and dtype, or
    None for the plain operators: :data:`CPU_DWCONV_GELU` where it supports the input, may run in
    this call (not while exporting or compiling) and passed its self-check."""
    kernel = CPU_DWCONV_GELU
    if _may_run_now(kernel) and kernel.module.supports(device, dtype) and kernel_error(kernel, device, dtype) is None:
        return kernel
    return None


def block_attn_impl(attn_impl: str, layer: str) -> str:
    """What a block of kind ``layer`` runs when its backbone is asked for ``attn_impl``: the same
    value when the layer has it (``'auto'`` always), otherwise the implementation's way of
    combining materialised scores (``'fused'`` and ``'natten'``: ``'sdpa'``)."""
    impl = _check_name(attn_impl)
    if impl is None or layer in impl.layers:
        return attn_impl
    return impl.attention


# --- self-checks -------------------------------------------------------------------------------

#: (kernel name, device type, dtype) -> None (passed) or the error, for this process.
_CHECKED: Dict[Tuple[str, str, torch.dtype], Optional[str]] = {}
#: The failures already reported in a warning.
_WARNED = set()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace('torch.', '')


def kernel_error(kernel: Kernel, device: torch.device, dtype: torch.dtype, warn: bool = True) -> Optional[str]:
    """Why ``kernel`` cannot be trusted on this device type and dtype, or None.

    The first call for each (kernel, device type, dtype) in a process runs the kernel's
    self-check (:func:`run_self_check`); later calls return its result. Not while tracing,
    compiling or exporting (then a kernel not yet checked is trusted), not for kernels of plain
    PyTorch (``self_check=False``) and not with ``MMDAT_SKIP_KERNEL_CHECK=1``.

    Args:
        kernel (Kernel): The kernel.
        device (torch.device): Device of the call.
        dtype (torch.dtype): Dtype of the call.
        warn (bool): Give one warning when the check fails (``'auto'``, which then leaves the
            kernel out); an explicit ``attn_impl`` raises instead.
    """
    if not kernel.self_check or os.environ.get(SKIP_CHECK_VARIABLE) == '1':
        return None
    key = (kernel.name, device.type, dtype)
    if key not in _CHECKED:
        if is_tracing():
            return None
        _CHECKED[key] = _run_in_own_thread(kernel, device, dtype)
    if _CHECKED[key] is not None and warn and key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(f'mmdat: the {kernel.name} kernel failed its self-check on {device.type} '
                      f"{_dtype_name(dtype)} ({_CHECKED[key]}); attn_impl='auto' uses the materialised "
                      f'attention instead in this process (set {SKIP_CHECK_VARIABLE}=1 to skip the check)')
    return _CHECKED[key]


def _run_in_own_thread(kernel: Kernel, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """:func:`run_self_check` in a thread of its own, on the caller's CUDA device.

    Autograd's state is per thread: the check's graph then stays out of the caller's, and out of
    the bookkeeping of an enclosing non-reentrant checkpoint, which counts every tensor saved
    during the forward it recomputes and fails in backward when the recomputation, where the
    check does not run again, saves fewer.
    """
    cuda_index = torch.cuda.current_device() if device.type == 'cuda' else None
    result = []

    def check():
        if cuda_index is not None:
            torch.cuda.set_device(cuda_index)
        result.append(run_self_check(kernel, device, dtype))

    thread = threading.Thread(target=check, name=f'mmdat self-check of {kernel.name}')
    thread.start()
    thread.join()
    return result[0] if result else 'the self-check stopped without a result'


def _check_inputs(layer: str, device: torch.device, dtype: torch.dtype) -> Tuple[tuple, torch.Tensor]:
    """Small inputs of a layer's kernels (a few rows and keys, values near the table's edges
    included) and a gradient for the output, from a fixed seed (the global RNG is untouched)."""
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.rand(*shape, generator=gen, dtype=torch.float64) * 2 - 1

    if layer == DEFORMABLE:
        batch, heads, groups, height, width, keys, dims = 1, 4, 2, 3, 5, 7, 16
        ys = (torch.arange(height, dtype=torch.float64) + 0.5) * (2 / height) - 1
        xs = (torch.arange(width, dtype=torch.float64) + 0.5) * (2 / width) - 1
        queries = torch.stack(torch.meshgrid(ys, xs, indexing='ij'), dim=-1)
        args = (rand(batch, heads, height * width, dims), rand(batch, heads, keys, dims),
                rand(batch, heads, keys, dims), queries, rand(batch * groups, keys, 2) * 1.2, rand(heads, 5, 5))
        grad_out = rand(batch, heads, height * width, dims)
    elif layer == MLP_ACTIVATION:
        batch, height, width, channels = 1, 4, 5, 6
        args = (rand(batch, height, width, channels), rand(channels, 1, 3, 3), rand(channels))
        grad_out = rand(batch, height, width, channels)
    else:
        batch, heads, size, kernel_size, dims = 1, 2, 5, 3, 16
        args = (*(rand(batch, heads, size, size, dims) for _ in range(3)),
                rand(heads, 2 * kernel_size - 1, 2 * kernel_size - 1), kernel_size)
        grad_out = rand(batch, heads, size, size, dims)
    return args, grad_out


#: What the kernels of each layer are checked against.
REFERENCES = {DEFORMABLE: reference_deformable_attention, NEIGHBORHOOD: reference_neighborhood_attention,
              MLP_ACTIVATION: reference_dwconv_gelu}
#: The arguments of a layer's kernels that take gradients.
GRAD_ARGUMENTS = {DEFORMABLE: (0, 1, 2, 4, 5), NEIGHBORHOOD: (0, 1, 2, 3), MLP_ACTIVATION: (0, 1, 2)}


def _outputs_and_grads(fn, args: tuple, grads: Tuple[int, ...], dtype: torch.dtype, device: torch.device,
                       grad_out: torch.Tensor):
    args = [a.to(device, dtype).requires_grad_(i in grads) if isinstance(a, torch.Tensor) else a
            for i, a in enumerate(args)]
    out = fn(*args)
    leaves = [args[i] for i in grads]
    return [out] + list(torch.autograd.grad(out, leaves, grad_out.to(device, out.dtype)))


def run_self_check(kernel: Kernel, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Run ``kernel`` on small inputs of this device and dtype against the reference math in
    float64 (on the same rounded inputs), forward and input gradients; None if every relative
    error is within :data:`CHECK_TOLERANCES`, else the exception or the mismatch, in one line.
    Runs with gradients on, autocast off and its own saved-tensor hooks, whatever the caller's
    modes (e.g. inside ``inference_mode`` or a checkpointed block)."""
    grads = GRAD_ARGUMENTS[kernel.layer]
    op = Resolved('', kernel, 'reference').op
    try:
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False), \
                torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            args, grad_out = _check_inputs(kernel.layer, device, dtype)
            rounded = [a.to(dtype).double() if isinstance(a, torch.Tensor) else a for a in args]
            results = _outputs_and_grads(op, rounded, grads, dtype, device, grad_out)
            expected = _outputs_and_grads(REFERENCES[kernel.layer], rounded, grads, torch.float64, device,
                                          grad_out)
    except Exception as error:  # any failure of the kernel means it cannot be trusted here
        first_line = (str(error).strip().splitlines() or [''])[0]
        return f'{type(error).__name__}: {first_line}'
    names = ['output'] + [f'gradient {i}' for i in grads]
    for name, got, want in zip(names, results, expected):
        error = ((got.double() - want).norm() / want.norm().clamp_min(1e-12)).item()
        if not error <= CHECK_TOLERANCES.get(dtype, 1e-2):  # NaN fails too
            return f'{name}: relative error {error:.2g} > {CHECK_TOLERANCES.get(dtype, 1e-2):.0e}'
    return None
