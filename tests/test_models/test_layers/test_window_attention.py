import itertools

import pytest
import torch

from mmdat.models.layers import MASK_VALUE, WindowAttention, window_attention_mask


def dense_window_attention(module: WindowAttention, x: torch.Tensor) -> torch.Tensor:
    """Swin semantics written out over all pixel pairs of the map, independently of the module.

    In the padded map rolled by the shift, pixel p sees pixel q iff both lie in the same window,
    per axis both or neither wrapped around in the roll, and both are real or both padding.
    """
    batch, height, width, channels = x.shape
    ws, shift, heads = module.window_size, module.shift_size, module.num_heads
    padded_h, padded_w = height + (-height % ws), width + (-width % ws)
    rolled = list(itertools.product(range(padded_h), range(padded_w)))
    source = [((r + shift) % padded_h, (c + shift) % padded_w) for r, c in rolled]
    real = [y < height and x_ < width for y, x_ in source]
    wrapped = [(r + shift >= padded_h, c + shift >= padded_w) for r, c in rolled]
    window = [(r // ws, c // ws) for r, c in rolled]

    n = len(rolled)
    bias = torch.full((heads, n, n), float('-inf'), dtype=x.dtype)
    for i, j in itertools.product(range(n), range(n)):
        if window[i] != window[j]:
            continue
        dy = rolled[i][0] - rolled[j][0] + ws - 1
        dx = rolled[i][1] - rolled[j][1] + ws - 1
        allowed = wrapped[i] == wrapped[j] and real[i] == real[j]
        bias[:, i, j] = module.relative_position_bias_table[dy * (2 * ws - 1) + dx] + (
            0.0 if allowed else MASK_VALUE)

    padded = torch.zeros(batch, padded_h, padded_w, channels, dtype=x.dtype)
    padded[:, :height, :width] = x
    tokens = torch.stack([padded[:, y, x_] for y, x_ in source], dim=1)  # B, n, C
    q, k, v = module.qkv(tokens).view(batch, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
    attn = (q @ k.transpose(-1, -2)) * q.shape[-1]**-0.5 + bias
    out = (attn.softmax(-1) @ v).transpose(1, 2).reshape(batch, n, channels)
    result = torch.zeros_like(padded)
    for idx, (y, x_) in enumerate(source):
        result[:, y, x_] = out[:, idx]
    return module.proj(result[:, :height, :width])


@pytest.mark.parametrize('impl', ['sdpa', 'reference'])
@pytest.mark.parametrize('height,width,shift', [(7, 14, 0), (7, 14, 4), (9, 12, 0), (9, 12, 4),
                                                (3, 5, 0), (10, 8, 2)])
def test_matches_dense_definition_at_any_size(impl, height, width, shift):
    torch.manual_seed(0)
    module = WindowAttention(8, 2, 4 if (height, width) == (10, 8) else 7, shift, impl).double()
    with torch.no_grad():
        module.relative_position_bias_table.normal_(std=1.0)
    x = torch.randn(2, height, width, 8, dtype=torch.float64)
    out = module(x)
    assert out.shape == x.shape
    assert torch.allclose(out, dense_window_attention(module, x), atol=1e-10)


def test_padding_is_invisible_to_real_pixels():
    """A partial window gives the same result whatever the map around it looks like."""
    torch.manual_seed(0)
    module = WindowAttention(8, 2, 7).eval()
    x = torch.randn(1, 9, 7, 8)
    full = module(x)
    # The second window row holds pixels 7..8 only; run them on their own.
    alone = module(x[:, 7:9])
    assert torch.allclose(full[:, 7:9], alone, atol=1e-6)


def test_mask_is_cached_per_size_and_none_without_shift_or_padding():
    device = torch.device('cpu')
    assert window_attention_mask(14, 21, 7, 0, device) is None
    mask = window_attention_mask(14, 21, 7, 4, device)
    assert mask.shape == (6, 1, 49, 49)
    assert window_attention_mask(14, 21, 7, 4, device) is mask
    assert window_attention_mask(15, 21, 7, 4, device).shape == (9, 1, 49, 49)
    padded = window_attention_mask(8, 7, 7, 0, device)
    # second window: one real row (7 pixels) and 42 padded pixels; real queries see real keys only
    assert (padded[1, 0, :7, :7] == 0).all() and (padded[1, 0, :7, 7:] == MASK_VALUE).all()
    assert (padded[0] == 0).all()


def test_relative_position_index_is_recomputed_not_saved():
    module = WindowAttention(8, 2, 7)
    assert 'relative_position_index' not in module.state_dict()
    assert module.relative_position_index.shape == (49, 49)
    assert module.relative_position_index.max() == 13 * 13 - 1


@pytest.mark.parametrize('kwargs,match', [
    (dict(embed_dims=10, num_heads=3, window_size=7), 'divisible by num_heads'),
    (dict(embed_dims=8, num_heads=2, window_size=7, shift_size=7), 'shift_size'),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WindowAttention(**kwargs)
