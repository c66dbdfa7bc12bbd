"""torch.compile of DAT at three input sizes, in inference and in a training step.

Compiling is slow on small CPUs, so the backbones are tiny arch dicts compiled per size
(``dynamic=False``) through AOT autograd without code generation (``aot_eager``: the graphs,
guards and backward that inductor would get), and inductor itself compiles, with dynamic sizes,
the layers whose padding arithmetic broke its dynamic-shape recompiles (``%`` of a symbolic size).
"""
import pytest
import torch
import torch.nn as nn

from mmdat.models.backbones.dat import ConvDownsample
from mmdat.models.layers import WindowAttention
from tests.conftest import MINIMAL_ARCHS, small_backbone

# Compiling takes minutes on a small CPU, and inductor starts compiler processes.
pytestmark = pytest.mark.slow

# whole windows at 64x96; padding and a 2x4 last stage at 100x84; 2x7 last stage at 36x200
SIZES = [(64, 96), (100, 84), (36, 200)]


def loss_and_grads(model, x):
    outputs = model(x)
    loss = sum(out.square().mean() for out in outputs)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    return outputs, grads


@pytest.mark.parametrize('version', [1, 2], ids=['v1', 'v2'])
def test_compiled_backbone_at_three_sizes(version):
    torch._dynamo.reset()
    model = small_backbone(arch=MINIMAL_ARCHS[version])
    compiled = torch.compile(model, backend='aot_eager', dynamic=False, fullgraph=True)
    for size in SIZES:
        x = torch.randn(1, 3, *size)
        outputs, grads = loss_and_grads(compiled, x)  # a training step: forward and backward
        expected, expected_grads = loss_and_grads(model, x)
        for out, ref in zip(outputs, expected):
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        assert len(grads) == len(expected_grads) == len(list(model.parameters()))
        for grad, ref in zip(grads, expected_grads):
            torch.testing.assert_close(grad, ref, atol=1e-5, rtol=1e-4)
    model.eval()
    with torch.no_grad():
        for size in SIZES:
            x = torch.randn(2, 3, *size)
            for out, ref in zip(compiled(x), model(x)):
                torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_inductor_compiles_padding_for_any_size():
    """Inductor with dynamic sizes, where it failed on ``-size % stride`` (the automatic dynamic
    recompile at a second size compiles the same symbolic code): one compile, three sizes, a
    training step each."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(ConvDownsample(3, 8, 4, bias=True), WindowAttention(8, 2, 7, 4, 'reference'))
    compiled = torch.compile(model, dynamic=True)
    for size in SIZES:
        x = torch.randn(1, 3, *size, requires_grad=True)
        out = compiled(x)
        out.square().mean().backward()
        grad, x.grad = x.grad, None
        ref = model(x)
        ref.square().mean().backward()
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grad, x.grad, atol=1e-6, rtol=1e-4)
