"""mmdat.utils.benchmark: shapes from built models, timing, cells in fresh processes."""
import platform
import subprocess
import sys
import threading
import time

import pytest
import torch

from mmdat.models import DAT
from mmdat.models.layers import cpu_kernel_available, datpp_query_grid, datpp_reference_grid
from mmdat.utils import benchmark


def test_op_inputs_have_the_stage3_shapes_of_the_built_model():
    assert benchmark.op_shapes('tiny', (800, 1333), 2) == dict(
        batch=2, heads=12, groups=3, height=50, width=84, key_height=50, key_width=84, head_dims=32,
        table=(12, 27, 27), datpp=False)
    q, k, v, queries, positions, table = benchmark.op_inputs('tiny', (800, 1333), 2, torch.float32, 'cpu')
    assert q.shape == k.shape == v.shape == (2, 12, 50 * 84, 32)
    assert queries.shape == (50, 84, 2) and positions.shape == (2 * 3, 4200, 2)
    assert table.shape == (12, 27, 27)
    assert (positions - queries.view(4200, 2)).abs().amax() <= 2 / 50 + 1e-6
    # DAT++ keeps its offset groups per stage: read from the module, not from a formula
    assert benchmark.op_shapes('tiny++', (224, 224), 1)['groups'] == 4


def test_cpu_description_names_the_family_and_vector_width():
    zen4 = ('processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n'
            'model name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512f avx512bw\n\nprocessor\t: 1\n'
            'cpu family\t: 99\nmodel name\t: other\n')
    assert benchmark.cpu_description(zen4) == 'AMD EPYC (family 25, model 17, AVX-512)'
    avx2 = 'cpu family\t: 6\nmodel\t\t: 85\nmodel name\t: Intel Xeon\nflags\t\t: sse avx avx2\n'
    assert benchmark.cpu_description(avx2) == 'Intel Xeon (family 6, model 85, AVX2)'
    arm = 'processor\t: 0\nFeatures\t: fp asimd\nCPU implementer\t: 0x41\n'
    assert benchmark.cpu_description(arm) == (platform.processor() or 'CPU')


def test_capture_inputs_reads_each_module_input_once():
    model = DAT('tiny').to('meta')
    attns = benchmark.attention_modules(model)
    inputs = benchmark.capture_inputs(model, attns, torch.empty(1, 3, 64, 96, device='meta'))
    assert [tuple(inputs[a].shape[1:3]) for a in attns] == [(16, 24)] * 2 + [(8, 12)] * 2 + [(4, 6)] * 2 + [(2, 3)] * 2
    assert [benchmark.block_name(a) for a in attns] == ['window', 'shifted window'] * 2 + ['window', 'deformable'] * 2
    assert not model._forward_pre_hooks and not any(a._forward_pre_hooks for a in attns)


def test_models_in_turns_in_one_process():
    cell = dict(kind='interleaved', size=(32, 32), mode='infer', device='cpu', amp='none', batch=1, warmup=0,
                repeats=2, isolated=False, threads=None,
                models={'a': dict(type='dat', arch='tiny'), 'b': dict(type='dat', arch='tiny', attn_impl='reference')})
    result = benchmark.run_cell(cell)
    assert set(result) == {'a', 'b'} and all(t > 0 for t in result.values())


def test_with_cp_reaches_every_block_of_both_model_types():
    dat = benchmark.build_model(dict(type='dat', arch='tiny'), with_cp=True)
    assert all(block.with_cp for stage in dat.stages for block in stage.blocks)
    assert not benchmark.build_model(dict(type='dat', arch='tiny', with_cp=False), with_cp=True).stages[0].blocks[0].with_cp
    pytest.importorskip('mmdet')
    swin = benchmark.build_model(benchmark.PEER_MODELS['Swin-B'], with_cp=True)
    assert swin.stages[2].blocks[0].with_cp and len(swin.stages[2].blocks) == 18
    assert swin.stages[0].blocks[0].attn.w_msa.num_heads == 4 and swin.num_features == [128, 256, 512, 1024]


def test_time_in_turns_rotates_the_order():
    order = []
    steps = {name: (lambda name=name: order.append(name)) for name in 'abc'}
    benchmark.time_in_turns(steps, 'cpu', warmup=0, repeats=3)
    assert order == list('abc') + list('bca') + list('cab')


