import importlib

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from mmdat.models.layers import NeighborhoodAttention, natten_available, neighborhood_attention, policy
from mmdat.models.layers.cpu_neighborhood import kernel_available as cpu_kernel_available
from mmdat.models.layers.neighborhood_tiles import NA_TILES, tile_plan, tiled_neighborhood_attention
from mmdat.models.layers.policy import NEIGHBORHOOD, resolve_attn_impl


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


@pytest.mark.parametrize('height,width,kernel_size,tile', [
    (7, 7, 7, 8),     # the map is one tile and one halo
    (9, 11, 5, 4),    # sides not multiples of the tile: the last tiles overlap their neighbours
    (23, 30, 7, 6),   # interior tiles, border tiles and corners
    (30, 17, 7, 8),   # halo wider than the map on one side
    (12, 13, 3, 3),   # another odd kernel
    (10, 9, 9, 4),
])
@pytest.mark.parametrize('impl', ['reference', 'sdpa'])
def test_tiles_match_the_gathered_reference_forward_and_backward(height, width, kernel_size, tile, impl):
    """fp64, every input and the bias table: the tiled path is the reference path, tile by tile."""
    q, k, v, rpb = (t.double().requires_grad_() for t in random_qkv(height, width, kernel_size=kernel_size))
    weights = torch.randn(q.shape, dtype=torch.float64)
    reference = neighborhood_attention(q, k, v, rpb, kernel_size, 'reference')
    expected = torch.autograd.grad((reference * weights).sum(), (q, k, v, rpb))
    out = tiled_neighborhood_attention(q, k, v, rpb, kernel_size, impl, tile)
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v, rpb))
    torch.testing.assert_close(out, reference, rtol=1e-12, atol=1e-12)
    for grad, grad_expected in zip(grads, expected):
        assert grad_expected.abs().sum() > 0
        torch.testing.assert_close(grad, grad_expected, rtol=1e-10, atol=1e-10)


def without_cpu_kernel(monkeypatch):
    """Make 'auto' run what it runs where the C++ kernel does not take the input (the tiles)."""
    monkeypatch.setattr(policy.CPU_NEIGHBORHOOD.module, 'supports', lambda device, dtype: False)


def saved_bytes(fn):
    """Run ``fn`` and return its result and the bytes of the distinct storages autograd saved."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


@pytest.mark.parametrize('impl', ['auto', 'sdpa'])
def test_tiles_keep_only_their_inputs_for_backward(impl, monkeypatch):
    """In training the tiles are recomputed in backward: no gathered halos, scores or
    probabilities are kept (the gathered path keeps K*K copies of the keys and values), and
    the gradients are still the reference's, also inside a checkpointed block (with_cp)."""
    without_cpu_kernel(monkeypatch)
    q, k, v, rpb = (t.double().requires_grad_() for t in random_qkv(23, 30, kernel_size=7))
    inputs = sum(t.numel() * t.element_size() for t in (q, k, v, rpb))
    weights = torch.randn(q.shape, dtype=torch.float64)
    reference, reference_saved = saved_bytes(lambda: neighborhood_attention(q, k, v, rpb, 7, 'reference'))
    expected = torch.autograd.grad((reference * weights).sum(), (q, k, v, rpb))
    out, saved = saved_bytes(lambda: neighborhood_attention(q, k, v, rpb, 7, impl))
    assert saved <= inputs < reference_saved / 10
    for attempt in (out, torch.utils.checkpoint.checkpoint(neighborhood_attention, q, k, v, rpb, 7, impl,
                                                           use_reentrant=False)):
        grads = torch.autograd.grad((attempt * weights).sum(), (q, k, v, rpb))
        for grad, grad_expected in zip(grads, expected):
            torch.testing.assert_close(grad, grad_expected, rtol=1e-10, atol=1e-10)


def test_kernel_of_each_attn_impl():
    cpu = torch.device('cpu')
    auto, fused, sdpa, reference = (resolve_attn_impl(impl, NEIGHBORHOOD, cpu, torch.float32, 196, False).kernel
                                    for impl in ('auto', 'fused', 'sdpa', 'reference'))
    assert sdpa is policy.NEIGHBORHOOD_TILES and reference is None  # None: the gathered reference
    if cpu_kernel_available():
        assert auto is fused is policy.CPU_NEIGHBORHOOD
    else:
        assert auto is (policy.NATTEN if natten_available() else policy.NEIGHBORHOOD_TILES)
    # the one check of every layer (check_attn_impl), per call too
    with pytest.raises(ValueError, match='attn_impl must be one of'):
        neighborhood_attention(*random_qkv(7, 7), 5, 'flash')


