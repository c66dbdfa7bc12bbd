"""The blocks' MLP: the plain operators' outputs and gradients, one hidden tensor kept, with
DAT++'s conv and GELU through the C++ kernel and through the plain operators."""
import pytest
import torch
import torch.nn.functional as F
from torch.autograd.graph import saved_tensors_hooks

from mmdat.models.layers import MLP, cpu_dwconv_gelu
from mmdat.models.layers import mlp as mlp_module


@pytest.fixture(autouse=True, params=['kernel', 'plain operators'])
def activation_path(request, monkeypatch):
    """Every test runs twice: with the CPU kernel of DAT++'s conv and GELU where it builds, and
    without it (what runs where it does not build, or for dtypes it does not take)."""
    if request.param == 'plain operators':
        monkeypatch.setattr(mlp_module, 'mlp_activation_kernel', lambda device, dtype: None)
    elif request.node.get_closest_marker('gpu'):
        pytest.skip('the kernel runs on CPU only')
    elif not cpu_dwconv_gelu.kernel_available():
        pytest.skip('the CPU kernel does not build here')
    return request.param


def plain_mlp(mlp: MLP, x: torch.Tensor) -> torch.Tensor:
    """The MLP spelt out with modules and out-of-place operators: what autograd would record."""
    hidden = mlp.fc1(x)
    if mlp.dwconv is not None:
        hidden = hidden + mlp.dwconv(hidden.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    return mlp.fc2(F.gelu(hidden))


def make_mlp(dwconv: bool, dtype=torch.float64, dims: int = 6, hidden: int = 20) -> MLP:
    torch.manual_seed(0)
    mlp = MLP(dims, hidden, dwconv=dwconv).to(dtype)
    for param in mlp.parameters():  # nonzero biases, so that their gradients are checked too
        torch.nn.init.normal_(param, std=0.5)
    return mlp


def outputs_and_grads(fn, mlp: MLP, x: torch.Tensor, grad_out: torch.Tensor):
    x = x.detach().requires_grad_()
    out = fn(x)
    params = [p for p in mlp.parameters() if p.requires_grad]
    return [out] + list(torch.autograd.grad(out, [x] + params, grad_out))


@pytest.mark.parametrize('dwconv', [False, True])
@pytest.mark.parametrize('shape', [(2, 5, 7), (1, 1, 9), (3, 4, 1)])
def test_float64_outputs_and_gradients_are_the_plain_operators(dwconv, shape):
    mlp = make_mlp(dwconv)
    x = torch.randn(*shape, 6, dtype=torch.float64)
    grad_out = torch.randn(*shape, 6, dtype=torch.float64)
    got = outputs_and_grads(mlp, mlp, x, grad_out)
    want = outputs_and_grads(lambda t: plain_mlp(mlp, t), mlp, x, grad_out)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('dwconv', [False, True])
def test_gradcheck(dwconv):
    mlp = make_mlp(dwconv, dims=3, hidden=4)
    names = [name for name, _ in mlp.named_parameters()]
    inputs = (torch.randn(1, 3, 4, 3, dtype=torch.float64, requires_grad=True), ) + tuple(
        p.detach().clone().requires_grad_() for p in mlp.parameters())

    def call(x, *params):  # the module's own forward, as a function of its input and parameters
        return torch.func.functional_call(mlp, dict(zip(names, params)), (x, ))

    assert torch.autograd.gradcheck(call, inputs)


@pytest.mark.parametrize('dwconv', [False, True])
def test_frozen_parts_get_no_gradient_and_the_rest_the_plain_ones(dwconv):
    mlp = make_mlp(dwconv)
    mlp.fc2.requires_grad_(False)
    if dwconv:
        mlp.dwconv.bias.requires_grad_(False)
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    grad_out = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    got = outputs_and_grads(mlp, mlp, x, grad_out)
    want = outputs_and_grads(lambda t: plain_mlp(mlp, t), mlp, x, grad_out)
    assert len(got) == (5 if dwconv else 4)  # output, x, fc1 weight and bias (and the conv weight)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    # only the weights: the input needs no gradient
    out = mlp(x)
    (grad_weight, ) = torch.autograd.grad(out, [mlp.fc1.weight], grad_out)
    torch.testing.assert_close(grad_weight, torch.autograd.grad(plain_mlp(mlp, x), [mlp.fc1.weight], grad_out)[0])


def saved_activation_bytes(fn, mlp: MLP, x: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps for backward, parameters left out."""
    params = {p.untyped_storage().data_ptr() for p in mlp.parameters()}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return sum(storages.values())


@pytest.mark.parametrize('dwconv', [False, True])
def test_training_keeps_one_hidden_tensor(dwconv):
    mlp = make_mlp(dwconv, dtype=torch.float32)
    x = torch.randn(2, 8, 9, 6, requires_grad=True)
    hidden_bytes = 2 * 8 * 9 * 20 * 4
    input_bytes = 2 * 8 * 9 * 6 * 4
    assert saved_activation_bytes(mlp, mlp, x) == input_bytes + hidden_bytes  # fc1's input and h
    # the plain operators keep two (v1: h and GELU's output) or three (also the conv's sum)
    plain = saved_activation_bytes(lambda t: plain_mlp(mlp, t), mlp, x)
    assert plain == input_bytes + (3 if dwconv else 2) * hidden_bytes


@pytest.mark.parametrize('dwconv', [False, True])
def test_autocast_matches_the_plain_operators(dwconv):
    mlp = make_mlp(dwconv, dtype=torch.float32)
    x = torch.randn(2, 5, 6, 6)
    grad_out = torch.randn(2, 5, 6, 6)
    results = []
    for fn in (mlp, lambda t: plain_mlp(mlp, t)):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            results.append(outputs_and_grads(fn, mlp, x, grad_out.bfloat16()))
    got, want = results
    assert got[0].dtype == torch.bfloat16
    for g, w in zip(got, want):
        assert g.dtype == w.dtype  # parameter gradients in float32, as autocast gives them
        torch.testing.assert_close(g, w, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize('dwconv', [False, True])
def test_inference_in_place_gives_the_plain_output_and_keeps_the_input(dwconv):
    mlp = make_mlp(dwconv)
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    before = x.clone()
    with torch.no_grad():
        got = mlp(x)
        want = plain_mlp(mlp, x)
    with torch.inference_mode():
        in_inference_mode = mlp(x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(in_inference_mode, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(x, before)


def test_checkpointed_block_gets_the_same_gradients():
    mlp = make_mlp(True)
    x = torch.randn(1, 4, 4, 6, dtype=torch.float64)
    grad_out = torch.randn(1, 4, 4, 6, dtype=torch.float64)
    got = outputs_and_grads(
        lambda t: torch.utils.checkpoint.checkpoint(mlp, t, use_reentrant=False), mlp, x, grad_out)
    want = outputs_and_grads(lambda t: plain_mlp(mlp, t), mlp, x, grad_out)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('dwconv', [False, True])
def test_second_derivatives_are_the_plain_operators(dwconv):
    mlp = make_mlp(dwconv)
    x = torch.randn(1, 3, 4, 6, dtype=torch.float64)
    results = []
    for fn in (mlp, lambda t: plain_mlp(mlp, t)):
        leaf = x.clone().requires_grad_()
        (grad_x, ) = torch.autograd.grad(fn(leaf).pow(2).sum(), [leaf], create_graph=True)
        results.append(torch.autograd.grad(grad_x.pow(2).sum(), [leaf] + list(mlp.parameters())))
    for g, w in zip(*results):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


@pytest.mark.gpu
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_autocast_matches_the_plain_operators_on_gpu(dtype):
    """DAT-T++'s stage-1 MLP at 800x1333 (200 x 334, 64 channels, 256 hidden), batch 2, under
    CUDA autocast: outputs and every gradient as the plain operators give them, in their dtypes,
    with less memory kept for backward."""
    mlp = make_mlp(True, dtype=torch.float32, dims=64, hidden=256).cuda()
    x = torch.randn(2, 200, 334, 64, device='cuda')
    grad_out = torch.randn(2, 200, 334, 64, device='cuda').to(dtype)
    results, kept = [], []
    for fn in (mlp, lambda t: plain_mlp(mlp, t)):
        with torch.autocast('cuda', dtype=dtype):
            torch.cuda.synchronize()
            start = torch.cuda.memory_allocated()
            leaf = x.detach().requires_grad_()
            out = fn(leaf)
            kept.append(torch.cuda.memory_allocated() - start)
            results.append([out] + list(torch.autograd.grad(out, [leaf] + list(mlp.parameters()), grad_out)))
    for got, want in zip(*results):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    assert kept[0] < kept[1] * 0.6, kept  # one hidden tensor (and the output) against three


def test_a_kernel_is_refused_for_an_mlp_without_the_conv():
    mlp = make_mlp(False)
    with pytest.raises(ValueError, match='dwconv=True'):
        mlp.from_hidden(torch.zeros(1, 2, 2, 20, dtype=torch.float64), cpu_dwconv_gelu)
