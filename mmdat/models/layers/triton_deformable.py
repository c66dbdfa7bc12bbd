"""Fused deformable attention (Triton): the sampled position bias without an N x N tensor.

DAT's deformable attention adds to every (query, key) score of head ``h`` a bias read from a
small per-head table by bilinear sampling at half the normalised displacement between the
query's reference point and the key's sampled position (``F.grid_sample``, ``align_corners=True``,
zero padding). The plain path materialises that bias and the attention matrix, both
``(B, heads, Nq, Nk)``. The kernels here compute the bias on the fly inside a flash-attention
loop (online softmax over key tiles), so forward and backward memory grow linearly with the
number of tokens. Backward recomputes the probabilities from the saved log-sum-exp and gives
gradients for the queries, keys, values, the key positions and the table.

The kernels run on CUDA tensors, or on CPU tensors through Triton's interpreter, which Triton
chooses when it is imported (``TRITON_INTERPRET=1`` then; the tests run the kernels on CPU in
a process of their own with it). They are defined on first use (:func:`kernels`), so importing
this module compiles nothing. This module imports without Triton; :data:`TRITON_AVAILABLE`
says whether the kernels exist. The kernel interface of :mod:`mmdat.models.layers.policy`:
:func:`installed`, :func:`supports` and :func:`op`.
"""
import functools
import types
from typing import Tuple

import torch

from .attention_math import check_deformable_inputs

try:
    import triton
    import triton.language as tl
except ImportError:  # the model works without Triton, through the SDPA and reference paths
    triton = None

#: Whether Triton is importable, i.e. whether the fused path can run at all.
TRITON_AVAILABLE = triton is not None
#: Input dtypes the kernels take; accumulation is always in float32.
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: What the kernels need, for error messages.
REQUIREMENT = 'Triton (pip install triton) and CUDA tensors of float16, bfloat16 or float32'


def interpreter_enabled() -> bool:
    """Whether Triton's CPU interpreter is on: ``TRITON_INTERPRET=1``, now and when Triton was
    imported (its own functions, such as ``tl.zeros``, are interpreted only then). Then the
    kernels are defined for it and take CPU tensors."""
    return (TRITON_AVAILABLE and bool(triton.knobs.runtime.interpret)
            and not isinstance(tl.zeros, triton.runtime.JITFunction))


def installed() -> bool:
    """Whether Triton is importable."""
    return TRITON_AVAILABLE


