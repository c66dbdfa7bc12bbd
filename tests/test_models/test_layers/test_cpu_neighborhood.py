"""The C++ CPU neighborhood attention kernel against the gathered reference (NATTEN 0.14
semantics), and how the attention policy picks it."""
import warnings

import pytest
import torch

from mmdat.models.layers import cpu_neighborhood, neighborhood_attention, policy
from mmdat.models.layers.attention_math import build_neighborhood_indices, reference_neighborhood_attention
from mmdat.models.layers.cpu_neighborhood import (cpu_neighborhood_attention, kernel_available,
                                                  CPUNeighborhoodAttentionFunction)
from mmdat.models.layers.policy import NEIGHBORHOOD, resolve_attn_impl

from tests.conftest import SMALL_ARCHS, kernel_without_avx512, run_without_compiler, small_backbone

pytestmark = pytest.mark.skipif(not kernel_available(), reason='the CPU kernel does not build here')


def make_inputs(batch, heads, height, width, dims, kernel_size, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, height, width, dims, generator=gen, dtype=dtype) for _ in range(3))
    # a bias of the scores' size, so a wrong bias entry shows
    rpb = torch.randn(heads, 2 * kernel_size - 1, 2 * kernel_size - 1, generator=gen, dtype=dtype) * 2
    return q, k, v, rpb


def outputs_and_grads(fn, inputs, kernel_size, grad_out):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves, kernel_size)
    return [out] + list(torch.autograd.grad(out, leaves, grad_out))


def assert_matches_reference(inputs, kernel_size, tol=1e-10):
    grad_out = torch.randn(inputs[0].shape, dtype=inputs[0].dtype, generator=torch.Generator().manual_seed(1))
    got = outputs_and_grads(cpu_neighborhood_attention, inputs, kernel_size, grad_out)
    want = outputs_and_grads(reference_neighborhood_attention, [t.double() for t in inputs], kernel_size,
                             grad_out.double())
    for name, a, b in zip(('output', 'dq', 'dk', 'dv', 'drpb'), got, want):
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol, msg=lambda m: f'{name}: {m}')


# (batch, heads, H, W, d, K): maps of exactly the kernel (one neighborhood for all), a single row
# of neighborhoods (H = K), maps narrower than 2K - 1 (every query border-shifted), non-square,
# sides that are multiples of nothing, kernels 3-13, batch > 1, several heads, head dims of one
# and several register chunks and none, rows of one to three vectors of 16 queries (the middle
# one of 40 without border queries)
SHAPES = [(1, 1, 3, 3, 4, 3), (1, 2, 3, 11, 8, 3), (2, 3, 5, 7, 16, 5), (1, 2, 7, 13, 32, 7),
          (1, 2, 9, 9, 5, 9), (2, 1, 11, 8, 3, 7), (1, 4, 23, 17, 32, 7), (1, 2, 13, 30, 12, 5),
          (3, 2, 10, 9, 1, 9), (1, 1, 8, 40, 40, 7), (1, 1, 14, 13, 4, 13)]


@pytest.mark.parametrize('shape', SHAPES)
def test_float64_forward_and_gradients_match_reference(shape):
    *sizes, kernel_size = shape
    assert_matches_reference(make_inputs(*sizes, kernel_size), kernel_size)


@pytest.mark.parametrize('shape', [(1, 2, 7, 13, 32, 7), (2, 3, 9, 11, 16, 5)])
def test_float32_matches_float64_reference(shape):
    *sizes, kernel_size = shape
    assert_matches_reference(make_inputs(*sizes, kernel_size, dtype=torch.float32), kernel_size, tol=2e-5)


@pytest.fixture(scope='module')
def kernel_avx2():
    """The kernel as CPUs with AVX2 but no AVX-512 run it: 16-lane vectors in two registers each,
    the portable exp."""
    return kernel_without_avx512(cpu_neighborhood)


