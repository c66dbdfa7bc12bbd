"""The attention-implementation policy of every attention layer, and the shared attention math.

One vocabulary (:data:`ATTN_IMPLS`), one check at construction (:func:`check_attn_impl`), one
resolver per call (:func:`resolve_attn_impl`) and one rule for what a backbone's ``attn_impl``
gives each block (:func:`block_attn_impl`). Each layer declares the values it supports in a
``SUPPORTED_IMPLS`` class attribute. Adding a path means adding its name here, its availability
to :func:`kernel_available` and its rule to :func:`resolve_attn_impl`.

The math shared by the model, the recorder (:mod:`mmdat.models.utils.recording`) and the tests
is written once here: the attention probabilities (:func:`attention_probabilities`) and the
deformable position bias (:func:`sampled_position_bias`).
"""
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .tracing import is_exporting

#: Attention implementations a user may ask for:
#:
#: - ``'sdpa'``: :func:`F.scaled_dot_product_attention` with the bias as ``attn_mask``;
#: - ``'reference'``: the same computation spelt out with matmuls and softmax;
#: - ``'fused'``: deformable blocks sample the position bias inside a kernel and store no
#:   ``N x N`` tensor (Triton on CUDA, a C++ kernel on CPU); blocks without such a kernel run
#:   ``'sdpa'`` when a backbone is asked for it;
#: - ``'natten'``: neighborhood blocks run natten's kernels (others ``'sdpa'`` in a backbone);
#: - ``'auto'``: per call, what :func:`resolve_attn_impl` finds fastest for the input.
ATTN_IMPLS = ('auto', 'sdpa', 'reference', 'fused', 'natten')

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

#: Added to the scores of keys a query must not see. A large finite value rather than ``-inf``
#: so that a query whose keys are all masked (a padded query, cropped later) gets a finite
#: uniform softmax instead of NaN; it is also the value of the official shifted-window mask.
MASK_VALUE = -100.0

#: What :func:`biased_attention` (a materialised bias) supports.
BIASED_IMPLS = ('auto', 'sdpa', 'reference')


def natten_installed() -> bool:
    """Whether a compatible natten is installed (imported lazily: natten is optional)."""
    from .neighborhood_attention import natten_available
    return natten_available()


