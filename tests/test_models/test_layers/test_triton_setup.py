"""The Triton kernels' set-up: they compile for GPUs without one, and their tests run in Triton's
CPU interpreter in a process of their own (TRITON_INTERPRET=1 applies to them alone)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmdat.models.layers import triton_deformable

pytestmark = pytest.mark.skipif(not triton_deformable.TRITON_AVAILABLE, reason='needs Triton')


# Not slow, though it starts a process: without a GPU it is where the Triton kernels run at all, and
# it runs the tests the marker expression of this run selects (-m "not slow": the fast ones).
@pytest.mark.skipif(torch.cuda.is_available(), reason='with a GPU the kernel tests run on it')
def test_kernel_tests_in_the_interpreter(request):
    """test_triton_deformable.py with TRITON_INTERPRET=1 set from the start of its process:
    Triton picks its interpreter when it is imported."""
    assert os.environ.get('TRITON_INTERPRET') != '1'  # the rest of the suite runs without it
    tests = Path(__file__).with_name('test_triton_deformable.py')
    markers = request.config.getoption('markexpr')
    result = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', str(tests),
                             *(['-m', markers] if markers else [])],
                            env=dict(os.environ, TRITON_INTERPRET='1'), capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert ' passed' in result.stdout and ' failed' not in result.stdout


COMPILE_SCRIPT = '''
import itertools

import triton
from triton.backends.compiler import GPUTarget
from mmdat.models.layers import triton_deformable as fused

def signature(kernel, pointers, constexprs):
    types = {}
    for name in kernel.arg_names:
        if name in constexprs:
            types[name] = 'constexpr'
        elif name in pointers:
            types[name] = '*' + pointers[name]
        else:
            types[name] = 'fp32' if name == 'scale' else 'i32'
    return types

for arch, (dtype, precision) in itertools.product((80, 90), (('bf16', 'tf32'), ('fp16', 'tf32'),
                                                                ('fp32', 'ieee'))):
    constexprs = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=32, PRECISION=precision)
    inputs = dict(Q=dtype, K=dtype, V=dtype, REF='fp32', POS='fp32', TABLE='fp32')
    grads = dict(inputs, DOUT=dtype, LSE='fp32', DELTA='fp32')
    jit = fused.kernels()
    kernels = ((jit._forward_kernel, dict(inputs, OUT=dtype, LSE='fp32')),
               (jit._backward_key_kernel, dict(grads, DK=dtype, DV=dtype, DPOS='fp32', DTABLE='fp32')),
               (jit._backward_query_kernel, dict(grads, DQ=dtype)))
    for kernel, pointers in kernels:
        source = triton.compiler.ASTSource(kernel, signature(kernel, pointers, constexprs), constexprs)
        compiled = triton.compile(source, target=GPUTarget('cuda', arch, 32), options=fused.LAUNCH_OPTIONS)
        assert compiled.asm['cubin'], kernel.__name__
        print(f'sm_{arch}', dtype, kernel.__name__, compiled.metadata.shared)
'''


@pytest.mark.slow
def test_kernels_compile_for_ampere_and_hopper():
    """The kernels compile to sm_80 and sm_90 machine code for every supported dtype (Triton's
    bundled ptxas, no GPU needed): the interpreter accepts some programs the compiler rejects."""
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    env['TRITON_DEFAULT_FP_FUSION'] = '1'
    result = subprocess.run([sys.executable, '-c', COMPILE_SCRIPT], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.split('\n')
    assert len([line for line in lines if line]) == 2 * 3 * 3  # archs x dtypes x kernels
    for line in filter(None, lines):
        assert int(line.split()[-1]) <= 48 * 1024, line  # shared memory per program (bytes)
