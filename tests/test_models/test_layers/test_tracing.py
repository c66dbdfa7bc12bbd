"""Attention layers traced at one size run right at others, and tracing leaves the eager caches alone."""
import pytest
import torch
import torch.fx.experimental._config as fx_config

from mmdat.models.layers import (DeformableAttention, DeformableAttentionPP, NeighborhoodAttention,
                                 WindowAttention, build_window_attention_mask, window_attention_mask)
from mmdat.models.layers.attention_math import build_neighborhood_indices, neighborhood_indices
from mmdat.models.layers.tracing import clamp_size_min, is_tracing, pad_to_multiple


def layers():
    torch.manual_seed(0)
    return {
        'window': WindowAttention(8, 2, 7, 0, 'sdpa'),
        'shifted': WindowAttention(8, 2, 7, 4, 'sdpa'),
        'neighborhood': NeighborhoodAttention(8, 2, 5, 'sdpa'),
        'deformable': DeformableAttention(8, 2, 2, 3, 7, 2.0, 'sdpa'),
        'deformable_pp': DeformableAttentionPP(8, 2, 2, 3, 2, 7, 'sdpa'),
    }


@pytest.mark.parametrize('name', ['window', 'shifted', 'neighborhood', 'deformable', 'deformable_pp'])
def test_traced_at_one_size_right_at_others(name):
    """The trace at 14x14 (no padding, shift masks of 4 windows) runs 9x23 (padding, 6 windows),
    3x4 (smaller than a window/kernel; DAT++: one reference row) and 1x1 like eager."""
    module = layers()[name].eval()
    with torch.no_grad():
        traced = torch.jit.trace(module, torch.randn(2, 14, 14, 8), check_trace=False)
        for height, width in [(9, 23), (3, 4), (1, 1), (14, 14)]:
            x = torch.randn(2, height, width, 8)
            torch.testing.assert_close(traced(x), module(x), atol=1e-5, rtol=1e-5)


def test_tracing_bypasses_the_eager_caches():
    window_attention_mask.cache_clear()
    neighborhood_indices.cache_clear()
    modules = layers()
    with torch.no_grad():
        for name in ('shifted', 'neighborhood'):
            torch.jit.trace(modules[name], torch.randn(1, 10, 11, 8), check_trace=False)
    assert window_attention_mask.cache_info().currsize == 0
    assert neighborhood_indices.cache_info().currsize == 0
    with torch.no_grad():
        modules['shifted'](torch.randn(1, 10, 11, 8))
    assert window_attention_mask.cache_info().currsize == 1


def test_export_leaves_plain_tensors_in_the_caches():
    """A torch.export with dynamic sizes, then eager calls: no fake tensor comes out of a cache."""
    window_attention_mask.cache_clear()
    module = layers()['shifted'].eval()
    # at least 2 windows; size-oblivious guards as tools/deployment/pytorch2onnx.py uses
    size = torch.export.Dim('size', min=8, max=64)
    with fx_config.patch(backed_size_oblivious=True):
        program = torch.export.export(module, (torch.randn(1, 10, 11, 8), ),
                                      dynamic_shapes={'x': {1: size}}, strict=False)
    mask = window_attention_mask(10, 11, 7, 4, torch.device('cpu'))
    assert type(mask) is torch.Tensor
    x = torch.randn(1, 17, 11, 8)
    torch.testing.assert_close(program.module()(x), module(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('height,width,shift', [(14, 21, 4), (15, 21, 4), (8, 7, 0), (3, 10, 3), (7, 7, 0)])
def test_mask_builder_matches_the_cached_mask(height, width, shift):
    cpu = torch.device('cpu')
    built = build_window_attention_mask(height, width, 7, shift, cpu)
    cached = window_attention_mask(height, width, 7, shift, cpu)
    if cached is None:  # no shift, no padding: every key allowed
        assert (built == 0).all()
    else:
        torch.testing.assert_close(built, cached, rtol=0, atol=0)


def test_neighborhood_indices_shift_inwards_at_the_borders():
    keys, bias = build_neighborhood_indices(6, 3, torch.device('cpu'))
    assert keys.tolist() == [[0, 1, 2], [0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 5], [3, 4, 5]]
    assert bias[0].tolist() == [2, 3, 4] and bias[5].tolist() == [0, 1, 2]


def test_shape_helpers():
    assert [pad_to_multiple(n, 7) for n in (1, 7, 8, 14)] == [6, 0, 6, 0]
    assert pad_to_multiple(torch.tensor(9), 4).item() == 3
    assert clamp_size_min(-2, 0) == 0 and clamp_size_min(5, 0) == 5
    assert clamp_size_min(torch.tensor(-3), 0).item() == 0
    assert not is_tracing()
    seen = []
    torch.jit.trace(lambda x: seen.append(is_tracing()) or x * 2, torch.ones(1), check_trace=False)
    assert seen and all(seen)
