import pytest
import torch
import torch.nn.functional as F

from mmdat.models.layers import (DeformableAttentionPP, StridedOffsetNetwork, datpp_query_grid,
                                 datpp_reference_grid)


def test_reference_points_follow_the_datpp_formula():
    grid = datpp_reference_grid(7, 4, torch.device('cpu'), torch.float32)
    assert grid.shape == (7, 4, 2)
    torch.testing.assert_close(grid[:, 0, 0], torch.tensor([(i + 0.5) / 6 * 2 - 1 for i in range(7)]))
    torch.testing.assert_close(grid[0, :, 1], torch.tensor([(i + 0.5) / 3 * 2 - 1 for i in range(4)]))
    # one point: the official formula puts it at +infinity, i.e. the clamped border
    assert datpp_reference_grid(1, 3, torch.device('cpu'), torch.float32)[0, 0, 0] == 1.0


def test_query_grid_is_the_align_corners_pixel_grid():
    grid = datpp_query_grid(5, 3, torch.device('cpu'), torch.float32)
    torch.testing.assert_close(grid[:, 0, 0], torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0]))
    torch.testing.assert_close(grid[0, :, 1], torch.tensor([-1.0, 0.0, 1.0]))
    assert datpp_query_grid(1, 1, torch.device('cpu'), torch.float32).eq(0).all()


@pytest.mark.parametrize('kernel_size,stride,size', [(9, 8, 56), (9, 8, 57), (9, 8, 3), (7, 4, 13),
                                                     (5, 2, 1), (3, 1, 6), (3, 3, 7)])
def test_offset_map_size(kernel_size, stride, size):
    net = StridedOffsetNetwork(4, kernel_size, stride)
    padding = 0 if kernel_size == stride else kernel_size // 2
    out = net(torch.randn(1, 4, size, size + 1))
    assert out.shape == (1, (size + 2 * padding - kernel_size) // stride + 1,
                         (size + 1 + 2 * padding - kernel_size) // stride + 1, 2)


def reference_datpp_attention(module, x):
    """The DAT++ deformable attention spelt out on ``(B, C, H, W)`` maps with 1x1 convs."""
    batch, height, width, channels = x.shape
    heads, groups = module.num_heads, module.num_groups
    x = x.permute(0, 3, 1, 2)

    def conv1x1(t, linear):
        return F.conv2d(t, linear.weight[:, :, None, None], linear.bias)

    q = conv1x1(x, module.proj_q)
    net = module.offset_net
    offset = net.dwconv(q.reshape(batch * groups, channels // groups, height, width))
    offset = net.proj(net.act(net.norm(offset.permute(0, 2, 3, 1))))  # (B*g, Hk, Wk, 2)
    hk, wk = offset.shape[1:3]

    def axis(n, first, single):  # (i + first) / (n - 1) * 2 - 1; `single` for a 1-point axis
        return torch.tensor([single]) if n == 1 else (torch.arange(n) + first) / (n - 1) * 2 - 1

    ref = torch.stack(torch.meshgrid(axis(hk, 0.5, 1.0), axis(wk, 0.5, 1.0), indexing='ij'), -1)
    if hk == 1:
        offset = torch.stack([torch.zeros_like(offset[..., 0]), offset[..., 1]], -1)
    if wk == 1:
        offset = torch.stack([offset[..., 0], torch.zeros_like(offset[..., 1])], -1)
    pos = (ref + offset).clamp(-1, 1)
    sampled = F.grid_sample(x.reshape(batch * groups, -1, height, width), pos[..., [1, 0]],
                            mode='bilinear', align_corners=True).reshape(batch, channels, 1, hk * wk)
    k = conv1x1(sampled, module.proj_k).reshape(batch * heads, -1, hk * wk)
    v = conv1x1(sampled, module.proj_v).reshape(batch * heads, -1, hk * wk)
    q = q.reshape(batch * heads, -1, height * width)
    attn = torch.einsum('bcm,bcn->bmn', q, k) * (channels // heads)**-0.5

    q_grid = torch.stack(torch.meshgrid(axis(height, 0.0, 0.0), axis(width, 0.0, 0.0), indexing='ij'), -1)
    displacement = (q_grid.reshape(1, -1, 1, 2) - pos.reshape(batch * groups, 1, -1, 2)) * 0.5
    table = module.rpe_table[None].expand(batch, -1, -1, -1).reshape(batch * groups, heads // groups,
                                                                      *module.rpe_table.shape[1:])
    bias = F.grid_sample(table, displacement[..., [1, 0]], mode='bilinear', align_corners=True)
    attn = (attn + bias.reshape(batch * heads, height * width, hk * wk)).softmax(-1)
    out = torch.einsum('bmn,bcn->bcm', attn, v).reshape(batch, channels, height, width)
    return conv1x1(out, module.proj_out).permute(0, 2, 3, 1)


@pytest.mark.parametrize('impl', ['sdpa', 'reference'])
@pytest.mark.parametrize('size,kernel_size,stride', [((13, 9), 5, 2), ((16, 16), 9, 8), ((5, 3), 9, 8),
                                                    ((1, 6), 3, 1), ((6, 7), 3, 1)])
def test_matches_the_spelt_out_formulas(impl, size, kernel_size, stride):
    torch.manual_seed(0)
    module = DeformableAttentionPP(16, 4, 2, kernel_size, stride, table_size=7, attn_impl=impl)
    torch.nn.init.normal_(module.rpe_table, std=2.0)
    torch.nn.init.normal_(module.offset_net.proj.weight, std=0.3)  # offsets large enough to clamp
    x = torch.randn(2, *size, 16)
    with torch.no_grad():
        out = module(x)
        expected = reference_datpp_attention(module, x)
        _, positions = module.sampling_positions(module.proj_q(x))
    assert positions.abs().max() <= 1.0
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_positions_are_clamped_and_offsets_unscaled():
    torch.manual_seed(0)
    module = DeformableAttentionPP(8, 2, 1, 3, 1, table_size=4)
    torch.nn.init.normal_(module.offset_net.proj.weight, std=3.0)
    query = torch.randn(1, 5, 6, 8)
    reference, positions = module.sampling_positions(query)
    raw = module.offset_net(module._split_groups(query))
    torch.testing.assert_close(positions, (reference + raw).clamp(-1, 1))
    assert (positions.abs() == 1).any() and (positions.abs() < 1).any()


def test_gradients_reach_offsets_and_table():
    module = DeformableAttentionPP(8, 2, 2, 5, 2, table_size=6)
    x = torch.randn(1, 9, 10, 8, requires_grad=True)
    module(x).square().sum().backward()
    assert module.offset_net.proj.weight.grad.abs().sum() > 0
    assert module.rpe_table.grad.abs().sum() > 0 and x.grad.abs().sum() > 0


def test_bad_arguments():
    with pytest.raises(ValueError, match='offset stride must be a positive int'):
        DeformableAttentionPP(8, 2, 1, 3, 0, table_size=4)
    with pytest.raises(ValueError, match="DeformableAttentionPP supports attn_impl .* got 'natten'"):
        DeformableAttentionPP(8, 2, 1, 3, 1, table_size=4, attn_impl='natten')
