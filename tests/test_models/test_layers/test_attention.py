import pytest
import torch

from mmdat.models.layers import (DeformableAttention, DeformableAttentionPP, NeighborhoodAttention,
                                 WindowAttention, biased_attention, block_attn_impl, check_attn_impl,
                                 cpu_kernel_available, natten_available, resolve_attn_impl)
from mmdat.models.layers import attention as attention_module
from mmdat.models.layers.attention import CPU_KERNEL_MIN_ROW_SCORES, CPU_SDPA_MIN_KEYS


@pytest.mark.parametrize('dtype,tol', [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_sdpa_and_reference_agree_forward_and_backward(dtype, tol):
    torch.manual_seed(0)
    shape = (2, 5, 3, 17, 8)  # batch, windows, heads, tokens, head dims
    inputs = [torch.randn(shape, dtype=dtype, requires_grad=True) for _ in range(3)]
    bias = torch.randn(5, 3, 17, 17, dtype=dtype, requires_grad=True)  # broadcast over batch
    results = {}
    for impl in ('sdpa', 'reference'):
        out = biased_attention(*inputs, bias, impl)
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, 8, dtype=dtype)).sum(), inputs + [bias])
        results[impl] = (out, grads)
    out_s, grads_s = results['sdpa']
    out_r, grads_r = results['reference']
    assert torch.allclose(out_s, out_r, atol=tol, rtol=tol)
    for g_s, g_r in zip(grads_s, grads_r):
        assert g_s.abs().sum() > 0
        assert torch.allclose(g_s, g_r, atol=tol, rtol=tol)


def test_bias_changes_the_result():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 4) for _ in range(3))
    for impl in ('sdpa', 'reference'):
        plain = biased_attention(q, k, v, None, impl)
        biased = biased_attention(q, k, v, torch.randn(2, 6, 6) * 3, impl)
        assert not torch.allclose(plain, biased, atol=1e-3)
        expected = torch.softmax(q @ k.transpose(-1, -2) / 2, -1) @ v
        assert torch.allclose(plain, expected, atol=1e-6)


def test_sdpa_casts_a_float32_bias_to_the_query_dtype():
    q, k, v = (torch.randn(1, 2, 6, 4, dtype=torch.bfloat16) for _ in range(3))
    out = biased_attention(q, k, v, torch.randn(2, 6, 6), 'sdpa')
    assert out.dtype == torch.bfloat16


def test_check_attn_impl():
    for impl in ('auto', 'sdpa', 'reference', 'fused'):
        assert check_attn_impl(impl) == impl  # 'auto' is resolved per call, from the input
    with pytest.raises(ValueError, match='attn_impl must be one of'):
        check_attn_impl('flash')
    with pytest.raises(ValueError, match=r"WindowAttention supports attn_impl \('auto', 'sdpa', 'reference'\), got 'fused'"):
        check_attn_impl('fused', ('auto', 'sdpa', 'reference'), 'WindowAttention')
    with pytest.raises(ValueError, match='attn_impl must be one of'):
        biased_attention(*(torch.randn(1, 1, 2, 2) for _ in range(3)), None, 'flash')
    with pytest.raises(ValueError, match='attn_impl must be one of'):
        biased_attention(*(torch.randn(1, 1, 2, 2) for _ in range(3)), None, 'fused')  # no kernel


@pytest.mark.skipif(natten_available(), reason='natten is installed')
def test_natten_is_checked_at_construction():
    with pytest.raises(RuntimeError, match='needs a compatible natten'):
        check_attn_impl('natten')


def test_every_layer_validates_at_construction():
    """One vocabulary, checked when the layer is built (not at its first call)."""
    layers = [lambda impl: WindowAttention(8, 2, 3, attn_impl=impl),
              lambda impl: NeighborhoodAttention(8, 2, 3, attn_impl=impl),
              lambda impl: DeformableAttention(8, 2, 1, 3, 4, attn_impl=impl),
              lambda impl: DeformableAttentionPP(8, 2, 1, 3, 1, 4, attn_impl=impl)]
    for make in layers:
        assert make('auto').attn_impl == 'auto'
        with pytest.raises(ValueError, match='attn_impl must be one of'):
            make('bogus')
    with pytest.raises(ValueError, match="WindowAttention supports attn_impl .* got 'fused'"):
        layers[0]('fused')
    with pytest.raises(ValueError, match="DeformableAttention supports attn_impl .* got 'natten'"):
        layers[2]('natten')
    assert layers[3]('fused').attn_impl == 'fused'  # DAT++ deformable blocks take the kernels too


def test_block_attn_impl():
    window, deformable = WindowAttention.SUPPORTED_IMPLS, DeformableAttention.SUPPORTED_IMPLS
    assert block_attn_impl('fused', window) == 'sdpa'  # a kernel the block lacks
    assert block_attn_impl('fused', deformable) == 'fused'
    assert block_attn_impl('auto', window) == 'auto'
    assert block_attn_impl('natten', deformable) == 'sdpa'
    expected = 'natten' if natten_available() else 'auto'
    assert block_attn_impl('auto', NeighborhoodAttention.SUPPORTED_IMPLS) == expected
    assert block_attn_impl('auto', NeighborhoodAttention.SUPPORTED_IMPLS, with_cp=True) == 'auto'
    with pytest.raises(ValueError, match='attn_impl must be one of'):
        block_attn_impl('bogus', window)


