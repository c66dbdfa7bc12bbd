"""tools/analysis_tools: get_flops.py and benchmark.py at tiny sizes on CPU."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.analysis import FlopAnalyzer

from mmdat.models.layers import cpu_dwconv_gelu, cpu_kernel_available
from mmdat.utils import benchmark as lib
from tests.conftest import TEST_CONFIGS, load_tool


get_flops = load_tool('analysis_tools/get_flops.py')
benchmark = load_tool('analysis_tools/benchmark.py')


def test_sdpa_flop_handle_counts_both_matmuls():
    class Attention(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v)

    q, k, v = torch.randn(3, 2, 5, 8), torch.randn(3, 2, 7, 8), torch.randn(3, 2, 7, 4)
    analyzer = FlopAnalyzer(Attention(), (q, k, v))
    analyzer.set_op_handle('aten::scaled_dot_product_attention', get_flops.sdpa_flop_jit)
    assert analyzer.total() == 3 * 2 * 5 * 7 * (8 + 4)  # q k^T and P v, one multiply-add each


def test_dat_tiny_flops_match_the_paper(capsys):
    result = get_flops.main(['tiny'])
    assert 4.5e9 < result['flops'] < 4.7e9  # paper: 4.6 G at 224x224
    assert result['by_op']['scaled_dot_product_attention'] > 0.1e9
    assert result['by_op']['grid_sampler'] > 0  # sampled keys and the sampled position bias
    assert 27e6 < result['params'] < 28e6
    assert 'FLOPs (multiply-adds): 4.59 G' in capsys.readouterr().out


def test_flops_of_a_whole_config():
    config = str(TEST_CONFIGS / 'retinanet_dat_shapes_tiny.py')
    whole = get_flops.main([config, '--shape', '64', '96'])
    assert whole['flops'] > 0 and whole['by_op']['conv'] > 0 and whole['params'] > 0
    with pytest.raises(SystemExit, match='target must be one of'):
        get_flops.main(['tiny.yaml'])


def test_backbone_benchmark_table_on_cpu(threads):
    rows, table = benchmark.main(['--archs', 'tiny', '--sizes', '32', '--batch', '1', '--warmup', '0',
                                  '--repeats', '1', '--no-isolate', '--threads', '1',
                                  '--paths', 'reference', 'sdpa', 'fused'])
    assert [(r['mode'], r['path']) for r in rows] == [
        (m, p) for m in ('infer', 'train') for p in ('reference', 'sdpa', 'fused')]
    for row in rows:  # 'fused' runs too: the C++ kernel on CPU (Triton's interpreter without it)
        assert row['seconds'] > 0 and 'error' not in row
    assert 'Device: ' in table and '| tiny | 32x32 | train | fused |' in table


def test_backbone_benchmark_with_checkpointing(threads):
    rows, table = benchmark.main(['--archs', 'tiny', '--sizes', '32', '--batch', '1', '--warmup', '0',
                                  '--repeats', '1', '--no-isolate', '--threads', '1', '--paths', 'auto',
                                  '--modes', 'train', '--with-cp'])
    assert rows[0]['seconds'] > 0 and 'with_cp=True; ' in table


def test_interleaved_timing(threads):
    rows, table = benchmark.main(['--archs', 'tiny', '--sizes', '32', '--batch', '1', '--warmup', '0',
                                  '--repeats', '2', '--no-isolate', '--threads', '1', '--interleave',
                                  '--modes', 'infer', '--paths', 'reference', 'auto', 'fused'])
    assert [r['path'] for r in rows] == ['reference', 'auto', 'fused']
    assert rows[0]['seconds'] > 0 and rows[1]['seconds'] > 0 and rows[1]['peak_bytes'] is None
    assert rows[2]['seconds'] > 0 and 'paths in turns' in table


def test_op_benchmark_on_cpu():
    rows, table = benchmark.main(['--op', '--archs', 'tiny', '--sizes', '64', '--batch', '1', '--warmup', '0',
                                  '--repeats', '1', '--no-isolate', '--modes', 'train'])
    assert {r['path'] for r in rows if 'seconds' in r} == {'reference', 'sdpa', 'fused', 'sdpa-no-bias'}
    assert '| tiny | 64x64 | 16 | 16 | fwd+bwd | sdpa-no-bias |' in table


@pytest.mark.skipif(not cpu_kernel_available(), reason='the CPU kernel does not build here')
def test_op_and_scaling_tables_of_a_datpp_arch(threads):
    """DAT++'s op at its own shapes: the stage's queries against the strided grid of keys."""
    _, table = benchmark.main(['--op', '--archs', 'tiny++', '--sizes', '64', '--batch', '1', '--warmup', '0',
                               '--repeats', '1', '--no-isolate', '--modes', 'infer', '--paths', 'fused'])
    assert '| tiny++ | 64x64 | 16 | 4 | fwd | fused |' in table
    rows, table = benchmark.main(['--op', '--scaling', '--device', 'cpu', '--archs', 'tiny++', '--sizes', '64',
                                  '--batch', '1', '--warmup', '0', '--repeats', '1', '--no-isolate',
                                  '--modes', 'infer', '--threads', '2'])
    assert [r['stage'] for r in rows] == [1, 2, 3, 4]
    assert '| tiny++ | 64x64 | 1 (2, 16x16, keys 2x2) | fwd | 32 |' in table


@pytest.mark.skipif(not cpu_kernel_available(), reason='the CPU kernel does not build here')
def test_op_scaling_table_on_cpu(threads):
    rows, table = benchmark.main(['--op', '--scaling', '--device', 'cpu', '--archs', 'tiny', '--sizes', '64',
                                  '--batch', '1', '--warmup', '0', '--repeats', '1', '--no-isolate',
                                  '--threads', '2'])
    assert [r['stage'] for r in rows] == [3, 4]
    assert '1 and 2 threads and torch.mm in turns' in table
    # one line per stage and mode, the tasks from the kernel's own split (12 heads x 4 rows; 24 x 2)
    assert '| tiny | 64x64 | 3 (12, 4x4) | fwd | 48 |' in table
    assert '| tiny | 64x64 | 3 (12, 4x4) | fwd+bwd | 48 fwd, 2 bwd |' in table
    assert '| tiny | 64x64 | 4 (24, 2x2) | fwd+bwd | 48 fwd, 2 bwd |' in table
    assert len([line for line in table.splitlines() if line.startswith('| tiny |')]) == 4


def test_blocks_benchmark_times_each_attention_module_on_its_backbone_input(threads):
    rows, table = benchmark.main(['--blocks', '--archs', 'tiny', '--sizes', '64x96', '--batch', '1',
                                  '--warmup', '0', '--repeats', '1', '--no-isolate', '--threads', '1',
                                  '--paths', 'reference', 'auto', 'fused'])
    timed = [r for r in rows if 'seconds' in r]
    assert len(timed) == 2 * 3 * 8  # modes x paths x (two blocks of four stages)
    first = [r for r in timed if (r['mode'], r['path']) == ('infer', 'reference')]
    assert [r['block'] for r in first] == ['window', 'shifted window'] * 2 + ['window', 'deformable'] * 2
    assert [r['map'] for r in first] == ['16x24'] * 2 + ['8x12'] * 2 + ['4x6'] * 2 + ['2x3'] * 2
    assert all(r['seconds'] > 0 for r in timed)
    assert not [r for r in rows if 'error' in r]
    assert '| tiny | 64x96 | 3 | deformable | 4x6 | fwd+bwd | reference |' in table
    assert 'memory: not measured (--blocks)' in table


@pytest.mark.skipif(not cpu_dwconv_gelu.kernel_available(), reason='the CPU kernel does not build here')
def test_mlps_benchmark_times_each_stages_mlp_with_and_without_the_kernel(threads, monkeypatch):
    calls, per_step = [], {}
    real = cpu_dwconv_gelu.activation
    monkeypatch.setattr(cpu_dwconv_gelu, 'activation', lambda *args: calls.append(1) or real(*args))
    real_turns = lib.time_in_turns

    def counted_turns(steps, *args):  # each step once more, counting the kernel's calls
        for name, step in steps.items():
            before = len(calls)
            step()
            per_step.setdefault(name, []).append(len(calls) - before)
        return real_turns(steps, *args)

    monkeypatch.setattr(lib, 'time_in_turns', counted_turns)
    rows, table = benchmark.main(['--mlps', '--device', 'cpu', '--archs', 'tiny++', '--sizes', '64x96',
                                  '--batch', '1', '--warmup', '0', '--repeats', '1', '--no-isolate', '--threads', '1'])
    assert [(r['mode'], r['stage'], r['map'], r['channels']) for r in rows] == [
        (mode, stage, side, 128 * 2**stage) for mode in ('infer', 'train')
        for stage, side in zip((1, 2, 3, 4), ('16x24', '8x12', '4x6', '2x3'))]
    assert all(set(r['seconds']) == {'kernel', 'plain operators'} and min(r['seconds'].values()) > 0 for r in rows)
    # the kernel ran in the kernel's steps only: once per inference step, twice per training step
    assert per_step == {'kernel': [1] * 4 + [2] * 4, 'plain operators': [0] * 8}
    assert '| tiny++ | 64x96 | 3 | 4x6 x 1024 | fwd+bwd |' in table
    assert 'kernel and plain operators in turns' in table and 'memory: not measured (--mlps)' in table


def test_cells_follow_the_attention_policy(monkeypatch):
    asked = []

    def no_fused_kernel(name, device, dtype):
        asked.append((name, device.type, dtype))
        return name != 'fused'

    monkeypatch.setattr(benchmark, 'runs_on', no_fused_kernel)
    assert benchmark.skip_reason('sdpa', 'cpu') is None
    assert benchmark.skip_reason('fused', 'cpu') == 'skipped: no fused kernel for cpu float32 here'
    assert benchmark.skip_reason('fused', 'cuda', 'bf16') == 'skipped: no fused kernel for cuda bfloat16 here'
    assert asked == [('sdpa', 'cpu', torch.float32), ('fused', 'cpu', torch.float32),
                     ('fused', 'cuda', torch.bfloat16)]
    monkeypatch.setattr(benchmark, 'runs_on', lambda *args: True)
    assert benchmark.skip_reason('fused', 'cpu') is None
    assert benchmark.skip_reason('natten', 'cpu', arch='tiny') == 'skipped: no neighborhood blocks in tiny'
    assert benchmark.skip_reason('natten', 'cpu', arch='tiny++') is None


def test_op_benchmark_on_cpu_runs_every_path_through_the_model_dispatcher(monkeypatch, threads):
    """Without TRITON_INTERPRET: 'fused' is the C++ kernel, as in the model (the policy's
    kernel for CPU), and 'auto' runs too."""
    monkeypatch.delenv('TRITON_INTERPRET', raising=False)
    rows, table = benchmark.main(['--op', '--archs', 'tiny', '--sizes', '64', '--batch', '1', '--warmup', '0',
                                  '--repeats', '1', '--no-isolate', '--modes', 'infer', '--threads', '1',
                                  '--paths', *benchmark.OP_PATHS])
    if not cpu_kernel_available():
        pytest.skip('the CPU kernel does not build here')
    assert [r['path'] for r in rows] == list(benchmark.OP_PATHS)
    assert all('seconds' in r for r in rows), rows


def test_a_failing_cell_is_an_error_row_whatever_the_exception(monkeypatch):
    def broken(cell):
        raise KeyError('no such thing')

    monkeypatch.setitem(lib.CELL_FUNCTIONS, 'op', broken)
    assert lib.run_here(dict(kind='op', isolated=False)) == dict(error="KeyError: 'no such thing'")


def test_max_size_search():
    def size_of(height):
        return height, height

    tried = []

    def fits_below(limit):
        def fits(size):
            tried.append(size[0])
            return size[0] <= limit
        return fits

    assert benchmark.max_size_height(size_of, fits_below(1000), 224, 4096, 32) == 992
    assert len(tried) < 12
    assert benchmark.max_size_height(size_of, fits_below(10**6), 224, 4096, 32) == 4096
    assert benchmark.max_size_height(size_of, fits_below(100), 224, 4096, 32) is None
    assert benchmark.max_size_height(size_of, fits_below(300), 224, 4096, 32) == 288
    assert benchmark._aspect_size(800) == (800, 1344)


@pytest.mark.slow
def test_peer_table_gives_ratios_to_swin_t(tmp_path):
    """Timing in turns in one process, memory per model in processes of their own."""
    pytest.importorskip('mmdet')
    out = tmp_path / 'peers'  # no extension: written as given
    rows, table = benchmark.main(['--peers', '--models', 'Swin-T', 'DAT-T', '--sizes', '64', '--modes', 'infer',
                                  '--batch', '1', '--warmup', '0', '--repeats', '2', '--threads', '1',
                                  '--device', 'cpu', '--out', str(out)])
    assert [(r['model'], r['mode']) for r in rows] == [('Swin-T', 'infer'), ('DAT-T', 'infer')]
    assert all(r['seconds'] > 0 and r['peak_bytes'] > 0 for r in rows)
    assert '| Swin-T | 64x64 | inference |' in table and '| 1.00x |' in table
    ratio = rows[1]['seconds'] / rows[0]['seconds']
    assert f'| {ratio:.2f}x |' in table and 'models in turns' in table
    assert f'| Swin-T | {ratio:.2f}x |' in table  # the ratio to its own peer, here Swin-T too
    assert out.read_text() == table + '\n'


def test_profile_table_gives_components_and_differences_from_the_peer(threads):
    pytest.importorskip('mmdet')
    rows, table = benchmark.main(['--profile', '--models', 'Swin-T', 'DAT-T', '--sizes', '64', '--modes', 'train',
                                  '--batch', '1', '--warmup', '0', '--repeats', '1', '--threads', '1',
                                  '--device', 'cpu', '--no-isolate'])
    times = rows[0]
    assert set(times) == {'size', 'mode', 'Swin-T', 'DAT-T'}
    assert times['DAT-T']['offsets and sampling'] > 0 and 'offsets and sampling' not in times['Swin-T']
    # Swin has window attention only; DAT-T both, its deformable blocks apart
    assert 'deformable attention op' not in times['Swin-T'] and times['DAT-T']['deformable attention op'] > 0
    line = next(line for line in table.splitlines() if line.startswith('| window attention op |'))
    dat, swin = times['DAT-T']['window attention op'], times['Swin-T']['window attention op']
    assert line.endswith(f', {dat - swin:+.2f} s |')  # DAT-T against its peer
    assert '| deformable attention op |' in table
    assert '| component | Swin-T | DAT-T |' in table and '| profiled step |' in table


def test_out_into_a_missing_folder_fails_before_the_run(tmp_path, capsys):
    with pytest.raises(SystemExit):
        benchmark.main(['--archs', 'tiny', '--sizes', '32', '--out', str(tmp_path / 'missing' / 'table.md')])
    err = capsys.readouterr()
    assert 'does not exist' in err.err and 'Device' not in err.out  # nothing ran
    with pytest.raises(SystemExit):
        benchmark.parse_args(['--out', str(tmp_path)])
    assert 'is a folder' in capsys.readouterr().err


def test_out_writes_the_file_it_names(tmp_path, capsys, threads):
    out = tmp_path / 'table'
    _, table = benchmark.main(['--op', '--archs', 'tiny', '--sizes', '32', '--batch', '1', '--warmup', '0',
                               '--repeats', '1', '--no-isolate', '--modes', 'infer', '--paths', 'sdpa-no-bias',
                               '--threads', '1', '--out', str(out)])
    assert [p.name for p in tmp_path.iterdir()] == ['table']
    assert out.read_text() == table + '\n'
    assert capsys.readouterr().out.endswith(f'Table written to {out.resolve()}\n')


@pytest.mark.parametrize('argv,match', [
    (['--sizes', '16'], 'sides >= 32'),
    (['--sizes', '8x9x10'], 'H or HxW'),
    (['--paths', 'sdpa-no-bias'], 'unknown paths'),
    (['--op', '--paths', 'natten'], 'unknown paths'),  # not a path of the deformable layers
    (['--min-height', '100'], 'multiples of 32'),
    (['--batch', '0'], '--batch'),
    (['--threads', '0'], '--threads'),
    (['--op', '--interleave'], 'backbone table only'),
    (['--peers', '--interleave'], 'backbone table only'),
    (['--peers', '--models', 'Swin-L'], 'invalid choice'),
    (['--profile', '--interleave'], 'backbone table only'),
    (['--profile', '--peers'], 'not allowed with'),
    (['--op', '--with-cp'], 'whole backbones'),
    (['--peers', '--op'], 'not allowed with'),
    (['--blocks', '--op'], 'not allowed with'),
    (['--mlps', '--blocks'], 'not allowed with'),
    (['--mlps', '--device', 'cpu', '--archs', 'tiny'], 'DAT v1 archs'),
    (['--mlps', '--device', 'cpu', '--archs', 'tiny++', '--paths', 'auto'], 'no --paths'),
    (['--mlps', '--device', 'cpu', '--archs', 'tiny++', '--with-cp'], 'whole backbones'),
    (['--mlps', '--device', 'cpu', '--archs', 'tiny++', '--interleave'], 'backbone table only'),
    (['--device', 'cpu', '--memory-limit', '0'], '--memory-limit'),
    (['--scaling', '--device', 'cpu'], 'needs --op and --device cpu'),
    (['--op', '--scaling', '--device', 'cpu', '--paths', 'fused'], 'no --paths or --amp'),
    (['--op', '--scaling', '--device', 'cpu', '--amp', 'bf16'], 'no --paths or --amp'),
    (['--op', '--scaling', '--device', 'cpu', '--threads', '1'], 'N must be >= 2'),
    (['--device', 'cpu', '--memory-limit', '8', '--no-isolate'], '--memory-limit'),
    (['--device', 'cpu', '--malloc', 'kept', '--no-isolate'], '--malloc kept'),
    (['--device', 'cpu', '--malloc', 'jemalloc'], 'invalid choice'),
])
def test_bad_benchmark_arguments(argv, match, capsys):
    with pytest.raises(SystemExit):
        benchmark.parse_args(argv)
    assert match in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the CPU refusal')
def test_max_size_needs_cuda(capsys):
    with pytest.raises(SystemExit):
        benchmark.parse_args(['--max-size'])
    assert 'needs --device cuda' in capsys.readouterr().err