@pytest.mark.parametrize('shape,dtype,tol', [(SHAPES[2], torch.float64, 1e-10), (SHAPES[6], torch.float64, 1e-10),
                                             (SHAPES[9], torch.float32, 2e-5), (SHAPES[10], torch.float32, 2e-5)])
def test_build_without_avx512_matches_reference(kernel_avx2, monkeypatch, shape, dtype, tol):
    monkeypatch.setattr(torch.ops, 'mmdat_neighborhood_cpu', kernel_avx2)
    *sizes, kernel_size = shape
    assert_matches_reference(make_inputs(*sizes, kernel_size, dtype=dtype), kernel_size, tol=tol)


def test_views_as_the_module_passes_them():
    """query, key and value are strided views of one qkv tensor in the module."""
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 9, 12, 3, 2, 8, dtype=torch.float64, generator=gen)
    q, k, v = qkv.permute(3, 0, 4, 1, 2, 5).unbind(0)
    rpb = torch.randn(2, 9, 9, dtype=torch.float64, generator=gen)
    assert_matches_reference((q, k, v, rpb), 5)


def test_one_and_two_threads_give_identical_results(threads):
    inputs = make_inputs(2, 3, 11, 14, 16, 7, dtype=torch.float32)
    grad_out = torch.randn(inputs[0].shape)
    results = []
    for count in (1, 2):
        threads(count)
        results.append(outputs_and_grads(cpu_neighborhood_attention, inputs, 7, grad_out))
    for one, two in zip(*results):
        assert torch.equal(one, two)


def reference_log_sum_exp(q, k, rpb, kernel_size):
    """Each query's log-sum-exp of its K*K scaled, biased scores, spelt out: (B, heads, H, W)."""
    height, width = q.shape[2:4]
    rows, row_bias = build_neighborhood_indices(height, kernel_size, q.device)
    cols, col_bias = build_neighborhood_indices(width, kernel_size, q.device)
    keys = k[:, :, rows[:, None, :, None], cols[None, :, None, :]]  # B, heads, H, W, K, K, d
    scores = torch.einsum('bhijd,bhijacd->bhijac', q, keys) / q.shape[-1]**0.5
    scores = scores + rpb[:, row_bias[:, None, :, None], col_bias[None, :, None, :]]
    return scores.flatten(-2).logsumexp(-1)


