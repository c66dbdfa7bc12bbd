"""The Triton deformable attention kernels against the materialised reference path.

Without a GPU the kernels run in Triton's CPU interpreter, which Triton chooses when it is
imported: test_triton_setup.py runs this file in a process of its own with
``TRITON_INTERPRET=1`` (the rest of the suite runs without it), so the sizes here are tiny; the
tests marked ``cuda`` run at the size of DAT-T's stage 3 at 800x1333 when a GPU is present.
"""
import subprocess
import sys
import time

import pytest
import torch

from mmdat.models import DAT
from mmdat.models.layers import DeformableAttention, cpu_deformable, deformable_attention, policy
from mmdat.models.layers import triton_deformable as fused_module
from mmdat.models.layers.attention_math import reference_deformable_attention, sampled_position_bias
from mmdat.models.layers.triton_deformable import fused_deformable_attention, supports

pytestmark = pytest.mark.skipif(
    not fused_module.TRITON_AVAILABLE or not (torch.cuda.is_available() or fused_module.interpreter_enabled()),
    reason='needs Triton, and a GPU or TRITON_INTERPRET=1 (test_triton_setup.py runs this file with it)')
DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'
cuda_only = pytest.mark.gpu


def make_inputs(batch, heads, groups, num_queries, num_keys, dims, table_hw, seed=0):
    """Random inputs in float64; key positions reach beyond the map so that some displacements
    fall outside the table (zero padding)."""
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, heads, num_queries, dims, generator=gen, dtype=torch.float64)
    key = torch.randn(batch, heads, num_keys, dims, generator=gen, dtype=torch.float64)
    value = torch.randn(batch, heads, num_keys, dims, generator=gen, dtype=torch.float64)
    reference = torch.rand(num_queries, 2, generator=gen, dtype=torch.float64) * 2 - 1
    positions = (torch.rand(batch * groups, num_keys, 2, generator=gen, dtype=torch.float64) * 2 - 1) * 1.6
    table = torch.randn(heads, *table_hw, generator=gen, dtype=torch.float64)
    return [query, key, value, reference, positions, table]


GRAD_NAMES = ('query', 'key', 'value', 'positions', 'table')
GRAD_INDICES = (0, 1, 2, 4, 5)


def outputs_and_grads(fn, inputs, dtype, grad_out):
    tensors = [t.to(DEVICE, dtype).detach() for t in inputs]
    for i in GRAD_INDICES:
        tensors[i].requires_grad_(True)
    out = fn(*tensors)
    grads = torch.autograd.grad((out * grad_out.to(DEVICE, out.dtype)).sum(), [tensors[i] for i in GRAD_INDICES])
    return out, grads


def relative_error(actual, expected):
    assert torch.isfinite(actual).all(), 'non-finite values'  # NaN never passes
    expected = expected.to(actual.device)
    return ((actual.double() - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def check_against_reference(shape, dtype, tol, seed=0):
    inputs = make_inputs(*shape, seed=seed)
    if dtype != torch.float32:  # compare with the rounded inputs, so only the kernel's error counts
        inputs = [t.to(dtype).double() for t in inputs]
    batch, heads, _, num_queries, _, dims, _ = shape
    grad_out = torch.randn(batch, heads, num_queries, dims, generator=torch.Generator().manual_seed(1),
                           dtype=torch.float64)
    out, grads = outputs_and_grads(fused_deformable_attention, inputs, dtype, grad_out)
    ref_out, ref_grads = outputs_and_grads(reference_deformable_attention, inputs, torch.float64, grad_out)
    assert out.dtype == dtype and out.shape == ref_out.shape
    errors = {'out': relative_error(out, ref_out)}
    for name, grad, ref_grad in zip(GRAD_NAMES, grads, ref_grads):
        assert ref_grad.abs().sum() > 0, name
        errors[name] = relative_error(grad, ref_grad)
    assert max(errors.values()) <= tol, errors


# (batch, heads, groups, queries, keys, head dims, table (h, w)): odd sizes, key tiles that end
# part-way, several heads per group and one group per head.
SHAPES = [(1, 2, 1, 5, 5, 8, (3, 3)), (2, 3, 3, 13, 11, 16, (5, 7)), (2, 4, 2, 37, 29, 8, (9, 5))]


@pytest.mark.parametrize('shape', SHAPES)
def test_float32_matches_float64_reference(shape):
    check_against_reference(shape, torch.float32, tol=1e-4)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_half_precision_matches_reference(dtype):
    check_against_reference(SHAPES[1], dtype, tol=1e-2)


def test_bilinear_corner_cases_match_grid_sample():
    """Keys exactly at query reference points: displacements on table nodes and on the table's
    edges, where the bilinear weights and their derivatives switch."""
    inputs = make_inputs(1, 2, 1, 9, 9, 8, (5, 5))
    grid = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, 3, dtype=torch.float64)] * 2, indexing='ij'), -1)
    inputs[3] = grid.reshape(9, 2)
    inputs[4] = grid.reshape(1, 9, 2).clone()  # displacements in {-1, -0.5, 0, 0.5, 1}
    grad_out = torch.randn(1, 2, 9, 8, dtype=torch.float64)
    out, grads = outputs_and_grads(fused_deformable_attention, inputs, torch.float32, grad_out)
    ref_out, ref_grads = outputs_and_grads(reference_deformable_attention, inputs, torch.float64, grad_out)
    assert relative_error(out, ref_out) < 1e-5
    for name, grad, ref_grad in zip(GRAD_NAMES, grads, ref_grads):
        assert relative_error(grad, ref_grad) < 1e-5, name


