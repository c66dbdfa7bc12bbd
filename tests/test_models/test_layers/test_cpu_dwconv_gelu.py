"""The C++ CPU kernel of DAT++'s MLP activation, ``gelu(h + dwconv(h))``, against the plain
operators, and how the policy picks it."""
import warnings

import pytest
import torch

from mmdat.models.layers import MLP, cpu_dwconv_gelu, policy
from mmdat.models.layers import mlp as mlp_module
from mmdat.models.layers.attention_math import reference_dwconv_gelu
from mmdat.models.layers.cpu_dwconv_gelu import activation, activation_backward, kernel_available, op

from tests.conftest import kernel_without_avx512, run_without_compiler

pytestmark = pytest.mark.skipif(not kernel_available(), reason='the CPU kernel does not build here')


def make_inputs(batch, height, width, channels, kernel_size=3, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, height, width, channels, generator=gen, dtype=dtype)
    weight = torch.randn(channels, 1, kernel_size, kernel_size, generator=gen, dtype=dtype) * 0.5
    bias = torch.randn(channels, generator=gen, dtype=dtype)
    return h, weight, bias


def outputs_and_grads(fn, inputs, grad_out):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    return [out] + list(torch.autograd.grad(out, leaves, grad_out))


@pytest.mark.parametrize('shape,kernel_size', [((2, 5, 7, 6), 3), ((1, 1, 9, 4), 3), ((3, 4, 1, 5), 3),
                                               ((1, 1, 1, 3), 3), ((1, 6, 5, 4), 5), ((2, 3, 4, 2), 1)])
def test_float64_forward_and_gradients_match_the_plain_operators(shape, kernel_size):
    """Odd sizes, maps thinner than the kernel, a 5x5 and a 1x1 kernel: every border case."""
    inputs = make_inputs(*shape, kernel_size=kernel_size)
    grad_out = torch.randn(shape, dtype=torch.float64)
    for got, want in zip(outputs_and_grads(op, inputs, grad_out),
                         outputs_and_grads(reference_dwconv_gelu, inputs, grad_out)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_gradcheck():
    inputs = [t.requires_grad_() for t in make_inputs(1, 3, 4, 3)]
    assert torch.autograd.gradcheck(op, inputs)


@pytest.mark.parametrize('channels,kernel_size', [(256, 3), (20, 3), (32, 5)])
def test_float32_matches_the_float64_plain_operators(channels, kernel_size):
    """Values spread over GELU's whole range (the float polynomials), at a DAT-T++ width and 3x3
    kernel (with AVX-512: the vector code) and where the portable code runs (channels not a
    multiple of 16, a 5x5 kernel). Errors as norms relative to the float64 result: the weight
    gradient sums ~200 products a tap, so single entries that cancel lose digits in float32
    (torch's own float32 operators too; both stay within 4e-7 here)."""
    inputs = make_inputs(2, 9, 11, channels, kernel_size=kernel_size, dtype=torch.float32)
    inputs = (inputs[0] * 3, ) + inputs[1:]
    grad_out = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(1))
    got = outputs_and_grads(op, inputs, grad_out)
    want = outputs_and_grads(reference_dwconv_gelu, [t.double() for t in inputs], grad_out.double())
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        assert ((g.double() - w).norm() / w.norm()).item() < 1e-6


@pytest.fixture(scope='module')
def kernel_avx2():
    """The kernel as CPUs with AVX2 but no AVX-512 run it: the portable loops, also for DAT-T++'s
    3x3 float32 case, which the main build runs with AVX-512."""
    return kernel_without_avx512(cpu_dwconv_gelu)


@pytest.mark.parametrize('shape,kernel_size,dtype', [((2, 5, 7, 6), 3, torch.float64), ((1, 6, 5, 4), 5, torch.float64),
                                                      ((2, 9, 11, 256), 3, torch.float32)])
