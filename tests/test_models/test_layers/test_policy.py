import os
import types

import pytest
import torch

from mmdat.models import DAT
from mmdat.models.layers import (DeformableAttention, DeformableAttentionPP, NeighborhoodAttention,
                                 WindowAttention, biased_attention, block_attn_impl, check_attn_impl,
                                 cpu_deformable, cpu_kernel_available, natten_available, resolve_attn_impl)
from mmdat.models.layers import attention_math, policy
from mmdat.models.layers.cpu_neighborhood import kernel_available as cpu_neighborhood_available
from mmdat.models.layers.policy import (CPU_KERNEL_MIN_ROW_SCORES, CPU_SDPA_MIN_KEYS, DEFORMABLE, NEIGHBORHOOD,
                                        WINDOW)


def resolved_name(*args, **kwargs):
    """What resolve_attn_impl picks, as one word: the implementation, or the attention of the
    materialised bias when no kernel runs."""
    choice = resolve_attn_impl(*args, **kwargs)
    return choice.name if choice.kernel is not None else choice.attention


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
        check_attn_impl('fused', WINDOW, 'WindowAttention')
    with pytest.raises(ValueError, match='attention must be one of'):
        biased_attention(*(torch.randn(1, 1, 2, 2) for _ in range(3)), None, 'flash')
    with pytest.raises(ValueError, match='attention must be one of'):
        biased_attention(*(torch.randn(1, 1, 2, 2) for _ in range(3)), None, 'auto')  # the caller resolves


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
    assert block_attn_impl('fused', WINDOW) == 'sdpa'  # a kernel the block lacks
    assert block_attn_impl('fused', DEFORMABLE) == 'fused'
    assert block_attn_impl('auto', WINDOW) == 'auto'
    assert block_attn_impl('natten', DEFORMABLE) == 'sdpa'
    assert block_attn_impl('auto', NEIGHBORHOOD) == 'auto'  # natten is picked per call
    assert block_attn_impl('reference', NEIGHBORHOOD) == 'reference'
    with pytest.raises(ValueError, match='attn_impl must be one of'):
        block_attn_impl('bogus', WINDOW)


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
    device = torch.device(device)
    assert resolved_name('auto', DEFORMABLE, device, dtype, num_keys, bias_grad, row_queries) == expected
    for impl in ('sdpa', 'reference'):  # explicit values are kept
        assert resolved_name(impl, DEFORMABLE, device, dtype, num_keys, bias_grad, row_queries) == impl
    if expected == 'fused':
        assert resolved_name('fused', DEFORMABLE, device, dtype, num_keys, bias_grad, row_queries) == 'fused'


def test_fused_is_resolved_once_to_the_kernel_it_runs():
    """One resolution names the kernel: the C++ one on CPU, where it builds."""
    if not cpu_kernel_available():
        pytest.skip('the CPU kernel does not build here')
    choice = resolve_attn_impl('fused', DEFORMABLE, torch.device('cpu'), torch.float32, 49, False, 7)
    assert choice.kernel is policy.CPU_DEFORMABLE and choice.name == 'fused'


def test_fused_without_a_kernel_for_the_input_is_one_error(monkeypatch):
    monkeypatch.setattr(cpu_deformable, 'supports', lambda device, dtype: False)
    with pytest.raises(RuntimeError, match="attn_impl='fused' has no kernel for cpu bfloat16 here"):
        resolve_attn_impl('fused', DEFORMABLE, torch.device('cpu'), torch.bfloat16, 49, False, 7)


def test_resolver_without_the_cpu_kernel(monkeypatch):
    """A machine where the kernel does not build: 'auto' falls back to the materialised bias."""
    monkeypatch.setattr(cpu_deformable, 'supports', lambda device, dtype: False)
    cpu = torch.device('cpu')
    assert resolved_name('auto', DEFORMABLE, cpu, torch.float32, 4200, False, 84) == 'sdpa'
    assert resolved_name('auto', DEFORMABLE, cpu, torch.float32, 4200, True, 84) == 'reference'