@pytest.mark.parametrize('device,dtype,num_keys,row_queries,bias_grad,expected', [
    # the kernel from CPU_KERNEL_MIN_ROW_SCORES scores per query row, in inference and training
    ('cpu', torch.float32, 256, CPU_KERNEL_MIN_ROW_SCORES // 256, False, 'fused'),
    ('cpu', torch.float32, 256, CPU_KERNEL_MIN_ROW_SCORES // 256, True, 'fused'),
    ('cpu', torch.float64, 4200, 84, True, 'fused'),
    ('cpu', torch.float32, 256, CPU_KERNEL_MIN_ROW_SCORES // 256 - 1, False, 'sdpa'),
    ('cpu', torch.float32, 256, CPU_KERNEL_MIN_ROW_SCORES // 256 - 1, True, 'reference'),
    ('cpu', torch.float32, 256, 1, False, 'sdpa'),  # more keys than the rule, but one query a row
    ('cpu', torch.float32, 49, 7, False, 'reference'),
    ('cpu', torch.bfloat16, 4200, 84, False, 'sdpa'),  # no CPU kernel for bf16
    ('cpu', torch.bfloat16, 4200, 84, True, 'reference'),
    ('meta', torch.float32, 49, 7, True, 'sdpa'),
])
def test_resolver_for_deformable_attention(device, dtype, num_keys, row_queries, bias_grad, expected):
    if expected == 'fused' and not cpu_kernel_available():
        pytest.skip('the CPU kernel does not build here')
    supported = DeformableAttention.SUPPORTED_IMPLS
    device = torch.device(device)
    assert resolve_attn_impl('auto', supported, device, dtype, num_keys, bias_grad, row_queries) == expected
    for impl in ('sdpa', 'reference', 'fused'):  # explicit values are kept
        assert resolve_attn_impl(impl, supported, device, dtype, num_keys, bias_grad, row_queries) == impl


def test_resolver_without_the_cpu_kernel(monkeypatch):
    """A machine where the kernel does not build: 'auto' falls back to the materialised bias."""
    monkeypatch.setattr(attention_module, 'cpu_kernel_ready', lambda dtype: False)
    supported = DeformableAttention.SUPPORTED_IMPLS
    cpu = torch.device('cpu')
    assert resolve_attn_impl('auto', supported, cpu, torch.float32, 4200, False, 84) == 'sdpa'
    assert resolve_attn_impl('auto', supported, cpu, torch.float32, 4200, True, 84) == 'reference'


def test_resolver_while_exporting(monkeypatch):
    """Exports record no kernel: 'fused' runs SDPA, 'auto' the rule without the kernel."""
    monkeypatch.setattr(attention_module, 'is_exporting', lambda: True)
    supported, cpu = DeformableAttention.SUPPORTED_IMPLS, torch.device('cpu')
    assert resolve_attn_impl('fused', supported, cpu, torch.float32, 4200, False, 84) == 'sdpa'
    assert resolve_attn_impl('auto', supported, cpu, torch.float32, 4200, False, 84) == 'sdpa'
    assert resolve_attn_impl('auto', supported, cpu, torch.float32, 49, False, 7) == 'reference'
    assert resolve_attn_impl('reference', supported, cpu, torch.float32, 4200, False, 84) == 'reference'


def test_resolver_while_compiling(monkeypatch):
    """torch.compile cannot trace into the C++ kernel: 'auto' compiles the materialised bias."""
    monkeypatch.setattr(torch.compiler, 'is_compiling', lambda: True)
    supported, cpu = DeformableAttention.SUPPORTED_IMPLS, torch.device('cpu')
    assert resolve_attn_impl('auto', supported, cpu, torch.float32, 4200, False, 84) == 'sdpa'
    assert resolve_attn_impl('auto', supported, cpu, torch.float32, 4200, True, 84) == 'reference'


@pytest.mark.parametrize('num_keys,bias_grad,uses_sdpa', [
    (49, False, False), (CPU_SDPA_MIN_KEYS - 1, False, False), (CPU_SDPA_MIN_KEYS, False, True),
    (CPU_SDPA_MIN_KEYS, True, False)])
def test_auto_on_cpu_runs_short_attention_and_training_through_matmuls(monkeypatch, num_keys, bias_grad,
                                                                       uses_sdpa):
    calls = []
    sdpa = attention_module.F.scaled_dot_product_attention

    def recording_sdpa(*args, **kwargs):
        calls.append(args[1].shape)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(attention_module.F, 'scaled_dot_product_attention', recording_sdpa)
    torch.manual_seed(0)
    q = torch.randn(2, 3, 10, 8, dtype=torch.float64)
    k, v = (torch.randn(2, 3, num_keys, 8, dtype=torch.float64) for _ in range(2))
    bias = torch.randn(3, 10, num_keys, dtype=torch.float64, requires_grad=bias_grad)
    out = biased_attention(q, k, v, bias, 'auto')
    assert bool(calls) == uses_sdpa
    calls.clear()
    assert torch.allclose(out, biased_attention(q, k, v, bias, 'reference'), atol=1e-12)
    biased_attention(q, k, v, bias, 'sdpa')
    assert len(calls) == 1


def test_auto_off_cpu_runs_sdpa_even_for_short_attention(monkeypatch):
    calls = []
    monkeypatch.setattr(attention_module.F, 'scaled_dot_product_attention',
                        lambda q, *args, **kwargs: calls.append(q.device) or q)
    q, k, v = (torch.empty(1, 2, 5, 8, device='meta') for _ in range(3))
    biased_attention(q, k, v, torch.empty(2, 5, 5, device='meta', requires_grad=True), 'auto')
    assert calls == [torch.device('meta')]