def test_tile_plan_groups_the_interior_tiles_and_reads_every_pixel_once():
    groups, queries, keys, order = tile_plan(200, 334, 7, 8, torch.device('cpu'))
    tiles = [g[0] for g in groups]
    # 25 x 42 tiles: first, interior and last rows/columns of tiles; the interior is one group
    assert sum(tiles) == 25 * 42 and max(tiles) == 23 * 40 and len(groups) <= 16
    assert queries.numel() == sum(tiles) * 64 and keys.numel() == sum(tiles) * 14 * 14
    assert torch.equal(queries[order], torch.arange(200 * 334))  # each pixel's own output
    for _, bias_index, masked in groups:  # every query sees exactly K*K keys
        assert torch.equal((~masked).sum(1), torch.full((64, ), 49))
        assert 0 <= bias_index.min() and bias_index.max() < 13 * 13


def test_tile_size_follows_the_gradient_mode(monkeypatch):
    without_cpu_kernel(monkeypatch)
    seen = []
    real = tile_plan.__wrapped__

    def spy(height, width, kernel_size, tile, device):
        seen.append(tile)
        return real(height, width, kernel_size, tile, device)

    monkeypatch.setattr(importlib.import_module('mmdat.models.layers.neighborhood_tiles'), 'tile_plan', spy)
    q, k, v, rpb = random_qkv(9, 9, kernel_size=5)
    with torch.no_grad():
        neighborhood_attention(q, k, v, rpb, 5, 'auto')
    neighborhood_attention(q, k, v, rpb.requires_grad_(), 5, 'auto')
    assert seen == [NA_TILES['inference'], NA_TILES['training']]


@pytest.mark.parametrize('impl', ['auto', 'reference'])
def test_training_after_inference_mode(impl):
    """Index tables cached during inference_mode must serve a later backward."""
    module = NeighborhoodAttention(8, 2, kernel_size=3, attn_impl=impl)
    x = torch.randn(1, 7, 6, 8)
    with torch.inference_mode():
        module(x)
    module(x).sum().backward()
    assert module.rpb.grad.abs().sum() > 0


def test_bf16_autocast_follows_fp32():
    torch.manual_seed(0)
    module = NeighborhoodAttention(32, 2, kernel_size=7)
    x = torch.randn(1, 19, 23, 32)
    with torch.no_grad():
        expected = module(x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = module(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=0.05, atol=0.05)


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


@pytest.mark.parametrize('height,width', [(6, 5), (3, 9), (20, 11)])
def test_module_gradients_match_the_reference(height, width):
    """Maps smaller than the kernel (padded) and larger, every parameter and the input."""
    torch.manual_seed(0)
    module = NeighborhoodAttention(8, 2, kernel_size=7).double()
    torch.nn.init.normal_(module.rpb, std=1.0)
    x = torch.randn(1, height, width, 8, dtype=torch.float64, requires_grad=True)
    results = {}
    for impl in ('reference', 'auto', 'sdpa'):
        module.attn_impl = impl
        out = module(x)
        results[impl] = [out] + list(torch.autograd.grad(out.square().sum(), [x] + list(module.parameters())))
    for impl in ('auto', 'sdpa'):
        for got, expected in zip(results[impl], results['reference']):
            assert expected.abs().sum() > 0
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


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
    with pytest.raises(RuntimeError, match='needs a compatible natten'):
        neighborhood_attention(*random_qkv(7, 7), 5, 'natten')


@pytest.mark.gpu
def test_tiles_match_the_reference_on_gpu():
    """DAT-T++ stage 1 at 800x1333 (200 x 334, 2 heads of 32 dims), batch 2, forward and all
    gradients in float32, and the tiles' peak memory under a quarter of the gathered path's."""
    generator = torch.Generator(device='cuda').manual_seed(0)
    q, k, v = (torch.randn(2, 2, 200, 334, 32, device='cuda', generator=generator, requires_grad=True)
               for _ in range(3))
    rpb = torch.randn(2, 13, 13, device='cuda', generator=generator).requires_grad_()
    weights = torch.randn(q.shape, device='cuda', generator=generator)
    results, peaks = {}, {}
    for impl in ('reference', 'auto', 'sdpa'):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        out = neighborhood_attention(q, k, v, rpb, 7, impl)
        results[impl] = [out.detach()] + list(torch.autograd.grad((out * weights).sum(), (q, k, v, rpb)))
        peaks[impl] = torch.cuda.max_memory_allocated() - start
    for impl in ('auto', 'sdpa'):
        for got, expected in zip(results[impl], results['reference']):
            torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4)
        assert peaks[impl] < peaks['reference'] / 4, peaks
