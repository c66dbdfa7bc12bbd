"""The C++ CPU kernel of attn_impl='fused' against the reference path (the model's own bias and
softmax), and the bias sampling grid against the formula it replaced."""
import pytest
import torch
import torch.nn.functional as F

from mmdat.models.layers import (DeformableAttention, DeformableAttentionPP, cpu_deformable_attention,
                                 cpu_kernel_available, datpp_query_grid, pixel_centre_grid,
                                 sampled_position_bias)
from mmdat.models.layers import cpu_deformable
from mmdat.models.layers.attention_math import reference_deformable_attention

from tests.conftest import kernel_without_avx512, run_without_compiler

needs_kernel = pytest.mark.skipif(not cpu_kernel_available(), reason='the CPU kernel does not build here')
GRAD_NAMES = ('query', 'key', 'value', 'positions', 'table')


def make_inputs(batch, heads, groups, rows, cols, keys, dims, table, dtype=torch.float64, seed=0,
                grid=pixel_centre_grid, spread=1.1):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, rows * cols, dims, generator=g, dtype=dtype)
    k = torch.randn(batch, heads, keys, dims, generator=g, dtype=dtype)
    v = torch.randn(batch, heads, keys, dims, generator=g, dtype=dtype)
    queries = grid(rows, cols, torch.device('cpu'), dtype)
    # some keys outside the map, so part of the displacements leave the table
    positions = (torch.rand(batch * groups, keys, 2, generator=g, dtype=dtype) * 2 - 1) * spread
    table_ = torch.randn(heads, *table, generator=g, dtype=dtype)
    return q, k, v, queries, positions, table_


def run(fn, inputs, dtype, grad_out):
    q, k, v, queries, positions, table = inputs
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v, positions, table)]
    q, k, v, positions, table = leaves
    out = fn(q, k, v, queries.to(dtype), positions, table)
    grads = torch.autograd.grad(out, leaves, grad_out.to(dtype))
    return out, grads


def kernel(q, k, v, queries, positions, table):
    return cpu_deformable_attention(q, k, v, queries[:, 0, 0], queries[0, :, 1], positions, table)


def reference(q, k, v, queries, positions, table):
    return reference_deformable_attention(q, k, v, queries.flatten(0, 1), positions, table)