def test_build_without_avx512_matches_the_plain_operators(kernel_avx2, monkeypatch, shape, kernel_size, dtype):
    monkeypatch.setattr(torch.ops, 'mmdat_dwconv_gelu_cpu', kernel_avx2)
    inputs = make_inputs(*shape, kernel_size=kernel_size, dtype=dtype)
    grad_out = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    got = outputs_and_grads(op, inputs, grad_out)
    want = outputs_and_grads(reference_dwconv_gelu, [t.double() for t in inputs], grad_out.double())
    for g, w in zip(got, want):
        assert g.dtype == dtype
        assert ((g.double() - w).norm() / w.norm()).item() < (1e-12 if dtype == torch.float64 else 1e-6)


def test_gelu_in_float32_is_as_accurate_as_torchs():
    """gelu(x) in float32 for x in [-9, 9] against the exact value in float64: an absolute
    error within torch's own float32 GELU's, and the negative tail (values down to 1e-18) to
    within 2% where ``1 + erf`` in float32 cancels to nothing."""
    x = torch.linspace(-9, 9, 20001).reshape(1, 1, -1, 1)
    got = activation(x, torch.zeros(1, 1, 1, 1), torch.zeros(1)).double()
    exact = 0.5 * x.double() * torch.special.erfc(-x.double() / 2**0.5)
    torchs = torch.nn.functional.gelu(x).double()
    assert (got - exact).abs().max() <= (torchs - exact).abs().max()
    assert ((got - exact).abs() / x.double().abs().clamp_min(1)).max() < 2e-7
    tail = x < -3
    assert ((got - exact).abs() / exact.abs())[tail].max() < 0.02


def test_one_and_two_threads_give_identical_results(threads):
    inputs = make_inputs(2, 13, 10, 32, dtype=torch.float32)
    grad_out = torch.randn(inputs[0].shape)
    results = []
    for count in (1, 2):
        threads(count)
        results.append(outputs_and_grads(op, inputs, grad_out))
    for one, two in zip(*results):
        assert torch.equal(one, two)


def test_backward_overwrites_only_the_buffer_it_is_given():
    h, weight, bias = make_inputs(2, 4, 5, 6)
    grad = torch.randn(h.shape, dtype=torch.float64)
    kept = [t.clone() for t in (h, weight, bias, grad)]
    grad_h, grad_weight, grad_bias = activation_backward(grad, h, weight, bias)
    want = outputs_and_grads(reference_dwconv_gelu, (h, weight, bias), kept[3])
    for got, expected in zip((grad_h, grad_weight, grad_bias), want[1:]):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    for before, after in zip(kept[:3], (h, weight, bias)):
        assert torch.equal(before, after)
    assert not torch.equal(grad, kept[3])  # now the pre-activation's gradient


def test_bad_inputs():
    h, weight, bias = make_inputs(1, 4, 5, 6, dtype=torch.float32)
    with pytest.raises(TypeError, match='CPU tensors of'):
        activation(h.bfloat16(), weight, bias)
    with pytest.raises(ValueError, match=r'weight \(C, 1, K, K\) with K odd'):
        activation(h, weight[:5], bias)
    with pytest.raises(ValueError, match='K odd'):
        activation(h, torch.zeros(6, 1, 2, 2), bias)
    with pytest.raises(ValueError, match=r'bias \(C, \)'):
        activation(h, weight, bias[:3])
    with pytest.raises(ValueError, match=r'h \(B, H, W, C\)'):
        activation(h[0], weight, bias)


def test_the_policy_picks_it_for_float_cpu_inputs_only(monkeypatch):
    cpu = torch.device('cpu')
    for dtype in (torch.float32, torch.float64):
        assert policy.mlp_activation_kernel(cpu, dtype) is policy.CPU_DWCONV_GELU
    for dtype in (torch.bfloat16, torch.float16):
        assert policy.mlp_activation_kernel(cpu, dtype) is None
    assert policy.mlp_activation_kernel(torch.device('cuda'), torch.float32) is None
    monkeypatch.setattr(policy, 'is_exporting', lambda: True)
    assert policy.mlp_activation_kernel(cpu, torch.float32) is None


