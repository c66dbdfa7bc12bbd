import pytest
import torch

from mmdat.models.layers import ATTN_IMPLS, biased_attention, check_attn_impl
from mmdat.models.layers import attention as attention_module
from mmdat.models.layers.attention import CPU_SDPA_MIN_KEYS


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
    for impl in ATTN_IMPLS:
        assert check_attn_impl(impl) == impl  # 'auto' is resolved per call, from the input
    with pytest.raises(ValueError, match='attn_impl must be one of'):
        check_attn_impl('flash')
    with pytest.raises(ValueError, match='attn_impl must be one of'):
        biased_attention(*(torch.randn(1, 1, 2, 2) for _ in range(3)), None, 'flash')


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
    biased_attention(q, k, v, bias, 'fused')  # no kernel for a materialised bias: always SDPA
    assert len(calls) == 1


def test_auto_off_cpu_runs_sdpa_even_for_short_attention(monkeypatch):
    calls = []
    monkeypatch.setattr(attention_module.F, 'scaled_dot_product_attention',
                        lambda q, *args, **kwargs: calls.append(q.device) or q)
    q, k, v = (torch.empty(1, 2, 5, 8, device='meta') for _ in range(3))
    biased_attention(q, k, v, torch.empty(2, 5, 5, device='meta', requires_grad=True), 'auto')
    assert calls == [torch.device('meta')]