def relative_error(a, b):
    """Relative error; the absolute one where the expected tensor is zero (one key: no query
    gradient)."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1.0)).item()


# (batch, heads, groups, rows, cols, keys, head dims, table (h, w)): odd sizes, several heads per
# group and one group per head, fewer keys than queries (DAT++) and more.
SHAPES = [(1, 2, 1, 1, 1, 1, 4, (3, 3)), (2, 3, 3, 5, 7, 29, 8, (5, 7)), (2, 4, 2, 9, 4, 13, 16, (9, 5)),
          (1, 6, 3, 6, 11, 66, 32, (27, 27))]


@needs_kernel
@pytest.mark.parametrize('shape', SHAPES)
def test_float32_matches_float64_reference(shape):
    inputs = make_inputs(*shape)
    grad_out = torch.randn(shape[0], shape[1], shape[3] * shape[4], shape[6], dtype=torch.float64)
    out, grads = run(kernel, inputs, torch.float32, grad_out)
    ref_out, ref_grads = run(reference, inputs, torch.float64, grad_out)
    assert out.dtype == torch.float32 and out.shape == ref_out.shape
    assert relative_error(out, ref_out) < 1e-5
    for name, grad, ref_grad in zip(GRAD_NAMES, grads, ref_grads):
        assert ref_grad.abs().sum() > 0 or shape[5] == 1, name
        assert grad.shape == ref_grad.shape and relative_error(grad, ref_grad) < 2e-5, name


# More float32 cases for the kernel's branches: rows of several vectors (37 queries: 3 vectors of
# 16; 120: 8 vectors, split into two register tiles), key blocks with a partial last one (70, 45
# keys against backward's blocks of 32; 300 against forward's blocks of 128, so that its online
# softmax rescales), columns in decreasing order (the x-lerp gradient without runs), and
# table rows wider than two AVX-512 registers: read through a 32-entry window where a vector's
# queries span few table cells (31 columns for 120 queries; 61 for 37, in decreasing order), and
# gathered where they do not (111 columns for 20 queries: the first vector spans 44 cells, the
# second, padded by repeating the last query, 9).
def flipped_grid(rows, cols, device, dtype):
    return pixel_centre_grid(rows, cols, device, dtype).flip(1)


MANY_KEYS = (1, 2, 1, 2, 20, 300, 8, (9, 9))
BRANCH_CASES = [((1, 4, 2, 3, 37, 70, 16, (27, 27)), pixel_centre_grid),
                (MANY_KEYS, pixel_centre_grid),
                ((1, 2, 1, 2, 120, 45, 8, (9, 31)), pixel_centre_grid),
                ((1, 2, 1, 3, 20, 45, 8, (9, 111)), pixel_centre_grid),
                ((1, 2, 1, 3, 37, 45, 8, (9, 61)), flipped_grid),
                ((1, 4, 2, 3, 37, 70, 16, (27, 27)), flipped_grid)]


def assert_float32_matches_reference(shape, grid):
    inputs = make_inputs(*shape, grid=grid)
    grad_out = torch.randn(shape[0], shape[1], shape[3] * shape[4], shape[6], dtype=torch.float64)
    out, grads = run(kernel, inputs, torch.float32, grad_out)
    ref_out, ref_grads = run(reference, inputs, torch.float64, grad_out)
    assert relative_error(out, ref_out) < 1e-5
    for name, grad, ref_grad in zip(GRAD_NAMES, grads, ref_grads):
        assert ref_grad.abs().sum() > 0, name
        assert relative_error(grad, ref_grad) < 2e-5, name


@needs_kernel
@pytest.mark.parametrize('shape,grid', BRANCH_CASES)
def test_float32_branches_match_float64_reference(shape, grid):
    assert_float32_matches_reference(shape, grid)


@pytest.fixture(scope='module')
def kernel_avx2():
    """The kernel as CPUs with AVX2 but no AVX-512 run it: the portable code and the narrower
    register tiles."""
    if not cpu_kernel_available():
        pytest.skip('the CPU kernel does not build here')
    return kernel_without_avx512(cpu_deformable)


@pytest.mark.parametrize('shape,grid', [(shape, pixel_centre_grid) for shape in SHAPES[1:]] + BRANCH_CASES[1:])
def test_build_without_avx512_matches_float64_reference(kernel_avx2, monkeypatch, shape, grid):
    monkeypatch.setattr(torch.ops, 'mmdat_deformable_cpu', kernel_avx2)
    assert_float32_matches_reference(shape, grid)


def assert_float64_matches_reference(inputs, grad_out):
    """The kernel's output and every gradient equal the reference's in float64."""
    out, grads = run(kernel, inputs, torch.float64, grad_out)
    ref_out, ref_grads = run(reference, inputs, torch.float64, grad_out)
    assert relative_error(out, ref_out) < 1e-12
    for name, grad, ref_grad in zip(GRAD_NAMES, grads, ref_grads):
        assert relative_error(grad, ref_grad) < 1e-12, name


@needs_kernel
@pytest.mark.parametrize('shape', SHAPES[1:3] + [MANY_KEYS])
def test_float64_matches_reference_exactly(shape):
    inputs = make_inputs(*shape, grid=datpp_query_grid)
    grad_out = torch.randn(shape[0], shape[1], shape[3] * shape[4], shape[6], dtype=torch.float64)
    assert_float64_matches_reference(inputs, grad_out)


@needs_kernel
def test_heads_as_views_of_the_token_layout():
    """The module's query is a view of (B, Nq, heads, d), as is the gradient reaching backward:
    the kernel reads both in place, and its output and query gradient are laid out alike, so
    that merging the heads is a view."""
    inputs = make_inputs(2, 4, 2, 5, 7, 13, 8, (9, 9))
    query = inputs[0].transpose(1, 2).contiguous().transpose(1, 2)
    grad_out = torch.randn(2, 35, 4, 8, dtype=torch.float64).transpose(1, 2)
    assert not query.is_contiguous() and not grad_out.is_contiguous()
    inputs = (query,) + inputs[1:]
    out, grads = run(kernel, inputs, torch.float64, grad_out)
    ref_out, ref_grads = run(reference, inputs, torch.float64, grad_out)
    assert relative_error(out, ref_out) < 1e-12
    for name, grad, ref_grad in zip(GRAD_NAMES, grads, ref_grads):
        assert relative_error(grad, ref_grad) < 1e-12, name
    assert out.transpose(1, 2).is_contiguous() and grads[0].transpose(1, 2).is_contiguous()


@needs_kernel
def test_gradcheck():
    q, k, v, queries, positions, table = make_inputs(1, 2, 1, 3, 4, 5, 4, (5, 5), spread=0.9)
    leaves = [t.requires_grad_(True) for t in (q, k, v, positions, table)]
    ys, xs = queries[:, 0, 0], queries[0, :, 1]
    assert torch.autograd.gradcheck(lambda q, k, v, p, t: cpu_deformable_attention(q, k, v, ys, xs, p, t),
                                    leaves, eps=1e-6, atol=1e-7)


# (shape, threads): backward cuts batch x heads x rows query rows into one run per thread, and
# the cases put the cuts inside a (batch, head) (3 heads x 5 rows on 2 threads: a cut in head 1),
# several runs through one (batch, head) and a run through two (4 threads on 15 rows: runs of
# 3-4 rows), all runs inside one (batch, head) (9 rows, 4 threads) and more threads than rows.
SPLIT_CASES = [((1, 3, 3, 5, 7, 29, 8, (5, 7)), 2), ((1, 3, 3, 5, 7, 29, 8, (5, 7)), 4),
               ((1, 1, 1, 9, 4, 13, 16, (9, 5)), 4), ((2, 1, 1, 1, 6, 40, 8, (5, 7)), 3)]


@needs_kernel
@pytest.mark.parametrize('shape,count', SPLIT_CASES)
def test_backward_split_over_rows_matches_reference(threads, shape, count):
    inputs = make_inputs(*shape)
    grad_out = torch.randn(shape[0], shape[1], shape[3] * shape[4], shape[6], dtype=torch.float64)
    threads(count)
    assert_float64_matches_reference(inputs, grad_out)


@needs_kernel
@pytest.mark.parametrize('shape,count', SPLIT_CASES)
def test_result_does_not_depend_on_the_thread_count(threads, shape, count):
    """float32: with another thread count only the order of the sums over cut (batch, head)
    changes, so the gradients agree to rounding."""
    inputs = make_inputs(*shape)
    grad_out = torch.randn(shape[0], shape[1], shape[3] * shape[4], shape[6], dtype=torch.float64)
    threads(1)
    out_one, grads_one = run(kernel, inputs, torch.float32, grad_out)
    threads(count)
    out, grads = run(kernel, inputs, torch.float32, grad_out)
    assert torch.equal(out, out_one)  # forward: one task per query row, nothing summed across
    assert torch.equal(grads[0], grads_one[0])  # the query gradient: one task per row too
    for name, grad, grad_one in zip(GRAD_NAMES[1:], grads[1:], grads_one[1:]):
        assert relative_error(grad, grad_one) < 1e-6, name


@needs_kernel
def test_work_split_is_the_kernels():
    """The split the kernel reports (its own functions): a task per query row of each (batch,
    head) in forward; one run per thread, at most one per row, in backward."""
    assert cpu_deformable.work_split(1, 12, 50, 2) == (600, 2)  # DAT-S stage 3 at 800x1333
    assert cpu_deformable.work_split(1, 12, 50, 64) == (600, 64)
    assert cpu_deformable.work_split(2, 3, 5, 1000) == (30, 30)  # no more runs than rows
    assert cpu_deformable.work_split(1, 1, 1, 1) == (1, 1)
    with pytest.raises(ValueError, match='>= 1'):
        cpu_deformable.work_split(1, 12, 50, 0)


@needs_kernel
def test_gradcheck_with_rows_split_across_threads(threads):
    q, k, v, queries, positions, table = make_inputs(1, 2, 1, 3, 4, 5, 4, (5, 5), spread=0.9)
    leaves = [t.requires_grad_(True) for t in (q, k, v, positions, table)]
    ys, xs = queries[:, 0, 0], queries[0, :, 1]
    threads(4)  # 6 rows in runs of 1, 2, 1, 2 rows: both heads cut
    assert torch.autograd.gradcheck(lambda q, k, v, p, t: cpu_deformable_attention(q, k, v, ys, xs, p, t),
                                    leaves, eps=1e-6, atol=1e-7)


@needs_kernel
def test_bilinear_corner_cases_match_grid_sample():
    """Keys exactly on query points: displacements on table nodes and on the table's edges, where
    the bilinear weights and their one-sided derivatives switch (the reference's convention)."""
    inputs = list(make_inputs(1, 2, 1, 3, 3, 9, 8, (5, 5)))
    grid = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, 3, dtype=torch.float64)] * 2, indexing='ij'), -1)
    inputs[3] = grid
    inputs[4] = grid.reshape(1, 9, 2).clone()  # displacements in {-1, -0.5, 0, 0.5, 1}
    grad_out = torch.randn(1, 2, 9, 8, dtype=torch.float64)
    assert_float64_matches_reference(inputs, grad_out)