def test_keeps_the_inputs_and_each_querys_log_sum_exp_for_backward():
    """Saved for backward: q, k and v as given (views of one qkv tensor, not copies), the bias
    table and one log-sum-exp a query; no log-sum-exp without gradients."""
    qkv = torch.randn(1, 9, 10, 3, 2, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    qkv.requires_grad_()
    q, k, v = qkv.permute(3, 0, 4, 1, 2, 5).unbind(0)
    rpb = torch.randn(2, 9, 9, dtype=torch.float64, requires_grad=True)
    out = cpu_neighborhood_attention(q, k, v, rpb, 5)
    saved = out.grad_fn.saved_tensors
    for got, given in zip(saved[:3], (q, k, v)):
        assert got.data_ptr() == given.data_ptr() and got.stride() == given.stride()
    assert saved[3].shape == rpb.shape
    torch.testing.assert_close(saved[4], reference_log_sum_exp(q, k, rpb, 5))
    # laid out (B, H, W, heads, d): the module merges the heads without a copy
    assert out.permute(0, 2, 3, 1, 4).is_contiguous()
    with torch.no_grad():
        assert torch.equal(cpu_neighborhood_attention(q, k, v, rpb, 5), out.detach())
        assert torch.ops.mmdat_neighborhood_cpu.forward(q, k, v, rpb, 5, False)[1].numel() == 0


def test_checkpointed_gradients_match():
    """Recomputed in backward (a block with with_cp): the same gradients."""
    inputs = [t.requires_grad_() for t in make_inputs(1, 2, 8, 9, 8, 3)]
    grad_out = torch.randn(inputs[0].shape, dtype=torch.float64)
    plain = torch.autograd.grad(cpu_neighborhood_attention(*inputs, 3), inputs, grad_out)
    out = torch.utils.checkpoint.checkpoint(cpu_neighborhood_attention, *inputs, 3, use_reentrant=False)
    for got, want in zip(torch.autograd.grad(out, inputs, grad_out), plain):
        assert torch.equal(got, want)


def test_bad_inputs():
    q, k, v, rpb = make_inputs(1, 2, 7, 8, 4, 3)
    with pytest.raises(ValueError, match=r'kernel_size in \(3, 5, 7, 9, 11, 13\), got 4'):
        cpu_neighborhood_attention(q, k, v, torch.randn(2, 7, 7, dtype=torch.float64), 4)
    with pytest.raises(ValueError, match='got 15'):
        cpu_neighborhood_attention(q, k, v, rpb, 15)
    with pytest.raises(TypeError, match='one dtype of'):
        cpu_neighborhood_attention(q.float(), k, v, rpb, 3)
    with pytest.raises(TypeError, match='got query torch.bfloat16'):
        cpu_neighborhood_attention(*(t.bfloat16() for t in (q, k, v, rpb)), 3)
    with pytest.raises(TypeError, match='on meta'):
        cpu_neighborhood_attention(q, k, v.to('meta'), rpb, 3)
    with pytest.raises(ValueError, match='of one shape'):
        cpu_neighborhood_attention(q, k[..., :7, :], v, rpb, 3)
    with pytest.raises(ValueError, match=r'\(B, heads, H, W, d\)'):
        cpu_neighborhood_attention(q[0], k[0], v[0], rpb, 3)
    with pytest.raises(ValueError, match='at least kernel_size=9 a side, got 7x8'):
        cpu_neighborhood_attention(q, k, v, torch.randn(2, 17, 17, dtype=torch.float64), 9)
    with pytest.raises(ValueError, match=r'rpb must be .* = \(2, 5, 5\), got \(2, 7, 7\)'):
        cpu_neighborhood_attention(q, k, v, torch.randn(2, 7, 7, dtype=torch.float64), 3)


def test_auto_and_fused_pick_the_kernel_on_cpu_and_the_tiles_otherwise(monkeypatch):
    cpu = torch.device('cpu')
    for dtype in (torch.float32, torch.float64):
        for impl in ('auto', 'fused'):
            for bias_grad in (False, True):
                choice = resolve_attn_impl(impl, NEIGHBORHOOD, cpu, dtype, 196, bias_grad, checkpointed=bias_grad)
                assert choice.kernel is policy.CPU_NEIGHBORHOOD, (impl, dtype)
    # a dtype the kernel does not take: the tiles, as before the kernel
    assert resolve_attn_impl('auto', NEIGHBORHOOD, cpu, torch.bfloat16, 196, False).kernel is policy.NEIGHBORHOOD_TILES
    fused = resolve_attn_impl('fused', NEIGHBORHOOD, cpu, torch.bfloat16, 196, False)
    assert fused.kernel.module is policy.NEIGHBORHOOD_TILES.module and fused.attention == 'sdpa'
    # exporting: no kernel, the gathered reference
    monkeypatch.setattr(policy, 'is_exporting', lambda: True)
    assert resolve_attn_impl('fused', NEIGHBORHOOD, cpu, torch.float32, 196, False).kernel is None


def test_auto_falls_back_to_the_tiles_when_the_kernel_fails_its_self_check(monkeypatch):
    """A kernel with a wrong backward (dk doubled): one warning, then the tiles; 'fused' raises."""
    real = torch.ops.mmdat_neighborhood_cpu.backward

    class Broken:
        forward = torch.ops.mmdat_neighborhood_cpu.forward

        @staticmethod
        def backward(*args):
            dq, dk, dv, drpb = real(*args)
            return dq, dk * 2, dv, drpb

    monkeypatch.setattr(torch.ops, 'mmdat_neighborhood_cpu', Broken)
    monkeypatch.setattr(policy, '_CHECKED', {})
    monkeypatch.setattr(policy, '_WARNED', set())
    cpu = torch.device('cpu')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        choice = resolve_attn_impl('auto', NEIGHBORHOOD, cpu, torch.float32, 196, False)
    assert choice.kernel is policy.NEIGHBORHOOD_TILES
    assert len(caught) == 1 and 'C++ neighborhood attention kernel failed its self-check' in str(caught[0].message)
    assert 'gradient 1' in str(caught[0].message)
    with pytest.raises(RuntimeError, match="attn_impl='fused': the C\\+\\+ neighborhood attention kernel failed"):
        resolve_attn_impl('fused', NEIGHBORHOOD, cpu, torch.float32, 196, False)


def test_the_self_check_passes():
    for dtype in (torch.float32, torch.float64):
        assert policy.run_self_check(policy.CPU_NEIGHBORHOOD, torch.device('cpu'), dtype) is None


def count_kernel_calls(monkeypatch) -> list:
    """A list that grows by one at each call of the kernel; no self-check calls it."""
    monkeypatch.setenv(policy.SKIP_CHECK_VARIABLE, '1')
    calls = []
    real = CPUNeighborhoodAttentionFunction.apply
    monkeypatch.setattr(CPUNeighborhoodAttentionFunction, 'apply', lambda *args: calls.append(1) or real(*args))
    return calls


def test_neighborhood_attention_runs_the_kernel(monkeypatch):
    calls = count_kernel_calls(monkeypatch)
    q, k, v, rpb = make_inputs(1, 2, 7, 9, 8, 5)
    torch.testing.assert_close(neighborhood_attention(q, k, v, rpb, 5, 'auto'),
                               reference_neighborhood_attention(q, k, v, rpb, 5), rtol=1e-10, atol=1e-10)
    assert calls == [1]


@pytest.mark.slow
def test_dat_pp_backbone_with_the_kernel_matches_the_reference_path(monkeypatch):
    """A small DAT++ (neighborhood blocks on 16x16, 8x8 and 4x4 maps, the last padded to the
    kernel) in float64: outputs and every parameter's gradient, 'fused' against 'reference'."""
    calls = count_kernel_calls(monkeypatch)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    results = {}
    for impl in ('fused', 'reference'):
        model = small_backbone(2, SMALL_ARCHS[2], attn_impl=impl).double()
        outs = model(x)
        loss = sum((out * torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(i))).sum()
                   for i, out in enumerate(outs))
        results[impl] = outs, torch.autograd.grad(loss, list(model.parameters()))
    assert len(calls) == 3  # one per neighborhood block
    for got, want in zip(results['fused'][0], results['reference'][0]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for got, want in zip(results['fused'][1], results['reference'][1]):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.slow
def test_without_a_compiler_the_tiles_run_after_one_warning(tmp_path):
    """No C++ compiler (and no build cached): one warning line, and 'auto' gives the tiles'
    result (through matmuls: 99 halo keys, where 'sdpa' runs SDPA)."""
    code = '\n'.join([
        'import warnings, torch',
        'from mmdat.models.layers import NeighborhoodAttention, cpu_neighborhood',
        'torch.manual_seed(0)',
        "module = NeighborhoodAttention(16, 2, 5, attn_impl='auto')",
        'x = torch.randn(1, 9, 11, 16)',
        'with warnings.catch_warnings(record=True) as caught, torch.no_grad():',
        "    warnings.simplefilter('always')",
        '    auto = module(x)',
        '    module(x)',
        'assert not cpu_neighborhood.kernel_available()',
        "assert len(caught) == 1 and 'no C++ compiler' in str(caught[0].message), caught",
        "assert 'neighborhood attention on CPU uses the tiles' in str(caught[0].message), caught",
        "module.attn_impl = 'sdpa'",
        'with torch.no_grad():',
        '    torch.testing.assert_close(auto, module(x), rtol=1e-5, atol=1e-6)',
    ])
    run_without_compiler(code, tmp_path)