def supports(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the kernels can run on tensors of this device and dtype."""
    if not TRITON_AVAILABLE or dtype not in SUPPORTED_DTYPES:
        return False
    return device.type == 'cuda' or (device.type == 'cpu' and interpreter_enabled())


if TRITON_AVAILABLE:
    # Plain functions, decorated with triton.jit by kernels() on first use.

    def _dot(a, b, PRECISION: tl.constexpr):
        """``tl.dot`` with float32 accumulation; ``'upcast'`` multiplies in float32."""
        if PRECISION == 'upcast':
            result = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision='ieee')
        else:
            result = tl.dot(a, b, input_precision=PRECISION)
        return result

    def _load_rows(base, offs, stride, offs_d, mask, mask_d):
        """Rows ``offs`` of a ``(N, head_dims)`` matrix with row stride ``stride`` (zero outside)."""
        return tl.load(base + offs[:, None] * stride + offs_d[None, :], mask=mask[:, None] & mask_d[None, :],
                       other=0.0)

    def _load_points(base, offs, mask):
        """The ``(y, x)`` of points ``offs`` of an ``(N, 2)`` array, as float32."""
        y = tl.load(base + offs * 2, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(base + offs * 2 + 1, mask=mask, other=0.0).to(tl.float32)
        return y, x

    def _program_head(NUM_HEADS, HEADS_PER_GROUP, NUM_GROUPS):
        """The ``(batch * heads + head)``, batch, head and offset group (of the whole batch)
        of this program (grid axis 1)."""
        batch_head = tl.program_id(1)
        batch = batch_head // NUM_HEADS
        head = batch_head % NUM_HEADS
        return batch_head, batch, head, batch * NUM_GROUPS + head // HEADS_PER_GROUP

    def _bilinear(table, ref_y, ref_x, pos_y, pos_x, TABLE_H, TABLE_W):
        """The bias of every (query, key) pair of a tile, sampled as ``grid_sample`` samples it,
        with what backward needs: the corner weights, indices and masks and the four values.

        The sampling point is ``(ref - pos) * 0.5`` in normalised coordinates;
        ``align_corners=True`` maps ``[-1, 1]`` onto ``[0, size - 1]``. Clamping to
        ``[-2, size + 1]`` changes neither values nor gradients (all four corners are outside
        the table beyond ``-1`` and ``size``) but keeps the integer conversion in range.
        """
        iy = (((ref_y[:, None] - pos_y[None, :]) * 0.5 + 1.0) * 0.5) * (TABLE_H - 1)
        ix = (((ref_x[:, None] - pos_x[None, :]) * 0.5 + 1.0) * 0.5) * (TABLE_W - 1)
        iy = tl.minimum(tl.maximum(iy, -2.0), TABLE_H + 1.0)
        ix = tl.minimum(tl.maximum(ix, -2.0), TABLE_W + 1.0)
        y0f = tl.floor(iy)
        x0f = tl.floor(ix)
        y0 = y0f.to(tl.int32)
        x0 = x0f.to(tl.int32)
        in_y0 = (y0 >= 0) & (y0 < TABLE_H)
        in_y1 = (y0 + 1 >= 0) & (y0 + 1 < TABLE_H)
        in_x0 = (x0 >= 0) & (x0 < TABLE_W)
        in_x1 = (x0 + 1 >= 0) & (x0 + 1 < TABLE_W)
        v00 = tl.load(table + y0 * TABLE_W + x0, mask=in_y0 & in_x0, other=0.0).to(tl.float32)
        v01 = tl.load(table + y0 * TABLE_W + x0 + 1, mask=in_y0 & in_x1, other=0.0).to(tl.float32)
        v10 = tl.load(table + (y0 + 1) * TABLE_W + x0, mask=in_y1 & in_x0, other=0.0).to(tl.float32)
        v11 = tl.load(table + (y0 + 1) * TABLE_W + x0 + 1, mask=in_y1 & in_x1, other=0.0).to(tl.float32)
        wy1 = iy - y0f
        wx1 = ix - x0f
        wy0 = 1.0 - wy1
        wx0 = 1.0 - wx1
        bias = wy0 * (wx0 * v00 + wx1 * v01) + wy1 * (wx0 * v10 + wx1 * v11)
        return bias, wy0, wy1, wx0, wx1, y0, x0, in_y0, in_y1, in_x0, in_x1, v00, v01, v10, v11

    def _query_tile(Q, REF, TABLE, K, V, POS, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh,
                    stride_vb, stride_vh, NUM_HEADS, HEADS_PER_GROUP, NUM_GROUPS, NUM_QUERIES, NUM_KEYS,
                    HEAD_DIMS, TABLE_H, TABLE_W, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        """What a program over one query tile (grid axis 0) against all keys starts from: its
        indices and masks, queries and reference points, and where its head's keys, values,
        positions and table are."""
        batch_head, batch, head, group = _program_head(NUM_HEADS, HEADS_PER_GROUP, NUM_GROUPS)
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask_m = offs_m < NUM_QUERIES
        mask_d = offs_d < HEAD_DIMS
        q = _load_rows(Q + batch * stride_qb + head * stride_qh, offs_m, stride_qn, offs_d, mask_m, mask_d)
        ref_y, ref_x = _load_points(REF, offs_m, mask_m)
        return (batch_head, batch, head, offs_m, offs_d, mask_m, mask_d, q, ref_y, ref_x,
                TABLE + head * TABLE_H * TABLE_W, K + batch * stride_kb + head * stride_kh,
                V + batch * stride_vb + head * stride_vh, POS + group * NUM_KEYS * 2)

    def _key_tile_scores(q, ref_y, ref_x, k_base, v_base, pos_base, table, start_n, stride_kn, stride_vn,
                         offs_d, mask_d, NUM_KEYS, TABLE_H, TABLE_W, scale, BLOCK_N: tl.constexpr,
                         PRECISION: tl.constexpr):
        """The keys, values and biased scores of the key tile from ``start_n``."""
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < NUM_KEYS
        k = _load_rows(k_base, offs_n, stride_kn, offs_d, mask_n, mask_d)
        v = _load_rows(v_base, offs_n, stride_vn, offs_d, mask_n, mask_d)
        pos_y, pos_x = _load_points(pos_base, offs_n, mask_n)
        bias = _bilinear(table, ref_y, ref_x, pos_y, pos_x, TABLE_H, TABLE_W)[0]
        return mask_n, k, v, _dot(q, tl.trans(k), PRECISION) * scale + bias

    def _forward_kernel(Q, K, V, REF, POS, TABLE, OUT, LSE,
                        stride_qb, stride_qh, stride_qn,
                        stride_kb, stride_kh, stride_kn,
                        stride_vb, stride_vh, stride_vn,
                        stride_ob, stride_oh, stride_on,
                        NUM_HEADS, HEADS_PER_GROUP, NUM_GROUPS, NUM_QUERIES, NUM_KEYS, HEAD_DIMS,
                        TABLE_H, TABLE_W, scale,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        PRECISION: tl.constexpr):
        (batch_head, batch, head, offs_m, offs_d, mask_m, mask_d, q, ref_y, ref_x, table, k_base, v_base,
         pos_base) = _query_tile(Q, REF, TABLE, K, V, POS, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh,
                                 stride_vb, stride_vh, NUM_HEADS, HEADS_PER_GROUP, NUM_GROUPS, NUM_QUERIES,
                                 NUM_KEYS, HEAD_DIMS, TABLE_H, TABLE_W, BLOCK_M, BLOCK_D)
        row_max = tl.full((BLOCK_M, ), float('-inf'), dtype=tl.float32)
        row_sum = tl.zeros((BLOCK_M, ), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for start_n in range(0, NUM_KEYS, BLOCK_N):
            mask_n, k, v, scores = _key_tile_scores(q, ref_y, ref_x, k_base, v_base, pos_base, table, start_n,
                                                    stride_kn, stride_vn, offs_d, mask_d, NUM_KEYS, TABLE_H,
                                                    TABLE_W, scale, BLOCK_N, PRECISION)
            scores = tl.where(mask_n[None, :], scores, float('-inf'))
            # Every key tile holds at least one real key, so the running max is finite.
            new_max = tl.maximum(row_max, tl.max(scores, 1))
            rescale = tl.exp(row_max - new_max)
            probs = tl.exp(scores - new_max[:, None])
            row_sum = row_sum * rescale + tl.sum(probs, 1)
            acc = acc * rescale[:, None] + _dot(probs.to(v.dtype), v, PRECISION)
            row_max = new_max

        out = acc / row_sum[:, None]
        tl.store(OUT + batch * stride_ob + head * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :],
                 out.to(OUT.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
        tl.store(LSE + batch_head * NUM_QUERIES + offs_m, row_max + tl.log(row_sum), mask=mask_m)

    def _backward_key_kernel(Q, K, V, REF, POS, TABLE, DOUT, LSE, DELTA,
                             DK, DV, DPOS, DTABLE,
                             stride_qb, stride_qh, stride_qn,
                             stride_kb, stride_kh, stride_kn,
                             stride_vb, stride_vh, stride_vn,
                             stride_ob, stride_oh, stride_on,
                             NUM_HEADS, HEADS_PER_GROUP, NUM_GROUPS, NUM_QUERIES, NUM_KEYS, HEAD_DIMS,
                             TABLE_H, TABLE_W, scale,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                             PRECISION: tl.constexpr):
        """One key tile against all queries: dK, dV, d(positions) per head and d(table).

        With ``P = softmax(S)``, ``dS = P * (dO V^T - rowsum(dO * O))``; the bias enters ``S``
        additively, so ``d(bias) = dS``. It reaches the table through the bilinear weights
        (scatter-added into this program's own table slice, reduced outside) and the key
        positions through the derivative of the bilinear sample w.r.t. its coordinates.
        """
        pid_n = tl.program_id(0)
        batch_head, batch, head, group = _program_head(NUM_HEADS, HEADS_PER_GROUP, NUM_GROUPS)

        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        mask_n = offs_n < NUM_KEYS
        mask_d = offs_d < HEAD_DIMS
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = _load_rows(K + batch * stride_kb + head * stride_kh, offs_n, stride_kn, offs_d, mask_n, mask_d)
        v = _load_rows(V + batch * stride_vb + head * stride_vh, offs_n, stride_vn, offs_d, mask_n, mask_d)
        pos_y, pos_x = _load_points(POS + group * NUM_KEYS * 2, offs_n, mask_n)
        table = TABLE + head * TABLE_H * TABLE_W
        dtable = DTABLE + (pid_n * tl.num_programs(1) + batch_head) * TABLE_H * TABLE_W
        q_base = Q + batch * stride_qb + head * stride_qh
        do_base = DOUT + batch * stride_ob + head * stride_oh

        dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        dpos_y = tl.zeros((BLOCK_N, ), dtype=tl.float32)
        dpos_x = tl.zeros((BLOCK_N, ), dtype=tl.float32)
        for start_m in range(0, NUM_QUERIES, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            mask_m = offs_m < NUM_QUERIES
            q = _load_rows(q_base, offs_m, stride_qn, offs_d, mask_m, mask_d)
            do = _load_rows(do_base, offs_m, stride_on, offs_d, mask_m, mask_d)
            ref_y, ref_x = _load_points(REF, offs_m, mask_m)
            lse = tl.load(LSE + batch_head * NUM_QUERIES + offs_m, mask=mask_m, other=0.0)
            delta = tl.load(DELTA + batch_head * NUM_QUERIES + offs_m, mask=mask_m, other=0.0)

            bias, wy0, wy1, wx0, wx1, y0, x0, in_y0, in_y1, in_x0, in_x1, v00, v01, v10, v11 = _bilinear(
                table, ref_y, ref_x, pos_y, pos_x, TABLE_H, TABLE_W)
            scores = _dot(q, tl.trans(k), PRECISION) * scale + bias
            valid = mask_m[:, None] & mask_n[None, :]
            probs = tl.where(valid, tl.exp(scores - lse[:, None]), 0.0)
            dv += _dot(tl.trans(probs.to(do.dtype)), do, PRECISION)
            dprobs = _dot(do, tl.trans(v), PRECISION)
            dscores = probs * (dprobs - delta[:, None])
            dk += _dot(tl.trans(dscores.to(q.dtype)), q, PRECISION)

            # d(bias)/d(iy), d(bias)/d(ix); the chain to the positions is applied once at the end.
            dpos_y += tl.sum(dscores * (wx0 * (v10 - v00) + wx1 * (v11 - v01)), 0)
            dpos_x += tl.sum(dscores * (wy0 * (v01 - v00) + wy1 * (v11 - v10)), 0)
            # Relaxed ordering: the adds are only summed, never read back in this kernel.
            corner = dtable + y0 * TABLE_W + x0
            tl.atomic_add(corner, dscores * wy0 * wx0, mask=valid & in_y0 & in_x0, sem='relaxed')
            tl.atomic_add(corner + 1, dscores * wy0 * wx1, mask=valid & in_y0 & in_x1, sem='relaxed')
            tl.atomic_add(corner + TABLE_W, dscores * wy1 * wx0, mask=valid & in_y1 & in_x0, sem='relaxed')
            tl.atomic_add(corner + TABLE_W + 1, dscores * wy1 * wx1, mask=valid & in_y1 & in_x1, sem='relaxed')

        tl.store(DK + batch_head * NUM_KEYS * HEAD_DIMS + offs_n[:, None] * HEAD_DIMS + offs_d[None, :],
                 (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + batch_head * NUM_KEYS * HEAD_DIMS + offs_n[:, None] * HEAD_DIMS + offs_d[None, :],
                 dv.to(DV.dtype.element_ty), mask=kv_mask)
        # iy = ((ref - pos) / 2 + 1) / 2 * (size - 1), so d(iy)/d(pos) = -(size - 1) / 4.
        dpos = DPOS + batch_head * NUM_KEYS * 2 + offs_n * 2
        tl.store(dpos, dpos_y * (-0.25 * (TABLE_H - 1)), mask=mask_n)
        tl.store(dpos + 1, dpos_x * (-0.25 * (TABLE_W - 1)), mask=mask_n)

    def _backward_query_kernel(Q, K, V, REF, POS, TABLE, DOUT, LSE, DELTA, DQ,
                               stride_qb, stride_qh, stride_qn,
                               stride_kb, stride_kh, stride_kn,
                               stride_vb, stride_vh, stride_vn,
                               stride_ob, stride_oh, stride_on,
                               NUM_HEADS, HEADS_PER_GROUP, NUM_GROUPS, NUM_QUERIES, NUM_KEYS, HEAD_DIMS,
                               TABLE_H, TABLE_W, scale,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                               PRECISION: tl.constexpr):
        """One query tile against all keys: dQ = scale * dS K."""
        (batch_head, batch, head, offs_m, offs_d, mask_m, mask_d, q, ref_y, ref_x, table, k_base, v_base,
         pos_base) = _query_tile(Q, REF, TABLE, K, V, POS, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh,
                                 stride_vb, stride_vh, NUM_HEADS, HEADS_PER_GROUP, NUM_GROUPS, NUM_QUERIES,
                                 NUM_KEYS, HEAD_DIMS, TABLE_H, TABLE_W, BLOCK_M, BLOCK_D)
        do = _load_rows(DOUT + batch * stride_ob + head * stride_oh, offs_m, stride_on, offs_d, mask_m, mask_d)
        lse = tl.load(LSE + batch_head * NUM_QUERIES + offs_m, mask=mask_m, other=0.0)
        delta = tl.load(DELTA + batch_head * NUM_QUERIES + offs_m, mask=mask_m, other=0.0)

        dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for start_n in range(0, NUM_KEYS, BLOCK_N):
            mask_n, k, v, scores = _key_tile_scores(q, ref_y, ref_x, k_base, v_base, pos_base, table, start_n,
                                                    stride_kn, stride_vn, offs_d, mask_d, NUM_KEYS, TABLE_H,
                                                    TABLE_W, scale, BLOCK_N, PRECISION)
            probs = tl.where(mask_n[None, :], tl.exp(scores - lse[:, None]), 0.0)
            dprobs = _dot(do, tl.trans(v), PRECISION)
            dscores = probs * (dprobs - delta[:, None])
            dq += _dot(dscores.to(k.dtype), k, PRECISION)

        tl.store(DQ + batch_head * NUM_QUERIES * HEAD_DIMS + offs_m[:, None] * HEAD_DIMS + offs_d[None, :],
                 (dq * scale).to(DQ.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])

    _JIT_FUNCTIONS = (_dot, _load_rows, _load_points, _program_head, _bilinear, _query_tile, _key_tile_scores,
                      _forward_kernel, _backward_key_kernel, _backward_query_kernel)


def kernels() -> types.SimpleNamespace:
    """The kernels (``_forward_kernel``, ``_backward_key_kernel``, ``_backward_query_kernel``),
    decorated with ``triton.jit`` on first use: for Triton's interpreter where it is on
    (:func:`interpreter_enabled`), compiled for the GPU otherwise."""
    return _jit_kernels(interpreter_enabled())


@functools.lru_cache(maxsize=2)
def _jit_kernels(interpret: bool) -> types.SimpleNamespace:
    """The kernels of one mode, in a namespace of their own: Triton resolves the helpers a
    kernel calls in its globals, and decides at decoration whether it is interpreted."""
    namespace = dict(tl=tl, triton=triton, __name__=__name__)
    for fn in _JIT_FUNCTIONS:
        namespace[fn.__name__] = triton.jit(
            types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__, fn.__closure__))
    return types.SimpleNamespace(**{name: namespace[name] for name in (
        '_forward_kernel', '_backward_key_kernel', '_backward_query_kernel')})


#: Launch options of the kernels (not tuned on a GPU yet). One pipeline stage: with more, Triton
#: also stages the four bias gathers of every tile through shared memory (about 90 KB per program
#: at 64 x 64 tiles with 2 stages, 157 KB with 3, against 24-40 KB with 1, compiled for sm_90),
#: which would leave one or two programs per SM for a kernel that needs many to hide the gathers.
LAUNCH_OPTIONS = dict(num_warps=4, num_stages=1)


def _block_sizes(num_queries: int, num_keys: int, head_dims: int) -> Tuple[int, int, int]:
    """Tile sizes: 64 x 64 on a GPU (16 at least, as ``tl.dot`` needs), smaller for tiny inputs."""
    block_d = max(16, triton.next_power_of_2(head_dims))
    largest = 64 if block_d <= 64 else 32  # keep the register tiles of wide heads in bounds
    block_m = min(largest, max(16, triton.next_power_of_2(num_queries)))
    block_n = min(largest, max(16, triton.next_power_of_2(num_keys)))
    return block_m, block_n, block_d


def _dot_precision(dtype: torch.dtype) -> str:
    """How the kernels multiply: exact float32 for float32 inputs (TF32 would miss the 1e-4
    accuracy of the float32 path), tensor cores for half types. Triton's interpreter multiplies
    bfloat16 wrongly (as of 3.9), so there bfloat16 operands, exact in float32, are upcast."""
    if dtype == torch.float32:
        return 'ieee'
    if dtype == torch.bfloat16 and interpreter_enabled():
        return 'upcast'
    return 'tf32'  # ignored by tl.dot for float16/bfloat16 operands


def _strides(t: torch.Tensor) -> Tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


class FusedDeformableAttentionFunction(torch.autograd.Function):
    """Autograd function of :func:`fused_deformable_attention` (inputs already validated)."""

    @staticmethod
    def forward(ctx, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                reference: torch.Tensor, positions: torch.Tensor,
                table: torch.Tensor) -> torch.Tensor:
        batch, num_heads, num_queries, head_dims = query.shape
        num_keys = key.shape[2]
        num_groups = positions.shape[0] // batch
        reference = reference.contiguous()
        positions = positions.contiguous()
        table = table.contiguous()
        precision = _dot_precision(query.dtype)
        block_m, block_n, block_d = _block_sizes(num_queries, num_keys, head_dims)
        out = torch.empty_like(query, memory_format=torch.contiguous_format)
        lse = torch.empty(batch, num_heads, num_queries, device=query.device, dtype=torch.float32)
        scale = head_dims**-0.5
        grid = (triton.cdiv(num_queries, block_m), batch * num_heads)
        ctx.kernels = kernels()  # backward runs the same mode's kernels
        ctx.kernels._forward_kernel[grid](
            query, key, value, reference, positions, table, out, lse,
            *_strides(query), *_strides(key), *_strides(value), *_strides(out),
            num_heads, num_heads // num_groups, num_groups, num_queries, num_keys, head_dims,
            table.shape[1], table.shape[2], scale,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, PRECISION=precision, **LAUNCH_OPTIONS)
        ctx.save_for_backward(query, key, value, reference, positions, table, out, lse)
        ctx.positions_dtype = positions.dtype
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        query, key, value, reference, positions, table, out, lse = ctx.saved_tensors
        batch, num_heads, num_queries, head_dims = query.shape
        num_keys = key.shape[2]
        num_groups = positions.shape[0] // batch
        table_h, table_w = table.shape[1:]
        grad_out = grad_out.contiguous()
        if grad_out.dtype != out.dtype:
            grad_out = grad_out.to(out.dtype)
        delta = (out.float() * grad_out.float()).sum(-1)  # rowsum(dO * O): (B, heads, Nq)
        precision = _dot_precision(query.dtype)
        block_m, block_n, block_d = _block_sizes(num_queries, num_keys, head_dims)
        scale = head_dims**-0.5
        dq = torch.empty_like(query, memory_format=torch.contiguous_format)
        dk = torch.empty_like(key, memory_format=torch.contiguous_format)
        dv = torch.empty_like(value, memory_format=torch.contiguous_format)
        dpos = torch.empty(batch, num_heads, num_keys, 2, device=query.device, dtype=torch.float32)
        num_key_tiles = triton.cdiv(num_keys, block_n)
        # One table slice per program keeps the atomic adds of different programs apart.
        dtable = torch.zeros(num_key_tiles, batch, num_heads, table_h, table_w, device=query.device,
                             dtype=torch.float32)
        common = (*_strides(query), *_strides(key), *_strides(value), *_strides(grad_out),
                  num_heads, num_heads // num_groups, num_groups, num_queries, num_keys, head_dims,
                  table_h, table_w, scale)
        blocks = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, PRECISION=precision,
                      **LAUNCH_OPTIONS)
        ctx.kernels._backward_key_kernel[(num_key_tiles, batch * num_heads)](
            query, key, value, reference, positions, table, grad_out, lse, delta,
            dk, dv, dpos, dtable, *common, **blocks)
        ctx.kernels._backward_query_kernel[(triton.cdiv(num_queries, block_m), batch * num_heads)](
            query, key, value, reference, positions, table, grad_out, lse, delta, dq,
            *common, **blocks)
        # Heads of one offset group share its positions.
        dpos = dpos.view(batch, num_groups, num_heads // num_groups, num_keys, 2).sum(2)
        dpos = dpos.view(batch * num_groups, num_keys, 2).to(ctx.positions_dtype)
        dtable = dtable.sum(dim=(0, 1)).to(table.dtype)
        return dq, dk, dv, None, dpos, dtable


def _check_inputs(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  reference: torch.Tensor, positions: torch.Tensor, table: torch.Tensor) -> None:
    if not TRITON_AVAILABLE:
        raise RuntimeError("attn_impl='fused' needs Triton (pip install triton); "
                           "use attn_impl='sdpa' or 'auto' without it")
    tensors = dict(query=query, key=key, value=value, reference=reference, positions=positions, table=table)
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f'{name} must be a Tensor, got {type(t).__name__}')
    devices = {t.device for t in tensors.values()}
    if len(devices) != 1:
        raise ValueError(f'All inputs must be on one device, got {sorted(map(str, devices))}')
    if not supports(query.device, torch.float32):
        raise ValueError(f'The fused kernels run on CUDA tensors (or on CPU with TRITON_INTERPRET=1 '
                         f'set), got tensors on {query.device}')
    if query.dtype not in SUPPORTED_DTYPES or key.dtype != query.dtype or value.dtype != query.dtype:
        raise TypeError(f'query, key and value must share one dtype of {SUPPORTED_DTYPES}, got '
                        f'{query.dtype}, {key.dtype}, {value.dtype}')
    for name in ('reference', 'positions', 'table'):
        if not tensors[name].is_floating_point() or tensors[name].dtype == torch.float64:
            raise TypeError(f'{name} must be float16, bfloat16 or float32, got {tensors[name].dtype}')
    check_deformable_inputs(tensors)
    if tuple(reference.shape) != (query.shape[2], 2):
        raise ValueError(f'reference must be (Nq, 2) = ({query.shape[2]}, 2), got {tuple(reference.shape)}')
    if reference.requires_grad:
        raise ValueError('The fused kernels give no gradient for the reference points (a fixed '
                         'grid in DAT); pass a tensor that does not require grad')
    for name in ('query', 'key', 'value'):
        if tensors[name].stride(-1) != 1:
            raise ValueError(f'{name} must have a unit stride in its last dimension')


def fused_deformable_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               reference: torch.Tensor, positions: torch.Tensor,
                               table: torch.Tensor) -> torch.Tensor:
    """Deformable attention with the sampled relative position bias, fused.

    Computes ``softmax(q k^T / sqrt(d) + bias) v`` per head, where for batch ``b``, head ``h``
    of offset group ``g = h // (heads / groups)``, query ``i`` and key ``j``::

        bias = grid_sample(table[h], (reference[i] - positions[b * groups + g, j]) * 0.5,
                           mode='bilinear', padding_mode='zeros', align_corners=True)

    with the points given as normalised ``(y, x)`` (flipped to grid_sample's ``(x, y)``). No
    ``(Nq, Nk)`` tensor is formed in forward or backward. Gradients flow to ``query``, ``key``,
    ``value``, ``positions`` and ``table``; ``reference`` must not require grad.

    Args:
        query (Tensor): ``(B, heads, Nq, head_dims)``, float16, bfloat16 or float32.
        key (Tensor): ``(B, heads, Nk, head_dims)``, the dtype of ``query``.
        value (Tensor): ``(B, heads, Nk, head_dims)``, the dtype of ``query``.
        reference (Tensor): Query reference points ``(Nq, 2)``, normalised ``(y, x)``.
        positions (Tensor): Key positions ``(B * groups, Nk, 2)``, normalised ``(y, x)``.
        table (Tensor): Per-head bias table ``(heads, Th, Tw)``.

    Returns:
        Tensor: ``(B, heads, Nq, head_dims)`` in the dtype of ``query``.
    """
    _check_inputs(query, key, value, reference, positions, table)
    return FusedDeformableAttentionFunction.apply(query, key, value, reference, positions, table)


def op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, queries: torch.Tensor,
       positions: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """:func:`fused_deformable_attention` with the deformable kernels' arguments: ``queries`` the
    ``(H, W, 2)`` grid of query points."""
    return fused_deformable_attention(query, key, value, queries.flatten(0, 1), positions, table)