@needs_kernel
@pytest.mark.parametrize('module_type,size', [(DeformableAttention, (7, 5)), (DeformableAttention, (1, 1)),
                                              (DeformableAttentionPP, (9, 10))])
def test_module_fused_matches_reference(module_type, size):
    torch.manual_seed(0)
    if module_type is DeformableAttention:
        module = DeformableAttention(24, 6, 3, 3, table_size=4, attn_impl='fused')
    else:
        module = DeformableAttentionPP(24, 6, 3, 3, 2, table_size=4, attn_impl='fused')
    torch.nn.init.normal_(module.rpe_table, std=1.0)
    torch.nn.init.normal_(module.offset_net.proj.weight, std=1.0)
    # float64: DAT++ clamps positions onto the map's edge, where displacements fall on table nodes
    # and the one-sided derivative depends on the last bit of the coordinate
    module.double()
    x = torch.randn(2, *size, 24, dtype=torch.float64, requires_grad=True)
    results = {}
    for impl in ('fused', 'reference'):
        module.attn_impl = impl
        out = module(x)
        grads = torch.autograd.grad(out.square().sum(), [x] + list(module.parameters()))
        results[impl] = out, grads
    torch.testing.assert_close(results['fused'][0], results['reference'][0], rtol=1e-10, atol=1e-10)
    for grad, ref_grad in zip(results['fused'][1], results['reference'][1]):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-9)