def test_reference_helper_matches_the_module_bias():
    """The test reference spells out the same bias as DeformableAttention.position_bias."""
    module = DeformableAttention(16, 4, 2, 3, table_size=(3, 4)).double()
    inputs = make_inputs(2, 4, 2, 12, 12, 4, (5, 7))
    inputs[3] = deformable_attention.pixel_centre_grid(3, 4, torch.device('cpu'), torch.float64).view(12, 2)
    with torch.no_grad():
        module.rpe_table.copy_(inputs[5])
    bias = sampled_position_bias(*inputs[3:], batch=2)
    expected = module.position_bias(inputs[3].view(3, 4, 2), inputs[4].view(4, 3, 4, 2), batch=2)
    assert bias.abs().max() > 0.1
    assert torch.allclose(bias, expected, atol=1e-12)


def make_module(impl, seed=0):
    torch.manual_seed(seed)
    module = DeformableAttention(embed_dims=24, num_heads=6, num_groups=2, offset_kernel_size=3,
                                 table_size=(4, 3), attn_impl=impl)
    with torch.no_grad():
        module.rpe_table.normal_()  # a bias that matters
        module.offset_net.proj.weight.normal_(std=0.5)  # offsets that move the keys
    return module


@pytest.mark.parametrize('size', [(3, 5), (7, 4)])
def test_module_fused_matches_reference_forward_and_backward(size):
    """The whole block, with gradients into the offset network (through the sampled keys and
    the sampled bias) and the table."""
    x = torch.randn(2, *size, 24, dtype=torch.float64)
    results = {}
    for impl, dtype in (('fused', torch.float32), ('reference', torch.float64)):
        module = make_module(impl).to(DEVICE, dtype)
        inp = x.to(DEVICE, dtype).requires_grad_(True)
        out = module(inp)
        (out * torch.linspace(-1, 1, 24, device=DEVICE, dtype=dtype)).sum().backward()
        results[impl] = (out, inp.grad, dict(module.named_parameters()))
    out_f, grad_f, params_f = results['fused']
    out_r, grad_r, params_r = results['reference']
    assert relative_error(out_f, out_r) < 1e-4
    assert relative_error(grad_f, grad_r) < 1e-4
    for name in params_r:
        if name == 'proj_k.bias':  # shifts all scores of a query equally: zero gradient
            assert params_r[name].grad.abs().max() < 1e-12
            assert params_f[name].grad.abs().max() < 1e-6
            continue
        assert params_r[name].grad.abs().sum() > 0, name
        assert relative_error(params_f[name].grad, params_r[name].grad) < 1e-4, name


def test_backbone_fused_matches_reference():
    """DAT with attn_impl='fused' (deformable blocks in stages 3 and 4 on 3 x 5 and 2 x 3 maps)
    against the reference path, forward and every parameter gradient."""
    arch = dict(embed_dims=8, depths=(1, 1, 2, 2), num_heads=(1, 2, 2, 4), offset_groups=(0, 0, 1, 2))
    x = torch.randn(2, 3, 45, 77, dtype=torch.float64)
    results = {}
    for impl, dtype in (('fused', torch.float32), ('reference', torch.float64)):
        torch.manual_seed(0)
        model = DAT(arch=arch, attn_impl=impl, drop_path_rate=0.0)
        model.init_weights()
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith('rpe_table') or name.endswith('offset_net.proj.weight'):
                    param.normal_(std=0.5)  # a bias and offsets that matter
        model = model.to(DEVICE, dtype)
        outs = model(x.to(DEVICE, dtype))
        sum((o * (i + 1)).sin().sum() for i, o in enumerate(outs)).backward()
        results[impl] = outs, dict(model.named_parameters())
    (outs_f, params_f), (outs_r, params_r) = results['fused'], results['reference']
    for out_f, out_r in zip(outs_f, outs_r):
        assert relative_error(out_f, out_r) < 1e-4
    for name, param in params_r.items():
        if name.endswith('proj_k.bias'):  # zero gradient (shifts a query's scores equally)
            continue
        assert relative_error(params_f[name].grad, param.grad) < 1e-4, name
    assert params_r['stages.3.blocks.1.attn.rpe_table'].grad.abs().sum() > 0


