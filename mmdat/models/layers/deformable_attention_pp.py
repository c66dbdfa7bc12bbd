"""Deformable multi-head attention of DAT++ (Xia et al., arXiv 2309.01430).

The same attention as :class:`DeformableAttention` (keys and values sampled at deformed points
shared by all queries, a deformable relative position bias read from a table), with the DAT++
formulas, which differ from v1's:

- the offset network's depthwise conv has a stride, so there are fewer reference points than
  queries (a ``ceil``-like ``(H + 2p - k) // s + 1`` per side);
- reference points of a ``n``-point axis sit at ``(i + 0.5) / (n - 1) * 2 - 1`` and offsets are
  added as they are (no tanh, no range factor), the sum being clamped to ``[-1, 1]``;
- queries sit at ``i / (n - 1) * 2 - 1`` (the ``align_corners=True`` pixel grid) when the
  position bias is looked up.
"""
from typing import Sequence, Tuple, Union

import torch
import torch.nn as nn

from .deformable_attention import DeformableAttention, OffsetNetwork


def _axis_coordinates(size, first: float, step: float, single: float, device: torch.device,
                      dtype: torch.dtype) -> torch.Tensor:
    """``(i + first) * step / (size - 1) - 1`` for ``i < size``, or ``[single]`` when ``size == 1``.

    Without a Python branch on ``size`` (``size - 1`` is read off the last index), so that a
    traced or symbolic size stays symbolic.
    """
    index = torch.arange(size, device=device, dtype=dtype)
    last = index[-1:]  # size - 1
    coords = (index + first) * (step / last.clamp(min=1)) - 1
    return torch.where(last > 0, coords, torch.full_like(coords, single))


def datpp_reference_grid(height: int, width: int, device: torch.device,
                         dtype: torch.dtype) -> torch.Tensor:
    """DAT++ reference points ``(i + 0.5) / (n - 1) * 2 - 1`` as ``(y, x)``: ``(H, W, 2)``.

    On a 1-point axis the official formula divides by zero: the reference lies at +infinity and
    the clamped sampling position is the far border, 1, whatever the offset. The point is put at
    1 here and :class:`DeformableAttentionPP` keeps the position there.
    """
    ys = _axis_coordinates(height, 0.5, 2.0, 1.0, device, dtype)
    xs = _axis_coordinates(width, 0.5, 2.0, 1.0, device, dtype)
    return torch.stack(torch.meshgrid(ys, xs, indexing='ij'), dim=-1)


def datpp_query_grid(height: int, width: int, device: torch.device,
                     dtype: torch.dtype) -> torch.Tensor:
    """DAT++ query coordinates ``i / (n - 1) * 2 - 1`` as ``(y, x)``: ``(H, W, 2)``.

    On a 1-pixel axis the official formula gives NaN (0 / 0); the query is put at the map
    centre, 0, here.
    """
    ys = _axis_coordinates(height, 0.0, 2.0, 0.0, device, dtype)
    xs = _axis_coordinates(width, 0.0, 2.0, 0.0, device, dtype)
    return torch.stack(torch.meshgrid(ys, xs, indexing='ij'), dim=-1)


class StridedOffsetNetwork(OffsetNetwork):
    """:class:`OffsetNetwork` whose depthwise conv has a stride: one offset per ``stride`` pixels.

    The padding is ``kernel_size // 2``, or 0 when ``kernel_size == stride`` (as in DAT++).

    Args:
        channels (int): Channels of one offset group.
        kernel_size (int): Odd kernel of the depthwise conv.
        stride (int): Stride of the depthwise conv.
    """

    def __init__(self, channels: int, kernel_size: int, stride: int):
        super().__init__(channels, kernel_size)
        if not isinstance(stride, int) or stride < 1:
            raise ValueError(f'offset stride must be a positive int, got {stride!r}')
        padding = 0 if kernel_size == stride else kernel_size // 2
        self.dwconv = nn.Conv2d(channels, channels, kernel_size, stride, padding, groups=channels)


class DeformableAttentionPP(DeformableAttention):
    """DAT++ deformable multi-head attention: strided reference points, clamped positions.

    Channels are split into ``num_groups`` groups; for each group a
    :class:`StridedOffsetNetwork` turns the queries into one offset per reference point
    (``stride`` pixels apart), and keys and values are bilinearly sampled at
    ``clamp(reference + offset, -1, 1)``. Each head adds a bias read from a learnable table at
    half the normalised query-key displacement. See the module docstring for the formulas.

    Args:
        embed_dims (int): Channels of the input and output.
        num_heads (int): Attention heads; must divide ``embed_dims``.
        num_groups (int): Offset groups; must divide ``num_heads``.
        offset_kernel_size (int): Depthwise kernel of the offset network.
        offset_stride (int): Stride of the offset network, i.e. the spacing of the reference
            points in pixels.
        table_size (int | tuple[int, int]): Map size the position bias table is made for; the
            table has ``2 * size - 1`` entries a side.
        attn_impl (str): As in :class:`DeformableAttention` (``'auto'``, ``'sdpa'``,
            ``'reference'`` or ``'fused'``): the kernels take the DAT++ query grid and clamped
            positions as they are, since the bias formula is v1's.
    """

    def __init__(self, embed_dims: int, num_heads: int, num_groups: int, offset_kernel_size: int,
                 offset_stride: int, table_size: Union[int, Sequence[int]],
                 attn_impl: str = 'sdpa'):
        super().__init__(embed_dims, num_heads, num_groups, offset_kernel_size, table_size,
                         attn_impl=attn_impl)
        self.offset_stride = offset_stride
        self.offset_net = StridedOffsetNetwork(embed_dims // num_groups, offset_kernel_size,
                                               offset_stride)

    def sampling_positions(self, query: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Reference points and the deformed sampling positions of each offset group.

        Args:
            query (Tensor): Projected queries ``(B, H, W, C)``.

        Returns:
            tuple[Tensor, Tensor]: ``reference`` ``(Hk, Wk, 2)`` and ``positions``
            ``(B * groups, Hk, Wk, 2)``, normalised ``(y, x)`` coordinates of the map
            (``align_corners=True`` convention); ``Hk x Wk`` is the size of the offset map.
        """
        offset = self.offset_net(self._split_groups(query))
        height, width = offset.shape[1:3]
        # a 1-point axis keeps its position at the border (see datpp_reference_grid)
        keep = torch.cat([torch.arange(n, device=offset.device)[-1:] > 0 for n in (height, width)])
        keep = keep.to(offset.dtype)
        reference = datpp_reference_grid(height, width, query.device, offset.dtype)
        return reference, (reference + offset * keep).clamp(-1.0, 1.0)

    def query_points(self, height: int, width: int, reference: torch.Tensor) -> torch.Tensor:
        """The queries of the attended map (see :func:`datpp_query_grid`), not the reference
        points, which are fewer: ``(H, W, 2)``."""
        return datpp_query_grid(height, width, reference.device, reference.dtype)

    def extra_repr(self) -> str:
        return (f'embed_dims={self.embed_dims}, num_heads={self.num_heads}, '
                f'num_groups={self.num_groups}, offset_stride={self.offset_stride}')