def test_bad_inputs():
    q, k, v, queries, positions, table = make_inputs(1, 2, 1, 3, 4, 5, 4, (5, 5))
    ys, xs = queries[:, 0, 0], queries[0, :, 1]
    with pytest.raises(TypeError, match='one dtype'):
        cpu_deformable_attention(q.float(), k, v, ys, xs, positions, table)
    with pytest.raises(TypeError, match='takes'):
        cpu_deformable_attention(*(t.bfloat16() for t in (q, k, v, ys, xs, positions, table)))
    with pytest.raises(ValueError, match='len\\(ys\\) \\* len\\(xs\\)'):
        cpu_deformable_attention(q, k, v, ys[:2], xs, positions, table)
    with pytest.raises(ValueError, match='positions must be'):
        cpu_deformable_attention(q, k, v, ys, xs, positions[:, :3], table)
    with pytest.raises(ValueError, match='table must be'):
        cpu_deformable_attention(q, k, v, ys, xs, positions, table[:1])
    with pytest.raises(ValueError, match='no gradient for the query coordinates'):
        cpu_deformable_attention(q, k, v, ys.requires_grad_(True), xs, positions, table)


@pytest.mark.slow
def test_without_a_compiler_the_model_falls_back_with_one_warning(tmp_path):
    """No C++ compiler: one warning line, and 'auto' gives the reference result."""
    code = '\n'.join([
        'import warnings, torch',
        'from mmdat.models.layers import DeformableAttention, cpu_kernel_available',
        'torch.manual_seed(0)',
        "module = DeformableAttention(16, 4, 2, 3, table_size=5, attn_impl='auto')",
        'x = torch.randn(1, 32, 32, 16)',  # 32 x 1,024 scores a row: where 'auto' asks for the kernel
        'with warnings.catch_warnings(record=True) as caught, torch.no_grad():',
        "    warnings.simplefilter('always')",
        '    auto = module(x)',
        '    module(x)',
        'assert not cpu_kernel_available()',
        "assert len(caught) == 1 and 'no C++ compiler' in str(caught[0].message), caught",
        "assert '\\n' not in str(caught[0].message)",
        "module.attn_impl = 'sdpa'",
        'with torch.no_grad():',
        '    assert torch.equal(auto, module(x))',  # the former rule: SDPA
    ])
    run_without_compiler(code, tmp_path)