def test_resolver_while_exporting(monkeypatch):
    """Exports record no kernel: 'fused' runs SDPA, 'auto' the rule without the kernel."""
    monkeypatch.setattr(policy, 'is_exporting', lambda: True)
    cpu = torch.device('cpu')
    assert resolved_name('fused', DEFORMABLE, cpu, torch.float32, 4200, False, 84) == 'sdpa'
    assert resolved_name('auto', DEFORMABLE, cpu, torch.float32, 4200, False, 84) == 'sdpa'
    assert resolved_name('auto', DEFORMABLE, cpu, torch.float32, 49, False, 7) == 'reference'
    assert resolved_name('reference', DEFORMABLE, cpu, torch.float32, 4200, False, 84) == 'reference'
    # neighborhood attention: the reference gathers, traceable (no tiles, no natten)
    for impl in ('auto', 'sdpa'):
        assert resolve_attn_impl(impl, NEIGHBORHOOD, cpu, torch.float32, 196, False).kernel is None


def test_resolver_while_compiling(monkeypatch):
    """torch.compile cannot trace into the C++ kernel: 'auto' and 'fused' compile the
    materialised bias."""
    monkeypatch.setattr(torch.compiler, 'is_compiling', lambda: True)
    cpu = torch.device('cpu')
    assert resolved_name('auto', DEFORMABLE, cpu, torch.float32, 4200, False, 84) == 'sdpa'
    assert resolved_name('auto', DEFORMABLE, cpu, torch.float32, 4200, True, 84) == 'reference'
    assert resolve_attn_impl('fused', DEFORMABLE, cpu, torch.float32, 4200, False, 84).kernel is None


@pytest.mark.parametrize('num_keys,bias_grad,expected', [
    (49, False, 'reference'), (CPU_SDPA_MIN_KEYS - 1, False, 'reference'), (CPU_SDPA_MIN_KEYS, False, 'sdpa'),
    (CPU_SDPA_MIN_KEYS, True, 'reference')])
def test_auto_on_cpu_runs_short_attention_and_training_through_matmuls(num_keys, bias_grad, expected):
    cpu = torch.device('cpu')
    assert resolved_name('auto', WINDOW, cpu, torch.float64, num_keys, bias_grad) == expected
    assert resolved_name('sdpa', WINDOW, cpu, torch.float64, num_keys, bias_grad) == 'sdpa'


def test_auto_off_cpu_runs_sdpa_even_for_short_attention():
    meta = torch.device('meta')
    assert resolved_name('auto', WINDOW, meta, torch.float32, 49, True) == 'sdpa'


def test_window_layer_runs_what_the_policy_resolves(monkeypatch):
    """49 keys on CPU: 'auto' runs the matmuls, 'sdpa' SDPA, with the same result."""
    calls = []
    sdpa = attention_math.F.scaled_dot_product_attention

    def recording_sdpa(*args, **kwargs):
        calls.append(args[1].shape)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(attention_math.F, 'scaled_dot_product_attention', recording_sdpa)
    torch.manual_seed(0)
    layer = WindowAttention(8, 2, 7, attn_impl='auto').double()
    x = torch.randn(1, 7, 7, 8, dtype=torch.float64)
    with torch.no_grad():
        auto = layer(x)
        assert calls == []
        layer.attn_impl = 'sdpa'
        assert torch.allclose(layer(x), auto, atol=1e-12) and len(calls) == 1


def test_no_triton_interpreter_in_this_process_and_fused_on_cpu_runs_the_cpp_kernel():
    """The suite runs without TRITON_INTERPRET (only the Triton tests' own process has it): the
    CPU dispatch is the one users get."""
    assert os.environ.get('TRITON_INTERPRET') != '1'
    if not cpu_kernel_available():
        pytest.skip('the CPU kernel does not build here')
    torch.manual_seed(0)
    module = DeformableAttention(16, 4, 2, 3, table_size=5, attn_impl='fused')
    x = torch.randn(1, 6, 7, 16)
    with torch.no_grad():
        fused = module(x)
        module.attn_impl = 'reference'
        torch.testing.assert_close(fused, module(x), rtol=1e-5, atol=1e-5)


SMALL_ARCH = dict(embed_dims=8, depths=(1, 1, 2, 2), num_heads=(1, 2, 2, 4), offset_groups=(0, 0, 1, 2))