def kernel_available(name: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the kernels of path ``name`` (``'fused'`` or ``'natten'``) run on tensors of this
    device and dtype here. ``'fused'``: Triton on CUDA (or on CPU under Triton's interpreter),
    the C++ kernel on CPU (float32/float64; built on first use)."""
    if name == 'natten':
        return natten_installed()
    if name != 'fused':
        return True
    from .fused_deformable_attention import fused_available
    return (device.type == 'cpu' and cpu_kernel_ready(dtype)) or fused_available(device, dtype)


def check_attn_impl(attn_impl: str, supported: Sequence[str] = ATTN_IMPLS,
                    layer: str = 'this layer') -> str:
    """Validate ``attn_impl`` at construction: a known value, supported by the layer, and for
    ``'natten'`` installed. ``'auto'`` is kept: it is resolved per call (:func:`resolve_attn_impl`).

    Args:
        attn_impl (str): The value asked for.
        supported (Sequence[str]): The layer's ``SUPPORTED_IMPLS``.
        layer (str): The layer's name, for the error message.
    """
    if attn_impl not in ATTN_IMPLS:
        raise ValueError(f'attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}')
    if attn_impl not in supported:
        raise ValueError(f'{layer} supports attn_impl {tuple(supported)}, got {attn_impl!r}')
    if attn_impl == 'natten' and not natten_installed():
        raise RuntimeError("attn_impl='natten' needs a compatible natten package "
                           '(natten2dqkrpb/natten2dav or na2d_qk with rpb)')
    return attn_impl


def resolve_attn_impl(attn_impl: str, supported: Sequence[str], device: torch.device,
                      dtype: torch.dtype, num_keys: int, bias_grad: bool,
                      row_queries: int = 1) -> str:
    """The path one call runs: ``'sdpa'``, ``'reference'``, ``'fused'`` or ``'natten'``.

    An explicit value is returned as it is (checked against ``supported``). ``'auto'`` picks:

    1. ``'fused'`` where the layer has it and a kernel runs here: on CUDA (Triton), and on CPU
       (the C++ kernel) from :data:`CPU_KERNEL_MIN_ROW_SCORES` scores per query row
       (``row_queries * num_keys``), where it was measured faster;
    2. otherwise ``'reference'`` on CPU with fewer than :data:`CPU_SDPA_MIN_KEYS` keys or with
       a bias that needs a gradient (there the matmuls are faster: for such a bias SDPA falls
       back on CPU to its own math path, the same matmuls with more overhead);
    3. otherwise ``'sdpa'``.

    ``'natten'`` is never picked per call: a backbone picks it at construction
    (:func:`block_attn_impl`), where it knows whether checkpointing is on.

    While a model is exported (:func:`~mmdat.models.layers.tracing.is_exporting`: ONNX,
    TorchScript tracing, torch.export), no kernel is picked: ``'fused'`` gives ``'sdpa'`` and
    ``'auto'`` skips step 1. The exporters can record only standard operators, and the graph
    must serve every size, not only those where the kernel was chosen. Under ``torch.compile``
    ``'auto'`` does not pick the C++ kernel either: the compiler cannot trace into it (it has no
    fake-tensor implementation), so it compiles the materialised bias instead.

    Args:
        attn_impl (str): The layer's ``attn_impl``.
        supported (Sequence[str]): The layer's ``SUPPORTED_IMPLS``.
        device (torch.device): Device of the queries.
        dtype (torch.dtype): Dtype of the queries.
        num_keys (int): Keys per query.
        bias_grad (bool): Whether the bias needs a gradient in this call.
        row_queries (int): Queries per row of the query grid (the width of the attended map):
            the C++ kernel's unit of work is one row against all keys. Only layers supporting
            ``'fused'`` need to pass it.
    """
    if attn_impl not in supported or attn_impl not in ATTN_IMPLS:
        raise ValueError(f'attn_impl must be one of {tuple(supported)}, got {attn_impl!r}')
    exporting = is_exporting()
    if exporting and attn_impl == 'fused':
        return 'sdpa'
    if attn_impl != 'auto':
        return attn_impl
    if 'fused' in supported and not exporting:
        if device.type == 'cuda' and kernel_available('fused', device, dtype):
            return 'fused'
        if (device.type == 'cpu' and not torch.compiler.is_compiling()
                and row_queries * num_keys >= CPU_KERNEL_MIN_ROW_SCORES and cpu_kernel_ready(dtype)):
            return 'fused'
    if device.type == 'cpu' and (num_keys < CPU_SDPA_MIN_KEYS or bias_grad):
        return 'reference'
    return 'sdpa'


def cpu_kernel_ready(dtype: torch.dtype) -> bool:
    """Whether the C++ kernel of ``'fused'`` on CPU takes ``dtype`` and builds here (Triton's CPU
    interpreter, the other way to run ``'fused'`` on CPU, is for tests: far slower)."""
    from .cpu_deformable_attention import SUPPORTED_DTYPES, cpu_kernel_available
    return dtype in SUPPORTED_DTYPES and cpu_kernel_available()


def block_attn_impl(attn_impl: str, supported: Sequence[str], with_cp: bool = False) -> str:
    """What a block supporting ``supported`` runs when its backbone is asked for ``attn_impl``.

    The same value when the block supports it, except that ``'auto'`` gives neighborhood blocks
    (those supporting ``'natten'``) natten's kernels when natten is installed and ``with_cp`` is
    off (natten 0.14's backward reads its saved tensors twice, which non-reentrant checkpointing
    refuses). A kernel the block lacks (``'fused'``, ``'natten'``) gives ``'sdpa'``.
    """
    if attn_impl not in ATTN_IMPLS:
        raise ValueError(f'attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}')
    if attn_impl == 'auto' and 'natten' in supported:
        return 'natten' if not with_cp and natten_installed() else 'auto'
    return attn_impl if attn_impl in supported else 'sdpa'


def attention_probabilities(query: torch.Tensor, key: torch.Tensor,
                            bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d) + bias)`` over the keys: ``(..., Nq, Nk)``."""
    scores = (query * query.shape[-1]**-0.5) @ key.transpose(-2, -1)
    if bias is not None:
        scores = scores + bias
    return scores.softmax(dim=-1)


def biased_attention(query: torch.Tensor,
                     key: torch.Tensor,
                     value: torch.Tensor,
                     bias: Optional[torch.Tensor],
                     attn_impl: str = 'sdpa') -> torch.Tensor:
    """Softmax attention ``softmax(q k^T / sqrt(d) + bias) v`` with a materialised bias.

    Args:
        query (Tensor): ``(..., num_heads, num_queries, head_dims)``.
        key (Tensor): ``(..., num_heads, num_keys, head_dims)``.
        value (Tensor): ``(..., num_heads, num_keys, head_dims)``.
        bias (Tensor, optional): Additive bias broadcastable to
            ``(..., num_heads, num_queries, num_keys)``.
        attn_impl (str): ``'sdpa'`` runs :func:`F.scaled_dot_product_attention` with the bias as
            ``attn_mask``; ``'reference'`` spells the same computation out
            (:func:`attention_probabilities`); ``'auto'`` is resolved by
            :func:`resolve_attn_impl`.

    Returns:
        Tensor: ``(..., num_heads, num_queries, head_dims)``.
    """
    bias_grad = bias is not None and bias.requires_grad
    attn_impl = resolve_attn_impl(attn_impl, BIASED_IMPLS, query.device, query.dtype,
                                  key.shape[-2], bias_grad)
    if attn_impl == 'sdpa':
        if bias is not None:
            # SDPA requires a float mask in the query's dtype (e.g. under autocast).
            bias = bias.to(query.dtype)
        return F.scaled_dot_product_attention(query, key, value, attn_mask=bias)
    return attention_probabilities(query, key, bias).to(value.dtype) @ value


def sampled_position_bias(queries: torch.Tensor, positions: torch.Tensor, table: torch.Tensor,
                          batch: int) -> torch.Tensor:
    """Deformable relative position bias of each head for every (query, key): ``(B, heads, Nq, Nk)``.

    For head ``h`` of offset group ``g = h // (heads / groups)``: the bilinear sample of
    ``table[h]`` (``align_corners=True``, zero outside) at half the normalised displacement
    ``query - key``. The sampling grid is one broadcast subtraction of the halved, ``(x, y)``-
    ordered query and key points (halving is exact, so this is bitwise ``((q - k) / 2)`` flipped,
    without an ``Nq x Nk`` flip and multiply).

    Args:
        queries (Tensor): Query points ``(..., 2)`` as normalised ``(y, x)``, ``Nq`` of them.
        positions (Tensor): Key positions ``(B * groups, ..., 2)``, ``Nk`` per group.
        table (Tensor): ``(heads, Th, Tw)``.
        batch (int): ``B``.
    """
    num_heads = table.shape[0]
    num_groups = positions.shape[0] // batch
    query_xy = (queries.reshape(1, -1, 1, 2) * 0.5).flip(-1)
    key_xy = (positions.reshape(positions.shape[0], 1, -1, 2) * 0.5).flip(-1)
    grid = query_xy.to(key_xy.dtype) - key_xy
    grouped = table.to(grid.dtype).expand(batch, -1, -1, -1)
    grouped = grouped.reshape(batch * num_groups, num_heads // num_groups, *table.shape[1:])
    bias = F.grid_sample(grouped, grid, mode='bilinear', padding_mode='zeros', align_corners=True)
    return bias.view(batch, num_heads, query_xy.shape[1], -1)
