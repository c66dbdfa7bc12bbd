import pytest
import torch

from mmdat.models.layers import DeformableAttention, pixel_centre_grid


def make_module(impl='sdpa', **kwargs):
    torch.manual_seed(0)
    args = dict(embed_dims=16, num_heads=4, num_groups=2, offset_kernel_size=3, table_size=5,
                attn_impl=impl)
    args.update(kwargs)
    return DeformableAttention(**args)


def test_pixel_centre_grid():
    grid = pixel_centre_grid(2, 4, torch.device('cpu'), torch.float32)
    assert grid.shape == (2, 4, 2)
    assert torch.allclose(grid[:, 0, 0], torch.tensor([-0.5, 0.5]))  # y of the two rows
    assert torch.allclose(grid[0, :, 1], torch.tensor([-0.75, -0.25, 0.25, 0.75]))  # x


@pytest.mark.parametrize('size', [(5, 5), (7, 11), (1, 1), (13, 3)])
def test_any_map_size_with_the_same_table(size):
    module = make_module()
    x = torch.randn(2, *size, 16)
    out = module(x)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()
    assert module.rpe_table.shape == (4, 9, 9)


def test_offsets_are_bounded_by_the_range_factor():
    module = make_module(offset_range_factor=2.0)
    with torch.no_grad():
        module.offset_net.proj.weight.normal_(std=100.0)  # saturate tanh
    height, width = 6, 10
    reference, positions = module.sampling_positions(torch.randn(3, height, width, 16))
    assert reference.shape == (height, width, 2)
    assert positions.shape == (3 * 2, height, width, 2)
    step = (positions - reference).abs().amax(dim=(0, 1, 2))
    limit = torch.tensor([2.0 / height, 2.0 / width])
    assert (step <= limit + 1e-6).all()
    assert (step > 0.9 * limit).all()  # saturated tanh reaches the bound


def test_offsets_learn_and_move_the_output():
    module = make_module()
    x = torch.randn(2, 6, 7, 16)
    out = module(x)
    out.square().sum().backward()
    for name, param in module.offset_net.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert module.rpe_table.grad.abs().sum() > 0
    with torch.no_grad():
        module.offset_net.proj.weight.add_(torch.randn_like(module.offset_net.proj.weight))
        moved = module(x)
    assert not torch.allclose(out, moved, atol=1e-4)


def test_position_bias_depends_on_the_offsets():
    """Offsets learn through the sampled position bias too, not only through the sampled keys."""
    module = make_module()
    x = torch.randn(1, 5, 5, 16)
    _, positions = module.sampling_positions(module.proj_q(x))
    bias = module.position_bias(pixel_centre_grid(5, 5, x.device, x.dtype), positions, batch=1)
    assert bias.shape == (1, 4, 25, 25)
    (grad, ) = torch.autograd.grad(bias.sum(), module.offset_net.proj.weight)
    assert grad.abs().sum() > 0


def test_position_bias_against_values_worked_out_by_hand():
    """Head 0's table is ``10 * row + column`` on a 3 x 3 grid (``table_size=2``), head 1's its
    negative; ``align_corners=True`` puts normalised ``-1, 0, 1`` on rows and columns 0, 1, 2,
    and bilinear sampling of a plane is exact. The bias is read at half of query - key:

    - query (y, x) = (0.5, -0.5), key (-0.5, 0.0): (1.0, -0.5) / 2 = (0.5, -0.25), i.e. row
      1.5, column 0.75: 15.75;
    - the same query, key (-1.0, 1.0): (1.5, -1.5) / 2 = (0.75, -0.75): row 1.75, column 0.25:
      17.75.

    (key - query would read 6.25 and 4.25; the whole displacement, without the half, 20.5 and
    a point beyond the table.)
    """
    module = make_module(num_heads=2, num_groups=1, table_size=2)
    plane = torch.tensor([[0.0, 1.0, 2.0], [10.0, 11.0, 12.0], [20.0, 21.0, 22.0]])
    with torch.no_grad():
        module.rpe_table.copy_(torch.stack([plane, -plane]))
    queries = torch.tensor([[[0.5, -0.5]]])  # (H, W, 2) = (1, 1, 2)
    positions = torch.tensor([[[[-0.5, 0.0], [-1.0, 1.0]]]])  # (B * groups, Hk, Wk, 2) = (1, 1, 2, 2)
    bias = module.position_bias(queries, positions, batch=1)
    expected = torch.tensor([[[[15.75, 17.75]], [[-15.75, -17.75]]]])
    torch.testing.assert_close(bias, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize('size', [(7, 7), (6, 9)])
def test_sdpa_and_reference_agree(size):
    x = torch.randn(2, *size, 16, dtype=torch.float64)
    results = []
    for impl in ('sdpa', 'reference'):
        module = make_module(impl).double()
        with torch.no_grad():
            module.rpe_table.normal_()
        out = module(x)
        out.sum().backward()
        results.append((out, [p.grad for p in module.parameters()]))
    (out_s, grads_s), (out_r, grads_r) = results
    assert torch.allclose(out_s, out_r, atol=1e-10)
    for g_s, g_r in zip(grads_s, grads_r):
        assert torch.allclose(g_s, g_r, atol=1e-10)


def test_table_size_follows_the_pretraining_map():
    module = make_module(table_size=(14, 7))
    assert module.rpe_table.shape == (4, 27, 13)


@pytest.mark.parametrize('kwargs,match', [
    (dict(num_heads=3), 'divisible by num_heads'),
    (dict(num_groups=3), 'divisible by num_groups'),
    (dict(num_groups=0), 'divisible by num_groups'),
    (dict(offset_kernel_size=4), 'must be odd'),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_module(**kwargs)