def saved_numels(module, x):
    """Sizes of the tensors the autograd graph keeps for backward."""
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sizes


def test_nothing_quadratic_is_saved_for_backward():
    """At a 16 x 16 map (256 tokens) the reference path keeps (B, heads, N, N) tensors for
    backward; the fused path keeps nothing larger than the activations."""
    batch, size, channels, heads = 1, 16, 24, 6
    x = torch.randn(batch, size, size, channels, device=DEVICE, requires_grad=True)
    quadratic = batch * heads * (size * size)**2
    assert max(saved_numels(make_module('reference').to(DEVICE), x)) >= quadratic
    assert max(saved_numels(make_module('fused').to(DEVICE), x)) <= 4 * batch * size * size * channels


def test_auto_uses_the_triton_kernel_only_on_cuda(monkeypatch):
    calls = []

    def spy(*args):
        calls.append(args[0].device)
        return fused_deformable_attention(*args)

    monkeypatch.setattr(fused_module, 'fused_deformable_attention', spy)
    monkeypatch.setenv('MMDAT_SKIP_KERNEL_CHECK', '1')  # count the model's calls only
    x = torch.randn(1, 3, 4, 24)
    auto = make_module('auto')(x)
    # CPU, 12 keys: the matmuls of the reference path (see CPU_SDPA_MIN_KEYS)
    assert calls == [] and torch.equal(auto, make_module('reference')(x))
    # on CPU, 'fused' is the C++ kernel where it builds, Triton's interpreter otherwise
    monkeypatch.setattr(cpu_deformable, 'supports', lambda device, dtype: False)
    make_module('fused')(x)
    assert len(calls) == 1
    if torch.cuda.is_available():
        make_module('auto').cuda()(x.cuda())
        assert calls[-1].type == 'cuda'


def test_double_backward_is_refused():
    inputs = [t.float().to(DEVICE) for t in make_inputs(1, 2, 1, 5, 5, 8, (3, 3))]
    inputs[0].requires_grad_(True)
    (grad, ) = torch.autograd.grad(fused_deformable_attention(*inputs).sum(), inputs[0], create_graph=True)
    with pytest.raises(RuntimeError, match='once_differentiable|does not require grad'):
        grad.sum().backward()


def test_supports():
    assert not supports(torch.device('cpu'), torch.float64)
    assert supports(torch.device(DEVICE), torch.bfloat16)


def _valid_inputs():
    return [t.float().to(DEVICE) for t in make_inputs(2, 4, 2, 5, 6, 8, (3, 3))]


@pytest.mark.parametrize('index,replacement,error,match', [
    (0, lambda t: t.double(), TypeError, 'share one dtype'),
    (1, lambda t: t.half(), TypeError, 'share one dtype'),
    (0, lambda t: t[0], ValueError, r'\(B, heads, N, head_dims\)'),
    (1, lambda t: t[:, :, :, :4], ValueError, 'key and value must be'),
    (2, lambda t: t[:, :, :5], ValueError, 'key and value must be'),
    (3, lambda t: t[:4], ValueError, r'reference must be \(Nq, 2\)'),
    (3, lambda t: t.requires_grad_(True), ValueError, 'no gradient for the reference'),
    (3, lambda t: t.double(), TypeError, 'reference must be float16'),
    (4, lambda t: t[:3], ValueError, r'positions must be \(B \* groups, Nk, 2\)'),
    (4, lambda t: t[:, :5], ValueError, r'positions must be'),
    (4, lambda t: t.repeat(3, 1, 1), ValueError, 'groups dividing heads'),
    (5, lambda t: t[:3], ValueError, r'table must be \(heads, Th, Tw\)'),
    (0, lambda t: t.transpose(-1, -2).contiguous().transpose(-1, -2), ValueError, 'unit stride'),
    (0, lambda t: t.tolist(), TypeError, 'query must be a Tensor'),
])
def test_bad_inputs(index, replacement, error, match):
    inputs = _valid_inputs()
    inputs[index] = replacement(inputs[index])
    with pytest.raises(error, match=match):
        fused_deformable_attention(*inputs)


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setattr(fused_module, 'interpreter_enabled', lambda: False)  # compiled kernels
    inputs = [t.float() for t in make_inputs(1, 2, 1, 5, 5, 8, (3, 3))]
    with pytest.raises(ValueError, match='run on CUDA tensors'):
        fused_deformable_attention(*inputs)
    assert not supports(torch.device('cpu'), torch.float32)