def test_a_new_path_is_one_kernel_module_and_one_table_entry(monkeypatch):
    """A dummy kernel (the reference op, counting its calls) registered as 'dummy': a backbone
    runs it in its deformable blocks (after its self-check) and the rest on SDPA, with the
    reference's outputs and gradients."""
    calls = []

    def op(query, key, value, queries, positions, table):
        calls.append(tuple(query.shape))
        return attention_math.reference_deformable_attention(query, key, value, queries, positions, table)

    module = types.SimpleNamespace(REQUIREMENT='nothing', installed=lambda: True,
                                   supports=lambda device, dtype: device.type == 'cpu', op=op)
    kernel = policy.Kernel('dummy deformable attention', module, DEFORMABLE, auto_min_row_scores={})
    monkeypatch.setitem(policy.IMPLEMENTATIONS, 'dummy',
                        policy.Implementation((DEFORMABLE, ), (kernel, ), 'sdpa'))
    monkeypatch.setattr(policy, '_CHECKED', {})
    assert 'dummy' in policy.attn_impls()
    x = torch.randn(2, 3, 45, 77, dtype=torch.float64)
    results = {}
    for impl in ('dummy', 'reference'):
        torch.manual_seed(0)
        model = DAT(arch=SMALL_ARCH, attn_impl=impl, drop_path_rate=0.0).double()
        outs = model(x)
        sum((o * (i + 1)).sin().sum() for i, o in enumerate(outs)).backward()
        results[impl] = outs, [p.grad for p in model.parameters()]
    blocks = [block.attn for stage in model.stages for block in stage.blocks]
    assert [type(b).__name__ for b in blocks].count('DeformableAttention') == 2
    # one self-check (a small input), then one call per deformable block (3 x 5, 2 x 3 maps)
    assert len(calls) == 3 and calls[1:] == [(2, 2, 15, 16), (2, 4, 6, 16)], calls
    for got, expected in zip(*(results[impl][0] for impl in ('dummy', 'reference'))):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    for got, expected in zip(*(results[impl][1] for impl in ('dummy', 'reference'))):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    window = DAT(arch=SMALL_ARCH, attn_impl='dummy').stages[0].blocks[0].attn
    assert window.attn_impl == 'sdpa'  # the block rule: a layer without the path


def test_natten_under_auto_unless_checkpointed(monkeypatch):
    """natten installed (here a stand-in computing its math): 'auto' picks it per call, except
    in checkpointed blocks, whose backward natten 0.14 refuses."""
    def qk(q, k, rpb, kernel_size):
        raise AssertionError('not called in this test')

    monkeypatch.setattr(policy.NATTEN.module, 'natten_functions', lambda: (qk, qk))
    cpu = torch.device('cpu')
    monkeypatch.setenv('MMDAT_SKIP_KERNEL_CHECK', '1')
    if cpu_neighborhood_available():  # on CPU the C++ kernel comes first
        assert resolve_attn_impl('auto', NEIGHBORHOOD, cpu, torch.float32, 196, False).kernel is policy.CPU_NEIGHBORHOOD
    # as where the C++ kernel does not take the input (CUDA)
    monkeypatch.setattr(policy.CPU_NEIGHBORHOOD.module, 'supports', lambda device, dtype: False)
    assert resolve_attn_impl('auto', NEIGHBORHOOD, cpu, torch.float32, 196, False).kernel is policy.NATTEN
    tiles = resolve_attn_impl('auto', NEIGHBORHOOD, cpu, torch.float32, 196, False, checkpointed=True)
    assert tiles.kernel is policy.NEIGHBORHOOD_TILES
    assert NeighborhoodAttention(8, 2, attn_impl='natten').attn_impl == 'natten'  # installed now


def test_runs_on_needs_a_kernel_in_every_layer_that_has_kernels(monkeypatch):
    """'fused' in bfloat16 on CPU: the neighborhood blocks have the tiles, but the deformable
    blocks run only where Triton takes the input."""
    cpu = torch.device('cpu')
    assert policy.runs_on('sdpa', cpu, torch.bfloat16) and policy.runs_on('auto', cpu, torch.bfloat16)
    monkeypatch.setattr(policy.TRITON_DEFORMABLE.module, 'supports', lambda device, dtype: False)
    assert not policy.runs_on('fused', cpu, torch.bfloat16)
    assert policy.runs_on('fused', cpu, torch.float32) == cpu_kernel_available()
    monkeypatch.setattr(policy.TRITON_DEFORMABLE.module, 'supports', lambda device, dtype: True)
    assert policy.runs_on('fused', cpu, torch.bfloat16)
