"""Coordinates and drawing of mmdat.visualization: points land where the model read its keys."""
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from mmdat.models import DAT
from mmdat.models.layers import DeformableAttention
from mmdat.models.utils import record_deformable_attention
from mmdat.visualization import (draw_deformable_attention, pixel_centre, query_index,
                                 to_image_pixels, top_keys)


@contextmanager
def record_positions(attn):
    """Record a bare DeformableAttention (record_deformable_attention needs a DAT around it)."""
    positions = []
    attn.recorder = lambda reference, sampled, query, key, bias, map_size: positions.append(sampled)
    try:
        yield positions
    finally:
        attn.recorder = None


def test_points_map_to_the_pixels_the_keys_were_read_from():
    """Feed a map whose channels are its own (row, column) and read the sampled keys back."""
    torch.manual_seed(0)
    height, width = 6, 9
    attn = DeformableAttention(embed_dims=4, num_heads=2, num_groups=2, offset_kernel_size=3,
                               table_size=8).eval()
    attn.offset_net.proj.weight.data.normal_(0, 3.0)  # offsets of up to a pixel
    rows, columns = torch.meshgrid(torch.arange(height, dtype=torch.float32),
                                   torch.arange(width, dtype=torch.float32), indexing='ij')
    x = torch.stack([rows, columns, rows, columns], -1)[None]  # group g reads channels 2g, 2g+1
    sampled = {}
    handle = attn.proj_k.register_forward_hook(lambda m, i, o: sampled.setdefault('keys', i[0]))
    with torch.no_grad(), record_positions(attn) as records:
        attn(x)
    handle.remove()
    keys = sampled['keys'].view(height * width, 2, 2)  # key, group, (row, column)
    for group in range(2):
        drawn = to_image_pixels(records[0][group], (height, width), stride=1).reshape(-1, 2)
        read = keys[:, group].flip(-1).double().numpy()  # (x, y)
        # zero padding breaks the ramp outside the map: compare the points inside it
        inside = ((drawn >= 0) & (drawn <= [width - 1, height - 1])).all(1)
        assert inside.sum() > 30
        np.testing.assert_allclose(drawn[inside], read[inside], atol=1e-4)
        # the half-pixel convention of align_corners=False would put them elsewhere
        normalised = records[0][group].reshape(-1, 2).flip(-1).double().numpy()
        other = (normalised + 1) / 2 * [width, height] - 0.5
        assert np.abs(other[inside] - read[inside]).max() > 0.1


def test_stride_and_scale_mapping():
    # map pixel 0 of stride 16 covers input pixels 0..15, centre 7.5; input = image * 0.5
    centre = pixel_centre(0, (4, 5), 16, (0.5, 0.5))
    np.testing.assert_allclose(centre, [15.5, 15.5])  # image pixels 0..31, centre 15.5
    for scale in [(1.0, 1.0), (0.5, 2.0), (1.3, 0.7)]:
        for index in range(20):
            x, y = pixel_centre(index, (4, 5), 16, scale)
            assert query_index(x, y, (4, 5), 16, scale) == index
    # a map corner (normalised -1 and 1) is the centre of the first and last feature pixels
    corners = to_image_pixels(torch.tensor([[-1.0, -1.0], [1.0, 1.0]]), (4, 5), 16, (0.5, 2.0))
    np.testing.assert_allclose(corners, [pixel_centre(0, (4, 5), 16, (0.5, 2.0)),
                                         pixel_centre(19, (4, 5), 16, (0.5, 2.0))])


def test_top_keys_against_a_search_over_all_pairs():
    torch.manual_seed(0)
    heads, groups, height, width = 4, 2, 3, 5
    attention = torch.rand(heads, height * width).softmax(-1)
    positions = torch.rand(groups, height, width, 2) * 2 - 1
    weights, points = top_keys(attention, positions, k=5)
    pairs = sorted(((attention[h, n].item() / heads, h, n) for h in range(heads)
                    for n in range(height * width)), reverse=True)[:5]
    torch.testing.assert_close(weights, torch.tensor([w for w, _, _ in pairs]))
    expected = [positions[h // 2].reshape(-1, 2)[n] for _, h, n in pairs]
    torch.testing.assert_close(points, torch.stack(expected))


def test_the_figure_draws_the_recorded_points():
    torch.manual_seed(0)
    model = DAT(arch=dict(embed_dims=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 4),
                          offset_groups=(0, 0, 2, 0)), drop_path_rate=0.0).eval()
    image = np.random.default_rng(0).integers(0, 255, (90, 130, 3), dtype=np.uint8)
    with torch.no_grad(), record_deformable_attention(model, query_indices=[0, 30]) as records:
        model(torch.randn(1, 3, 90, 130))
    record = records[0]
    assert record.map_size == (6, 9)
    figure = draw_deformable_attention(image, record, stride=16, top_k=4, grid_step=1)
    left, right = figure.axes
    drawn = [c.get_offsets() for c in left.collections if c.get_label().startswith('group')]
    assert len(drawn) == 2
    for group, offsets in enumerate(drawn):
        np.testing.assert_allclose(offsets, to_image_pixels(record.positions[0, group], (6, 9),
                                                            16).reshape(-1, 2))
    circles = [c.get_offsets() for c in right.collections if not c.get_label().startswith('query')]
    for row, offsets in enumerate(circles):
        _, keys = top_keys(record.attention[0, :, row], record.positions[0], 4)
        np.testing.assert_allclose(offsets, to_image_pixels(keys, (6, 9), 16))
    stars = [c.get_offsets()[0] for c in right.collections if c.get_label().startswith('query')]
    np.testing.assert_allclose(stars, [pixel_centre(0, (6, 9), 16), pixel_centre(30, (6, 9), 16)])


def test_drawing_needs_attention_of_chosen_queries():
    model = DAT(arch=dict(embed_dims=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 4),
                          offset_groups=(0, 0, 2, 0))).eval()
    with torch.no_grad(), record_deformable_attention(model) as records:
        model(torch.randn(1, 3, 64, 64))
    image = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(ValueError, match='query_indices'):
        draw_deformable_attention(image, records[0], stride=16)
