"""Recording the deformable attention blocks: exactly what they computed, and nothing otherwise."""
import pytest
import torch

from mmdat.models import DAT
from mmdat.models.layers import DeformableAttention
from mmdat.models.utils import deformable_blocks, record_deformable_attention
from tests.conftest import small_backbone

ARCH = dict(embed_dims=16, depths=(1, 1, 4, 2), num_heads=(1, 2, 4, 4), offset_groups=(0, 0, 2, 4))


def tiny_dat(attn_impl='sdpa'):
    model = small_backbone(arch=ARCH, attn_impl=attn_impl).eval()
    # Larger offset weights than at initialisation, so that the offsets are not all tiny.
    for module in model.modules():
        if isinstance(module, DeformableAttention):
            module.offset_net.proj.weight.data.normal_(0, 1.0)
    return model


def capture_outputs(module, name):
    """Forward hook storing the module's output (or input with name 'input')."""
    store = {}

    def hook(_, inputs, output):
        store[name] = inputs[0] if name == 'input' else output

    return store, module.register_forward_hook(hook)


def test_deformable_blocks_lists_stage_and_block():
    assert deformable_blocks(tiny_dat()) == [(2, 1), (2, 3), (3, 1)]


def test_positions_are_those_of_sampling_positions():
    model = tiny_dat()
    images = torch.randn(2, 3, 72, 100)  # batch of 2, map 5x7 at stage 3 and 3x4 at stage 4
    attn = model.stages[2].blocks[3].attn
    store, handle = capture_outputs(attn.proj_q, 'query')
    with torch.no_grad(), record_deformable_attention(model, [(2, 3)], with_attention=False) as records:
        model(images)
    handle.remove()
    assert len(records) == 1
    record = records[0]
    assert (record.stage, record.block, record.map_size, record.attention) == (2, 3, (5, 7), None)
    reference, positions = attn.sampling_positions(store['query'])
    assert torch.equal(record.reference, reference)
    assert record.positions.shape == (2, 2, 5, 7, 2)
    # (B * groups) rows of the module are (batch, group) in that order
    assert torch.equal(record.positions.flatten(0, 1), positions)
    assert (record.positions - record.reference).abs().max() > 0.05  # offsets are not all ~0


@pytest.mark.parametrize('attn_impl', ['reference', 'sdpa'])
def test_attention_reproduces_the_block_output(attn_impl):
    model = tiny_dat(attn_impl)
    attn = model.stages[3].blocks[1].attn
    values, v_handle = capture_outputs(attn.proj_v, 'value')
    mixed, o_handle = capture_outputs(attn.proj_out, 'input')
    with torch.no_grad(), record_deformable_attention(model, [(3, 1)]) as records:
        model(torch.randn(1, 3, 96, 64))
    v_handle.remove()
    o_handle.remove()
    attention = records[0].attention
    heads = attn.num_heads
    assert attention.shape == (1, heads, 6, 6)
    torch.testing.assert_close(attention.sum(-1), torch.ones(1, heads, 6))
    value = values['value'].view(1, 6, heads, -1).transpose(1, 2)
    out = (attention @ value).transpose(1, 2).reshape(1, 6, -1)
    expected = mixed['input'].reshape(1, 6, -1)
    if attn_impl == 'reference':  # the same float32 operations as the module's
        assert torch.equal(out, expected)
    else:
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_query_indices_keep_those_rows():
    model = tiny_dat()
    images = torch.randn(1, 3, 80, 80)
    with torch.no_grad(), record_deformable_attention(model, [(2, 1)]) as full:
        model(images)
    with torch.no_grad(), record_deformable_attention(model, [(2, 1)], query_indices=[24, 3]) as rows:
        model(images)
    # a matmul with fewer rows may round differently
    torch.testing.assert_close(rows[0].attention, full[0].attention[:, :, [24, 3]], rtol=1e-6, atol=1e-7)
    assert rows[0].query_indices == [24, 3]


def test_recording_changes_nothing_and_leaves_nothing_behind():
    model = tiny_dat()
    images = torch.randn(1, 3, 64, 64)
    modules = [m for m in model.modules() if isinstance(m, DeformableAttention)]
    attributes = [set(vars(m)) for m in modules]
    with torch.no_grad():
        before = model(images)
        with record_deformable_attention(model) as records:
            during = model(images)
            assert all(m.recorder is not None for m in modules)
        after = model(images)
    assert len(records) == 3
    for a, b, c in zip(before, during, after):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert all(m.recorder is None for m in modules)
    assert [set(vars(m)) for m in modules] == attributes
    # no tensor kept on the modules besides parameters and buffers
    assert not [k for m in modules for k, v in vars(m).items() if isinstance(v, torch.Tensor)]
    assert len(records) == 3  # later passes are not recorded


def test_recorder_is_removed_when_the_forward_pass_fails():
    model = tiny_dat()
    with pytest.raises(ValueError, match='outside the 2x2 map'):
        with record_deformable_attention(model, [(2, 1)], query_indices=[4]):
            model(torch.randn(1, 3, 32, 32))
    assert model.stages[2].blocks[1].attn.recorder is None


def test_invalid_requests():
    model = tiny_dat()
    with pytest.raises(ValueError, match=r'\(2, 0\).*are \[\(2, 1\), \(2, 3\), \(3, 1\)\]'):
        with record_deformable_attention(model, [(2, 0)]):
            pass
    with pytest.raises(ValueError, match='need with_attention=True'):
        with record_deformable_attention(model, query_indices=[0], with_attention=False):
            pass
    with pytest.raises(ValueError, match='at least one query'):
        with record_deformable_attention(model, query_indices=[]):
            pass
    with pytest.raises(TypeError, match='DAT backbone'):
        with record_deformable_attention(torch.nn.Linear(2, 2)):
            pass
    with record_deformable_attention(model, [(2, 1)]):
        with pytest.raises(RuntimeError, match='already being recorded'):
            with record_deformable_attention(model):
                pass
    assert model.stages[2].blocks[1].attn.recorder is None


def test_datpp_records_queries_of_the_map_and_keys_of_the_coarser_grid():
    """In DAT++ the reference grid is coarser than the query map: both sizes are kept apart."""
    torch.manual_seed(0)
    model = DAT(arch=dict(version=2, embed_dims=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 4),
                          offset_groups=(1, 1, 2, 2), block_types=('ND', 'ND', 'ND', 'DD')),
                drop_path_rate=0.0, attn_impl='reference').eval()
    # stage 2, block 1: reference points every 4 pixels of a 12x16 map
    last_query = 12 * 16 - 1  # beyond the reference grid's 3x4 points
    with torch.no_grad(), record_deformable_attention(model, [(1, 1)],
                                                      query_indices=[0, last_query]) as records:
        model(torch.randn(1, 3, 96, 128))
    record, = records
    assert record.map_size == (12, 16)
    grid = tuple(record.reference.shape[:2])
    assert grid == (3, 4)
    assert record.positions.shape == (1, 1, *grid, 2)
    assert record.attention.shape == (1, 2, 2, 3 * 4)
    torch.testing.assert_close(record.attention.sum(-1), torch.ones(1, 2, 2))