@pytest.mark.slow
def test_a_cell_runs_in_a_fresh_process_and_measures_its_peak_memory():
    """The reference op at 512x512 holds (12 heads, 1,024 queries, 1,024 keys) float32 scores,
    48 MiB, a few times over. The peak is this growth: not zero, nor the size of the process
    (torch and mmdat alone are several times the upper bound), nor the size of the process that
    started it (Linux's ru_maxrss keeps that across fork and exec)."""
    parent = torch.ones(512 * 2**20 // 4)  # resident here: 512 MiB, more than the upper bound
    cell = dict(kind='op', arch='tiny', size=(512, 512), mode='infer', path='reference', device='cpu',
                amp='none', batch=1, warmup=0, repeats=1, isolated=True, threads=1)
    result = benchmark.run_cell(cell)
    scores = 12 * 1024 * 1024 * 4
    assert result['seconds'] > 0
    assert scores <= result['peak_bytes'] < 8 * scores
    del parent


@pytest.mark.slow
def test_a_cell_over_its_memory_limit_is_out_of_memory():
    # The reference op at 1536x1536 materialises a 4 GiB bias (12 heads x 9,216^2 x 4 bytes).
    cell = dict(kind='op', arch='tiny', size=(1536, 1536), mode='infer', path='reference', device='cpu',
                amp='none', batch=1, warmup=0, repeats=1, isolated=True, threads=1, memory_limit_gib=1)
    assert benchmark.run_cell(cell) == dict(error='out of memory')
    cell.update(size=(64, 64))
    assert benchmark.run_cell(cell)['seconds'] > 0


def test_malloc_environment_adds_the_tunables():
    assert benchmark.malloc_environment('system', {'A': '1'}) == {'A': '1'}
    kept = benchmark.MALLOC_SETTINGS['kept']
    assert benchmark.malloc_environment('kept', {'A': '1'}) == {'A': '1', 'GLIBC_TUNABLES': kept}
    # a user's own tunables stay
    env = benchmark.malloc_environment('kept', {'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'})
    assert env['GLIBC_TUNABLES'] == 'glibc.malloc.arena_max=2:' + kept
    with pytest.raises(ValueError, match='malloc must be one of'):
        benchmark.malloc_environment('jemalloc')


# Allocates and touches 64 MiB (more than glibc's largest mmap threshold) twice and prints the
# page faults of the second time.
REALLOCATE = """
import resource
def touch():
    block = bytearray(64 << 20)
    block[::4096] = b'x' * len(block[::4096])
touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
touch()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc', reason='the settings are glibc tunables')
def test_kept_malloc_reuses_freed_memory():
    def faults(malloc):
        env = benchmark.malloc_environment(malloc)
        return int(subprocess.run([sys.executable, '-c', REALLOCATE], env=env, capture_output=True, text=True,
                                  check=True).stdout)

    pages = (64 << 20) // 4096
    assert faults('system') >= pages  # a fresh mapping, faulted in page by page
    assert faults('kept') < pages // 100  # the same pages again


def test_bad_cells():
    with pytest.raises(ValueError, match='cell kind must be one of'):
        benchmark.run_cell(dict(kind='nope', isolated=False))
    with pytest.raises(ValueError, match='malloc applies to isolated cells'):
        benchmark.run_cell(dict(kind='op', isolated=False, malloc='kept'))
    with pytest.raises(ValueError, match='for isolated cells'):
        benchmark.run_here(dict(kind='op', isolated=False, memory_limit_gib=1))
    with pytest.raises(ValueError, match="model type must be 'dat' or 'swin'"):
        benchmark.build_model(dict(type='vit'))


def test_markdown_table():
    assert benchmark.markdown_table(['a', 'b'], [['1', '2']], right=(1, )) == ['| a | b |', '| --- | ---: |', '| 1 | 2 |']


def test_deformable_stages_and_their_shapes():
    assert benchmark.deformable_stages('tiny') == [2, 3]
    assert benchmark.op_shapes('tiny', (800, 1333), 1, stage=3) == dict(
        batch=1, heads=24, groups=6, height=25, width=42, key_height=25, key_width=42, head_dims=32,
        table=(24, 13, 13), datpp=False)
    q, *_, positions, table = benchmark.op_inputs('tiny', (64, 64), 1, torch.float32, 'cpu', stage=3)
    assert q.shape == (1, 24, 4, 32) and positions.shape == (6, 4, 2) and table.shape == (24, 13, 13)
    with pytest.raises(ValueError, match='no deformable blocks'):
        benchmark.op_shapes('tiny', (64, 64), 1, stage=0)


def test_datpp_op_shapes_and_inputs_have_the_strided_key_grid():
    """DAT++ samples its keys on the offset network's strided grid: 25 x 42 at every stage of
    DAT-T++ at 800x1333, with the query map of the stage and the tables made for 224 images."""
    assert benchmark.deformable_stages('tiny++') == [0, 1, 2, 3]
    assert benchmark.op_shapes('tiny++', (800, 1333), 2, stage=0) == dict(
        batch=2, heads=2, groups=1, height=200, width=334, key_height=25, key_width=42, head_dims=32,
        table=(2, 111, 111), datpp=True)
    q, k, v, queries, positions, table = benchmark.op_inputs('tiny++', (256, 320), 1, torch.float32, 'cpu', stage=1)
    shapes = benchmark.op_shapes('tiny++', (256, 320), 1, stage=1)
    assert (shapes['height'], shapes['width'], shapes['key_height'], shapes['key_width']) == (32, 40, 8, 10)
    assert q.shape == (1, 4, 32 * 40, 32) and k.shape == v.shape == (1, 4, 80, 32)
    assert torch.equal(queries, datpp_query_grid(32, 40, torch.device('cpu'), torch.float32))
    reference = datpp_reference_grid(8, 10, torch.device('cpu'), torch.float32).view(80, 2)
    assert positions.shape == (2, 80, 2) and positions.abs().amax() <= 1
    moved = (positions - reference).abs().flatten(0, 1).amax(0)  # (y, x): up to one cell of the key grid
    assert torch.all(moved <= torch.tensor([2 / 8, 2 / 10]) + 1e-6)
    assert table.shape == (4, 55, 55)


def test_deformable_op_flops_count_the_kernels_products():
    shapes = dict(batch=2, heads=3, height=4, width=5, key_height=4, key_width=5, head_dims=8)
    products = 2 * 3 * 20 * 20 * 8  # multiply-adds of one (B, heads, N x N x d) product
    assert benchmark.deformable_op_flops(shapes, 'infer') == 2 * 2 * products  # K Q^T and V^T P^T
    # backward recomputes the scores, then V dO^T, P dO, dS Q and K^T dS^T
    assert benchmark.deformable_op_flops(shapes, 'train') == 2 * 7 * products
    # DAT++: queries against the strided key grid
    shapes.update(key_height=2, key_width=3)
    assert benchmark.deformable_op_flops(shapes, 'infer') == 2 * 2 * (2 * 3 * 20 * 6 * 8)


def test_matmul_side_matches_the_flops():
    assert benchmark.matmul_side(2 * 1024**3) == 1024
    assert benchmark.matmul_side(2 * 1000**3) == 1024  # to a multiple of 64
    assert benchmark.matmul_side(10.0) == 64 and benchmark.matmul_side(1e15) == 4096


def test_time_with_threads_sets_the_threads_of_each_step_and_reads_thread_cpu_times():
    before = torch.get_num_threads()
    seen = []

    def spin():  # busy for ~30 ms of CPU on this thread (3 ticks of the kernel's clock)
        seen.append(torch.get_num_threads())
        start = time.thread_time()
        while time.thread_time() - start < 0.03:
            pass

    times = benchmark.time_with_threads({'one': (1, spin), 'two': (2, lambda: seen.append(torch.get_num_threads()))},
                                        warmup=1, repeats=3)
    assert torch.get_num_threads() == before
    assert sorted(seen) == [1] * 4 + [2] * 4
    assert times['one']['seconds'] >= 0.03 and times['two']['seconds'] < times['one']['seconds']
    assert times['one']['busiest_cpu_seconds'] >= 0.01  # the spinning thread's own CPU time
    cpu = benchmark.thread_cpu_seconds()
    assert threading.get_native_id() in cpu and all(t >= 0 for t in cpu.values())


@pytest.mark.skipif(not cpu_kernel_available(), reason='the CPU kernel does not build here')
def test_scaling_cell_times_every_deformable_stage_at_both_thread_counts():
    result = benchmark.run_cell(dict(kind='scaling', arch='tiny', size=(64, 64), batch=1, modes=['infer', 'train'],
                                     device='cpu', amp='none', warmup=0, repeats=1, isolated=False, threads=2))
    assert [s['stage'] for s in result['stages']] == [3, 4]
    stage3 = result['stages'][0]
    assert (stage3['forward_tasks'], stage3['backward_tasks']) == (12 * 4, 2)  # 12 heads x 4 rows
    assert set(stage3['times']) == {'infer 1', 'infer 2', 'train 1', 'train 2', 'matmul 1', 'matmul 2'}
    assert stage3['times']['train 2']['flops'] == benchmark.deformable_op_flops(stage3['shapes'], 'train')
    assert stage3['times']['matmul 1']['flops'] == 2 * stage3['matmul_side'] ** 3
    assert all(t['seconds'] > 0 for t in stage3['times'].values())
    one_thread = dict(kind='scaling', arch='tiny', size=(64, 64), batch=1, modes=['infer'], device='cpu',
                      amp='none', warmup=0, repeats=1, isolated=False, threads=1)
    assert 'threads >= 2' in benchmark.run_cell(one_thread)['error']