def test_bias_grid_is_bitwise_the_former_formula():
    """One broadcast subtraction of halved, (x, y)-ordered points gives exactly the bias of the
    former ``grid_sample(table, ((q - k) * 0.5).flip(-1))``."""
    torch.manual_seed(0)
    for grid, keys in ((pixel_centre_grid, (7, 9)), (datpp_query_grid, (3, 4))):
        queries = grid(7, 9, torch.device('cpu'), torch.float32)
        positions = torch.rand(2 * 3, *keys, 2) * 2.2 - 1.1
        table = torch.randn(6, 13, 13)
        batch = 2
        displacement = (queries.view(1, -1, 1, 2) - positions.view(positions.shape[0], 1, -1, 2)) * 0.5
        grouped = table.expand(batch, -1, -1, -1).reshape(batch * 3, 2, 13, 13)
        former = F.grid_sample(grouped, displacement.flip(-1), mode='bilinear', padding_mode='zeros',
                               align_corners=True).view(batch, 6, 63, -1)
        assert torch.equal(sampled_position_bias(queries, positions, table, batch), former)


@needs_kernel
def test_auto_runs_the_kernel_from_enough_scores_per_query_row(monkeypatch):
    calls = []

    def spy(*args):
        calls.append(args[0].shape)
        return cpu_deformable_attention(*args)

    monkeypatch.setattr(cpu_deformable, 'cpu_deformable_attention', spy)
    monkeypatch.setenv('MMDAT_SKIP_KERNEL_CHECK', '1')  # count the model's calls only
    torch.manual_seed(0)
    module = DeformableAttention(16, 4, 2, 3, table_size=5, attn_impl='auto')
    with torch.no_grad():
        module(torch.randn(1, 6, 6, 16))  # 6 x 36 scores a row: the matmuls
        assert calls == []
        out = module(torch.randn(1, 32, 32, 16))  # 32 x 1,024
        assert len(calls) == 1 and out.shape == (1, 32, 32, 16)
    module(torch.randn(1, 16, 32, 16)).sum().backward()  # 32 x 512, in training as well
    assert len(calls) == 2
    # DAT++: fewer keys (one per offset_stride pixels) than queries; what counts is their product
    strided = DeformableAttentionPP(16, 4, 2, 5, 4, table_size=5, attn_impl='auto')
    strided(torch.randn(1, 16, 16, 16)).sum().backward()  # 16 x 16 scores a row
    assert len(calls) == 2
    strided(torch.randn(1, 64, 64, 16)).sum().backward()  # 64 x 256
    assert len(calls) == 3
