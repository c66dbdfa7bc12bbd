"""mmdat.utils.benchmark: shapes from built models, timing, cells in fresh processes."""
import pytest
import torch

from mmdat.models import DAT
from mmdat.utils import benchmark


def test_op_inputs_have_the_stage3_shapes_of_the_built_model():
    assert benchmark.op_shapes('tiny', (800, 1333), 2) == dict(
        batch=2, heads=12, groups=3, height=50, width=84, head_dims=32, table=(12, 27, 27))
    q, k, v, queries, positions, table = benchmark.op_inputs('tiny', (800, 1333), 2, torch.float32, 'cpu')
    assert q.shape == k.shape == v.shape == (2, 12, 50 * 84, 32)
    assert queries.shape == (50, 84, 2) and positions.shape == (2 * 3, 4200, 2)
    assert table.shape == (12, 27, 27)
    assert (positions - queries.view(4200, 2)).abs().amax() <= 2 / 50 + 1e-6
    # DAT++ keeps its offset groups per stage: read from the module, not from a formula
    assert benchmark.op_shapes('tiny++', (224, 224), 1)['groups'] == 4


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
                amp='none', batch=1, warmup=0, repeats=1, isolated=True, threads=1, memory_limit_gib=2)
    assert benchmark.run_cell(cell) == dict(error='out of memory')
    cell.update(size=(64, 64))
    assert benchmark.run_cell(cell)['seconds'] > 0


def test_bad_cells():
    with pytest.raises(ValueError, match='cell kind must be one of'):
        benchmark.run_cell(dict(kind='nope', isolated=False))
    with pytest.raises(ValueError, match='for isolated cells'):
        benchmark.run_here(dict(kind='op', isolated=False, memory_limit_gib=1))
    with pytest.raises(ValueError, match="model type must be 'dat' or 'swin'"):
        benchmark.build_model(dict(type='vit'))


def test_markdown_table():
    assert benchmark.markdown_table(['a', 'b'], [['1', '2']], right=(1, )) == ['| a | b |', '| --- | ---: |', '| 1 | 2 |']