def test_the_self_check_passes():
    for dtype in (torch.float32, torch.float64):
        assert policy.run_self_check(policy.CPU_DWCONV_GELU, torch.device('cpu'), dtype) is None


def test_a_kernel_failing_its_self_check_gives_one_warning_and_the_plain_operators(monkeypatch):
    """A kernel with a wrong weight gradient: one warning, then the MLP runs the plain
    operators and gets their gradients."""
    real = torch.ops.mmdat_dwconv_gelu_cpu.backward

    class Broken:
        forward = torch.ops.mmdat_dwconv_gelu_cpu.forward

        @staticmethod
        def backward(*args):
            grad_h, grad_weight, grad_bias = real(*args)
            return grad_h, grad_weight * 2, grad_bias

    monkeypatch.setattr(torch.ops, 'mmdat_dwconv_gelu_cpu', Broken)
    monkeypatch.setattr(policy, '_CHECKED', {})
    monkeypatch.setattr(policy, '_WARNED', set())
    torch.manual_seed(0)
    mlp = MLP(4, 8, dwconv=True).double()
    x = torch.randn(1, 3, 5, 4, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        (got, ) = torch.autograd.grad(mlp(x).sum(), [mlp.dwconv.weight])
        mlp(x)
    assert len(caught) == 1 and 'C++ depthwise conv and GELU kernel failed its self-check' in str(caught[0].message)
    assert 'gradient 1' in str(caught[0].message)
    hidden = mlp.fc1(x)
    plain = mlp.fc2(reference_dwconv_gelu(hidden, mlp.dwconv.weight, mlp.dwconv.bias))
    torch.testing.assert_close(got, torch.autograd.grad(plain.sum(), [mlp.dwconv.weight])[0])


def test_the_mlp_runs_the_kernel_in_training_and_inference(monkeypatch):
    calls = []
    for name in ('activation', 'activation_backward'):
        real = getattr(cpu_dwconv_gelu, name)
        monkeypatch.setattr(cpu_dwconv_gelu, name, lambda *args, real=real, name=name: calls.append(name) or real(*args))
    monkeypatch.setenv(policy.SKIP_CHECK_VARIABLE, '1')
    mlp = MLP(4, 8, dwconv=True)
    x = torch.randn(1, 3, 5, 4)
    mlp(x).sum().backward()
    assert calls == ['activation', 'activation', 'activation_backward']  # forward; recomputed in backward
    with torch.no_grad():
        mlp(x)
    assert calls[3:] == ['activation']
    # DAT's MLP has no conv: nothing to run
    MLP(4, 8)(x).sum().backward()
    assert len(calls) == 4
    assert mlp_module.mlp_activation_kernel is policy.mlp_activation_kernel


@pytest.mark.slow
def test_without_a_compiler_the_plain_operators_run_after_one_warning(tmp_path):
    """No C++ compiler (and no build cached): one warning line, then DAT++'s MLP trains and
    infers on the plain operators."""
    code = '\n'.join([
        'import warnings, torch',
        'from mmdat.models.layers import MLP, cpu_dwconv_gelu',
        'torch.manual_seed(0)',
        'mlp = MLP(8, 16, dwconv=True)',
        'x = torch.randn(1, 5, 6, 8)',
        'with warnings.catch_warnings(record=True) as caught:',
        "    warnings.simplefilter('always')",
        '    mlp(x).sum().backward()',
        '    with torch.no_grad():',
        '        mlp(x)',
        'assert not cpu_dwconv_gelu.kernel_available()',
        "assert len(caught) == 1 and 'no C++ compiler' in str(caught[0].message), caught",
        "assert 'depthwise conv and GELU on CPU uses the plain operators' in str(caught[0].message), caught",
        'assert mlp.dwconv.weight.grad is not None',
    ])
    run_without_compiler(code, tmp_path)
