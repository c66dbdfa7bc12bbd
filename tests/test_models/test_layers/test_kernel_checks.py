"""Kernels check themselves where they run: the C++ kernel patched to raise and to return wrong
values ('auto' warns once and falls back, an explicit 'fused' raises one line); the check's
tolerance, cost and the ways it is skipped. (The Triton kernel's: test_triton_deformable.py.)"""
import time
import warnings

import pytest
import torch

from mmdat.models.layers import DeformableAttention, cpu_deformable, cpu_kernel_available, policy
from mmdat.models.layers.policy import CPU_DEFORMABLE, DEFORMABLE, kernel_error, resolve_attn_impl, run_self_check

pytestmark = pytest.mark.skipif(not cpu_kernel_available(), reason='the CPU kernel does not build here')
REAL_KERNEL = cpu_deformable.cpu_deformable_attention


@pytest.fixture(autouse=True)
def fresh_checks(monkeypatch):
    """No check run yet in this process, and none skipped."""
    monkeypatch.setattr(policy, '_CHECKED', {})
    monkeypatch.setattr(policy, '_WARNED', set())
    monkeypatch.delenv('MMDAT_SKIP_KERNEL_CHECK', raising=False)


def raising(*args):
    raise RuntimeError('illegal instruction\n(a second line)')


def off_by_one_percent(*args):
    return REAL_KERNEL(*args) * 1.01


def run_module(impl):
    """A deformable block on a 32 x 32 map: 32 x 1,024 scores a query row, where 'auto' runs
    the kernel."""
    torch.manual_seed(0)
    module = DeformableAttention(16, 4, 2, 3, table_size=5, attn_impl=impl)
    with torch.no_grad():
        return module(torch.randn(1, 32, 32, 16))


@pytest.mark.parametrize('broken,error', [(raising, 'RuntimeError: illegal instruction'),
                                          (off_by_one_percent, 'output: relative error 0.01 > 1e-04')])
def test_a_broken_kernel_warns_once_and_auto_falls_back(monkeypatch, broken, error):
    monkeypatch.setattr(cpu_deformable, 'cpu_deformable_attention', broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        auto = run_module('auto')
        again = run_module('auto')
    messages = [str(w.message) for w in caught if 'self-check' in str(w.message)]
    assert len(messages) == 1 and '\n' not in messages[0], messages
    assert 'C++ deformable attention kernel failed its self-check on cpu float32' in messages[0]
    assert error in messages[0] and 'MMDAT_SKIP_KERNEL_CHECK=1' in messages[0]
    # 'auto' runs the materialised bias from then on: SDPA for 1,024 keys in inference
    assert torch.equal(auto, run_module('sdpa')) and torch.equal(again, auto)
    # float64 is checked on its own
    assert kernel_error(CPU_DEFORMABLE, torch.device('cpu'), torch.float64, warn=False) is not None


@pytest.mark.parametrize('broken,error', [(raising, 'RuntimeError: illegal instruction'),
                                          (off_by_one_percent, 'relative error')])
def test_a_broken_kernel_asked_for_explicitly_is_one_error(monkeypatch, broken, error):
    monkeypatch.setattr(cpu_deformable, 'cpu_deformable_attention', broken)
    with pytest.raises(RuntimeError) as raised:
        run_module('fused')
    message = str(raised.value)
    assert '\n' not in message and error in message
    assert message.startswith("attn_impl='fused': the C++ deformable attention kernel failed its self-check "
                              'on cpu float32')


def test_a_working_kernel_passes_and_is_checked_once(monkeypatch):
    calls = []

    def counting(*args):
        calls.append(args[0].shape)
        return REAL_KERNEL(*args)

    monkeypatch.setattr(cpu_deformable, 'cpu_deformable_attention', counting)
    run_module('auto')
    run_module('fused')
    checks = [shape for shape in calls if shape[2] == 15]  # the check's 3 x 5 queries
    assert len(checks) == 1 and len(calls) == 3
    assert policy._CHECKED == {(CPU_DEFORMABLE.name, 'cpu', torch.float32): None}


def test_no_check_with_the_variable_or_while_tracing(monkeypatch):
    cpu = torch.device('cpu')
    monkeypatch.setattr(cpu_deformable, 'cpu_deformable_attention', raising)
    monkeypatch.setenv('MMDAT_SKIP_KERNEL_CHECK', '1')
    assert resolve_attn_impl('fused', DEFORMABLE, cpu, torch.float32, 49, False, 7).kernel is CPU_DEFORMABLE
    monkeypatch.delenv('MMDAT_SKIP_KERNEL_CHECK')
    monkeypatch.setattr(policy, 'is_tracing', lambda: True)
    assert kernel_error(CPU_DEFORMABLE, cpu, torch.float32) is None
    assert policy._CHECKED == {}  # nothing ran, nothing recorded


def test_the_check_works_under_inference_mode_and_autocast():
    with torch.inference_mode(), torch.autocast('cpu', dtype=torch.bfloat16):
        assert run_self_check(CPU_DEFORMABLE, torch.device('cpu'), torch.float32) is None


def test_the_check_leaves_the_global_random_state_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    run_self_check(CPU_DEFORMABLE, torch.device('cpu'), torch.float32)
    assert torch.equal(torch.rand(3), expected)


def test_cost_of_the_check():
    """Well under a second per (kernel, device type, dtype), once per process (the kernel built)."""
    cpu = torch.device('cpu')
    run_self_check(CPU_DEFORMABLE, cpu, torch.float32)  # warm: libraries loaded
    for dtype in (torch.float32, torch.float64):
        start = time.perf_counter()
        assert run_self_check(CPU_DEFORMABLE, cpu, dtype) is None
        assert time.perf_counter() - start < 0.5


def test_the_first_check_may_run_inside_a_checkpointed_block():
    """Non-reentrant checkpointing counts the tensors saved in the forward it recomputes; the
    check runs in the first forward only, so its own tensors must not count (they made every
    first training step with `with_cp=True` fail in backward)."""
    torch.manual_seed(0)
    module = DeformableAttention(16, 4, 2, 3, table_size=5, attn_impl='auto')
    x = torch.randn(1, 32, 32, 16, requires_grad=True)
    out = torch.utils.checkpoint.checkpoint(module, x, use_reentrant=False)
    out.sum().backward()
    assert policy._CHECKED == {(CPU_DEFORMABLE.name, 'cpu', torch.float32): None}
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_a_checkpointed_backbone_trains_from_its_first_step():
    from tests.conftest import small_backbone
    for version in (1, 2):
        model = small_backbone(version, with_cp=True)
        loss = sum(out.mean() for out in model(torch.randn(1, 3, 160, 160)))
        loss.backward()
    assert policy._CHECKED  # the kernels were checked inside the checkpointed blocks
    assert all(param.grad is not None for param in model.parameters())
