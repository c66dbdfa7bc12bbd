"""DAT++ archs of the DAT backbone (parity with the official models: test_ckpt_convert_datpp.py)."""
import pytest
import torch

from mmdat.models import DAT
from mmdat.models.layers import DeformableAttentionPP, NeighborhoodAttention, natten_available

# A small DAT++: neighborhood and deformable blocks in every stage but the last.
SMALL_ARCH_PP = dict(version=2, embed_dims=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4),
                     offset_groups=(1, 1, 2, 2), block_types=('ND', 'ND', 'ND', 'DD'))


def small_datpp(**kwargs):
    torch.manual_seed(0)
    kwargs.setdefault('arch', SMALL_ARCH_PP)
    kwargs.setdefault('drop_path_rate', 0.0)
    model = DAT(**kwargs)
    model.init_weights()
    return model


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


@pytest.mark.parametrize('size', [(61, 45), (33, 100), (4, 4), (17, 9)])
def test_any_input_size(size):
    model = small_datpp().eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, *size))
    for i, out in enumerate(outs):
        stride = 4 * 2**i
        assert out.shape == (1, 16 * 2**i, -(-size[0] // stride), -(-size[1] // stride))
        assert torch.isfinite(out).all()


def test_tiny_pp_at_a_size_where_stage_4_is_smaller_than_the_kernel():
    model = DAT('tiny++').eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 100, 130))
    assert [tuple(o.shape) for o in outs] == [(1, 64, 25, 33), (1, 128, 13, 17), (1, 256, 7, 9),
                                              (1, 512, 4, 5)]
    assert all(torch.isfinite(o).all() for o in outs)


def test_attention_paths_agree_forward_and_backward():
    x = torch.randn(2, 3, 45, 61)
    results = []
    for impl in ('sdpa', 'reference'):
        model = small_datpp(attn_impl=impl)
        outs = model(x)
        sum(o.square().mean() for o in outs).backward()
        results.append((outs, model.stages[1].blocks[1].attn.offset_net.proj.weight.grad))
    for a, b in zip(results[0][0], results[1][0]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-3, atol=1e-6)


def test_with_cp_gives_the_same_results_and_gradients():
    x = torch.randn(1, 3, 24, 32)
    grads = []
    for with_cp in (False, True):
        model = small_datpp(with_cp=with_cp).train()
        sum(o.sum() for o in model(x)).backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_frozen_stages():
    model = small_datpp(frozen_stages=2).train()
    frozen = [model.patch_embed, model.stages[0], model.stages[1], model.norm0, model.norm1]
    assert all(not p.requires_grad for m in frozen for p in m.parameters())
    assert all(p.requires_grad for p in model.stages[2].parameters())


def test_every_block_has_a_local_perception_unit():
    """Zeroing the LPUs changes the output: they are applied, as residual depthwise convs."""
    model = small_datpp().eval()
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
    assert small_datpp().stages[0].blocks[0].attn.attn_impl == 'auto'
    assert small_datpp(attn_impl='sdpa').stages[0].blocks[0].attn.attn_impl == 'sdpa'
    assert small_datpp(with_cp=True).stages[0].blocks[0].attn.with_cp


@pytest.mark.skipif(natten_available(), reason='natten is installed')
def test_auto_uses_pure_pytorch_without_natten():
    # 'auto' of biased_attention: SDPA on CUDA, the faster matmuls on CPU
    assert small_datpp().stages[0].blocks[0].attn.attn_impl == 'auto'
    with pytest.raises(RuntimeError, match='needs a compatible natten'):
        small_datpp(attn_impl='natten')


@pytest.mark.parametrize('kwargs,error,match', [
    (dict(arch={**SMALL_ARCH_PP, 'version': 3}), ValueError, 'version must be 1 .* or 2'),
    (dict(arch={k: v for k, v in SMALL_ARCH_PP.items() if k != 'block_types'}), ValueError,
     'version 2 needs exactly the keys'),
    (dict(arch={k: v for k, v in SMALL_ARCH_PP.items() if k != 'version'}), ValueError,
     'version 1 needs exactly the keys'),
    (dict(arch={**SMALL_ARCH_PP, 'block_types': ('ND', 'ND', 'NDN', 'DD')}), ValueError,
     'Stage 2: block_types must be a string of 2 letters'),
    (dict(arch={**SMALL_ARCH_PP, 'block_types': ('ND', 'NW', 'ND', 'DD')}), ValueError,
     'Stage 1: block_types'),
    (dict(arch={**SMALL_ARCH_PP, 'offset_groups': (1, 0, 2, 2)}), ValueError,
     r'Stage 1: num_heads 2 must be divisible by offset_groups 0 \(>= 1\)'),
    (dict(arch={**SMALL_ARCH_PP, 'embed_dims': 15, 'num_heads': (1, 1, 1, 1)}), ValueError,
     'embed_dims must be even'),
    (dict(window_size=6), ValueError, 'must be odd and >= 3'),
    (dict(arch='tiny', attn_impl='natten'), ValueError, 'is for neighborhood blocks, and this arch has none'),
    (dict(attn_impl='flash'), ValueError, 'attn_impl must be one of'),
])
def test_bad_arguments(kwargs, error, match):
    kwargs.setdefault('arch', SMALL_ARCH_PP)
    with pytest.raises(error, match=match):
        DAT(**kwargs)


def test_v1_dict_may_name_its_version():
    v1 = dict(embed_dims=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), offset_groups=(0, 0, 2, 2))
    torch.manual_seed(0)
    a = DAT(arch=v1)
    torch.manual_seed(0)
    b = DAT(arch={**v1, 'version': 1})
    assert a.arch['block_types'] == b.arch['block_types'] == ('WS', 'WS', 'WD', 'WD')
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


@pytest.mark.parametrize('impl', ['sdpa', 'reference'])
def test_mixed_precision(impl):
    model = small_datpp(attn_impl=impl)
    x = torch.randn(2, 3, 57, 71)
    full = model(x)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        mixed = model(x)
    sum(o.float().square().sum() for o in mixed).backward()
    for a, b in zip(mixed, full):
        assert a.dtype == torch.bfloat16
        assert ((a.float() - b).norm() / b.norm()).item() < 3e-2
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