@pytest.mark.slow
def test_model_imports_and_runs_without_triton():
    """Triton is optional: 'auto' runs without it, 'fused' runs the C++ kernel on CPU, and the
    Triton function says what is missing."""
    code = '\n'.join([
        'import sys', 'sys.modules["triton"] = None',  # makes `import triton` fail
        'import pytest, torch',
        'from mmdat.models import DAT',
        'from mmdat.models.layers.triton_deformable import TRITON_AVAILABLE',
        'assert not TRITON_AVAILABLE',
        'arch = dict(embed_dims=8, depths=(1, 1, 2, 2), num_heads=(1, 2, 2, 4), offset_groups=(0, 0, 1, 2))',
        'DAT(arch=arch)(torch.randn(1, 3, 64, 64))',
        'from mmdat.models.layers import cpu_kernel_available',
        'from mmdat.models.layers.triton_deformable import fused_deformable_attention',
        'if cpu_kernel_available():',
        '    DAT(arch=arch, attn_impl="fused")(torch.randn(1, 3, 64, 64))',
        'with pytest.raises(RuntimeError, match="needs Triton"):',
        '    fused_deformable_attention(*(torch.zeros(1, 1, 1, 1) for _ in range(3)), None, None, None)',
    ])
    subprocess.run([sys.executable, '-c', code], check=True)


@cuda_only
@pytest.mark.parametrize('dtype,tol', [(torch.float32, 1e-4), (torch.bfloat16, 1e-2)])
def test_real_size_on_gpu(dtype, tol):
    """DAT-T stage 3 at 800x1333: 50 x 84 = 4200 tokens, 12 heads of 32 dims in 3 groups, a
    27 x 27 table (pre-trained at 224)."""
    check_against_reference((2, 12, 3, 4200, 4200, 32, (27, 27)), dtype, tol)


@cuda_only
def test_peak_memory_is_linear_on_gpu():
    """Forward + backward at 4200 tokens: the reference path needs several (B, heads, N, N)
    tensors (each 1.7 GB in float32 here), the fused path none."""
    inputs = make_inputs(2, 12, 3, 4200, 4200, 32, (27, 27))
    grad_out = torch.randn(2, 12, 4200, 32, dtype=torch.float64)
    peaks = {}
    for name, fn in (('fused', fused_deformable_attention), ('reference', reference_deformable_attention)):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        outputs_and_grads(fn, inputs, torch.float32, grad_out)
        torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated() - start
    quadratic = 2 * 12 * 4200 * 4200 * 4
    assert peaks['fused'] < quadratic / 4, peaks
    assert peaks['reference'] > quadratic, peaks


@pytest.mark.skipif(torch.cuda.is_available(), reason='the interpreter on CPU')
@pytest.mark.parametrize('broken,error', [
    (lambda *args: 1 / 0, 'ZeroDivisionError: division by zero'),
    (lambda *args: fused_deformable_attention(*args) - 0.01, 'output: relative error')])
def test_a_broken_triton_kernel_warns_once_in_auto_and_is_one_error_in_fused(monkeypatch, broken, error):
    """The Triton kernel picked on CPU (the interpreter; the C++ kernel left out), patched to
    raise and to return wrong values."""
    monkeypatch.setattr(policy, '_CHECKED', {})
    monkeypatch.setattr(policy, '_WARNED', set())
    monkeypatch.delenv('MMDAT_SKIP_KERNEL_CHECK', raising=False)
    monkeypatch.setattr(cpu_deformable, 'supports', lambda device, dtype: False)
    monkeypatch.setitem(policy.TRITON_DEFORMABLE.auto_min_row_scores, 'cpu', 0)  # 'auto' picks it on CPU
    x = torch.randn(1, 3, 4, 24)
    assert policy.run_self_check(policy.TRITON_DEFORMABLE, torch.device('cpu'), torch.float32) is None
    monkeypatch.setattr(fused_module, 'fused_deformable_attention', broken)
    with pytest.warns(UserWarning, match='Triton deformable attention kernel failed its self-check on cpu '
                                         f'float32 \\({error}'):
        auto = make_module('auto')(x)
    assert torch.equal(auto, make_module('reference')(x))  # the materialised rule: 12 keys on CPU
    with pytest.raises(RuntimeError, match="attn_impl='fused': the Triton deformable attention kernel failed"):
        make_module('fused')(x)


def test_cost_of_the_triton_check():
    """The self-check of the Triton kernel (on CPU: in the interpreter, far slower than on a GPU)."""
    for dtype in (torch.float32, torch.bfloat16):
        start = time.perf_counter()
        assert policy.run_self_check(policy.TRITON_DEFORMABLE, torch.device(DEVICE), dtype) is None
        print(f'Triton self-check {DEVICE} {dtype}: {time.perf_counter() - start:.3f} s')
