"""DAT++ archs of the DAT backbone (what both versions share: test_dat.py; parity with the
official models: test_ckpt_convert_datpp.py)."""
import pytest
import torch

from mmdat.models import DAT
from mmdat.models.layers import DeformableAttentionPP, NeighborhoodAttention, natten_available
from tests.conftest import small_backbone


@pytest.mark.parametrize('arch,dims,heads,groups', [
    ('tiny++', 64, (2, 4, 8, 16), (1, 2, 4, 8)),
    ('small++', 96, (3, 6, 12, 24), (1, 2, 3, 6)),
    ('base++', 128, (4, 8, 16, 32), (2, 4, 8, 16)),
])
def test_datpp_structure_follows_the_official_configs(arch, dims, heads, groups):
    model = DAT(arch)
    assert model.num_features == [dims, 2 * dims, 4 * dims, 8 * dims]
    kinds = [''.join('N' if isinstance(b.attn, NeighborhoodAttention) else
                     'D' if isinstance(b.attn, DeformableAttentionPP) else '?' for b in stage.blocks)
             for stage in model.stages]
    assert kinds == ['ND', 'NDND', 'ND' * 9, 'DD']
    for i, stage in enumerate(model.stages):
        na, deform = stage.blocks[0].attn, stage.blocks[1].attn
        if i < 3:
            assert na.kernel_size == 7 and na.num_heads == heads[i] and na.rpb.shape == (heads[i], 13, 13)
        assert (deform.num_heads, deform.num_groups) == (heads[i], groups[i])
        assert deform.offset_net.dwconv.kernel_size == ((9, 7, 5, 3)[i], ) * 2
        assert deform.offset_net.dwconv.stride == ((8, 4, 2, 1)[i], ) * 2
        side = 2 * (56 >> i) - 1
        assert deform.rpe_table.shape == (heads[i], side, side)
        assert stage.blocks[0].lpu.kernel_size == (3, 3) and stage.blocks[0].lpu.groups == dims << i
        assert stage.blocks[0].mlp.dwconv.groups == 4 * (dims << i)
        if i:
            conv = stage.downsample.conv
            assert conv.kernel_size == (3, 3) and conv.stride == (2, 2) and conv.bias is None
    assert model.patch_embed.conv1.out_channels == dims // 2
    assert model.patch_embed.conv1.stride == (2, 2) and model.patch_embed.conv2.stride == (2, 2)


@pytest.mark.slow
def test_tiny_pp_at_a_size_where_stage_4_is_smaller_than_the_kernel():
    model = DAT('tiny++').eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 100, 130))
    assert [tuple(o.shape) for o in outs] == [(1, 64, 25, 33), (1, 128, 13, 17), (1, 256, 7, 9),
                                              (1, 512, 4, 5)]
    assert all(torch.isfinite(o).all() for o in outs)


def test_every_block_has_a_local_perception_unit():
    """Zeroing the LPUs changes the output: they are applied, as residual depthwise convs."""
    model = small_backbone(2).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        before = model(x)[-1]
        for stage in model.stages:
            for block in stage.blocks:
                block.lpu.weight.zero_()
                block.lpu.bias.zero_()
        without_lpu = model(x)[-1]
    assert not torch.allclose(before, without_lpu)


@pytest.mark.skipif(not natten_available(), reason='natten is not installed')
def test_auto_uses_natten_when_available():
    # natten is picked per call under 'auto', except in checkpointed blocks
    assert small_backbone(2).stages[0].blocks[0].attn.attn_impl == 'auto'
    assert small_backbone(2, attn_impl='sdpa').stages[0].blocks[0].attn.attn_impl == 'sdpa'
    assert small_backbone(2, with_cp=True).stages[0].blocks[0].attn.with_cp


@pytest.mark.skipif(natten_available(), reason='natten is installed')
def test_auto_uses_pure_pytorch_without_natten():
    # 'auto' of biased_attention: SDPA on CUDA, the faster matmuls on CPU
    assert small_backbone(2).stages[0].blocks[0].attn.attn_impl == 'auto'
    with pytest.raises(RuntimeError, match='needs a compatible natten'):
        small_backbone(2, attn_impl='natten')


def test_v1_dict_may_name_its_version():
    v1 = dict(embed_dims=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), offset_groups=(0, 0, 2, 2))
    torch.manual_seed(0)
    a = DAT(arch=v1)
    torch.manual_seed(0)
    b = DAT(arch={**v1, 'version': 1})
    assert a.arch['block_types'] == b.arch['block_types'] == ('WS', 'WS', 'WD', 'WD')
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
