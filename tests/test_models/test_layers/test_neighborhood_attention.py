import pytest
import torch
import torch.nn.functional as F

from mmdat.models.layers import NeighborhoodAttention, natten_available, neighborhood_attention


def naive_neighborhood_attention(q, k, v, rpb, kernel_size):
    """NATTEN 0.14 semantics written out per query: (B, heads, H, W, d) tensors, dilation 1.

    The neighborhood of query ``i`` on an axis of ``n`` pixels starts at
    ``min(max(i - K // 2, 0), n - K)``; the bias of key ``j`` is ``rpb[j - i + K - 1]``.
    """
    batch, heads, height, width, dims = q.shape
    out = torch.empty_like(q)
    for i in range(height):
        top = min(max(i - kernel_size // 2, 0), height - kernel_size)
        for j in range(width):
            left = min(max(j - kernel_size // 2, 0), width - kernel_size)
            keys = k[:, :, top:top + kernel_size, left:left + kernel_size].reshape(batch, heads, -1, dims)
            values = v[:, :, top:top + kernel_size, left:left + kernel_size].reshape(batch, heads, -1, dims)
            bias = rpb[:, top - i + kernel_size - 1:top - i + 2 * kernel_size - 1,
                       left - j + kernel_size - 1:left - j + 2 * kernel_size - 1].reshape(heads, -1)
            scores = torch.einsum('bhd,bhnd->bhn', q[:, :, i, j], keys) * dims**-0.5 + bias
            out[:, :, i, j] = torch.einsum('bhn,bhnd->bhd', scores.softmax(-1), values)
    return out


def random_qkv(height, width, heads=2, dims=4, kernel_size=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, heads, height, width, dims, generator=generator) for _ in range(3))
    rpb = 2 * torch.randn(heads, 2 * kernel_size - 1, 2 * kernel_size - 1, generator=generator)
    return q, k, v, rpb


@pytest.mark.parametrize('impl', ['auto', 'sdpa', 'reference'])
@pytest.mark.parametrize('height,width,kernel_size', [(9, 11, 5), (7, 7, 7), (5, 12, 3), (8, 7, 7)])
def test_matches_the_naive_reference(impl, height, width, kernel_size):
    q, k, v, rpb = random_qkv(height, width, kernel_size=kernel_size)
    out = neighborhood_attention(q, k, v, rpb, kernel_size, impl)
    torch.testing.assert_close(out, naive_neighborhood_attention(q, k, v, rpb, kernel_size),
                               rtol=1e-5, atol=1e-5)


def test_kernel_covering_the_map_is_global_attention_with_a_shifted_bias():
    """With K == H == W every query sees the whole map, its bias read at key - query."""
    q, k, v, rpb = random_qkv(5, 5, kernel_size=5)
    out = neighborhood_attention(q, k, v, rpb, 5)
    coords = torch.stack(torch.meshgrid(torch.arange(5), torch.arange(5), indexing='ij')).flatten(1)
    offset = coords[:, None, :] - coords[:, :, None] + 4  # key - query
    bias = rpb[:, offset[0], offset[1]]  # heads, Nq, Nk
    expected = F.softmax((q.flatten(2, 3) @ k.flatten(2, 3).transpose(-2, -1)) * 0.5 + bias, -1)
    expected = (expected @ v.flatten(2, 3)).view_as(q)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_maps_smaller_than_the_kernel_are_refused_by_the_function():
    q, k, v, rpb = random_qkv(4, 9, kernel_size=5)
    with pytest.raises(ValueError, match='at least kernel_size=5 a side, got 4x9'):
        neighborhood_attention(q, k, v, rpb, 5)


@pytest.mark.parametrize('height,width', [(3, 5), (7, 2), (1, 1), (9, 4)])
def test_module_pads_small_maps_like_natten(height, width):
    """Maps under the kernel: zero-padded before qkv up to the kernel, padding unmasked, cropped."""
    torch.manual_seed(0)
    module = NeighborhoodAttention(8, 2, kernel_size=7)
    torch.nn.init.normal_(module.rpb, std=1.0)
    x = torch.randn(2, height, width, 8)
    padded = F.pad(x, (0, 0, 0, max(0, 7 - width), 0, max(0, 7 - height)))
    qkv = module.qkv(padded).view(2, *padded.shape[1:3], 3, 2, 4).permute(3, 0, 4, 1, 2, 5)
    out = naive_neighborhood_attention(qkv[0], qkv[1], qkv[2], module.rpb, 7)
    expected = module.proj(out.permute(0, 2, 3, 1, 4).flatten(3)[:, :height, :width])
    with torch.no_grad():
        torch.testing.assert_close(module(x), expected, rtol=1e-5, atol=1e-5)


def test_gradients_reach_inputs_and_bias():
    module = NeighborhoodAttention(8, 2, kernel_size=3)
    x = torch.randn(1, 6, 5, 8, requires_grad=True)
    module(x).square().sum().backward()
    assert x.grad.abs().sum() > 0 and module.rpb.grad.abs().sum() > 0
    assert module.qkv.weight.grad.abs().sum() > 0


@pytest.mark.skipif(not natten_available(), reason='natten is not installed')
@pytest.mark.parametrize('height,width', [(9, 11), (3, 4)])
def test_natten_and_pure_paths_agree(height, width):
    torch.manual_seed(0)
    module = NeighborhoodAttention(64, 2, kernel_size=7)
    torch.nn.init.normal_(module.rpb, std=1.0)
    x = torch.randn(2, height, width, 64)
    with torch.no_grad():
        pure = module(x)
        module.attn_impl = 'natten'
        torch.testing.assert_close(module(x), pure, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('kwargs,error,match', [
    (dict(embed_dims=10, num_heads=3), ValueError, 'divisible by num_heads'),
    (dict(kernel_size=4), ValueError, 'odd int >= 3'),
    (dict(kernel_size=1), ValueError, 'odd int >= 3'),
    (dict(attn_impl='flash'), ValueError, 'attn_impl must be one of'),
])
def test_bad_arguments(kwargs, error, match):
    kwargs = {**dict(embed_dims=8, num_heads=2), **kwargs}
    with pytest.raises(error, match=match):
        NeighborhoodAttention(**kwargs)


@pytest.mark.skipif(natten_available(), reason='natten is installed')
def test_natten_impl_without_natten():
    with pytest.raises(RuntimeError, match='needs a compatible natten'):
        NeighborhoodAttention(8, 2, attn_impl='natten')
