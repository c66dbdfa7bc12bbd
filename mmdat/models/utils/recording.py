"""Record what the deformable attention blocks of a DAT backbone compute, on request.

Nothing is recorded, and the forward pass does nothing extra, outside
:func:`record_deformable_attention`.
"""
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..layers import DeformableAttention, attention_probabilities


@dataclass
class DeformableAttentionRecord:
    """What one deformable attention block computed in one forward pass.

    Attributes:
        stage (int): 0-based stage index (``backbone.stages[stage]``).
        block (int): Index of the block in its stage (``backbone.stages[stage].blocks[block]``).
        map_size (tuple[int, int]): ``(H, W)`` of the stage's map, i.e. of the queries.
        reference (Tensor): Reference points ``(Hk, Wk, 2)``: one per query in DAT (``Hk, Wk =
            H, W``), one every few pixels in DAT++.
        positions (Tensor): Deformed sampling positions ``(B, groups, Hk, Wk, 2)``; key ``n`` of
            head ``h`` was read at ``positions[:, h // (heads // groups)].flatten(1, 2)[:, n]``.
        attention (Tensor, optional): Attention weights ``(B, heads, Nq, Nk)`` (softmax over the
            keys, ``Nq = H * W``, ``Nk = Hk * Wk``), only the rows of ``query_indices`` when
            given; ``None`` when recorded without attention.
        query_indices (list[int], optional): Row-major indices (``y * W + x``) of the queries whose
            attention rows are kept; ``None`` when all rows are.

    Points are normalised ``(y, x)`` coordinates of the stage's ``H x W`` map, exactly as
    :meth:`DeformableAttention.sampling_positions` returned them: the module samples with
    ``grid_sample(..., align_corners=True)``, so ``-1`` and ``1`` are the centres of the first
    and last pixels.
    """
    stage: int
    block: int
    map_size: Tuple[int, int]
    reference: torch.Tensor
    positions: torch.Tensor
    attention: Optional[torch.Tensor]
    query_indices: Optional[List[int]]


class _BlockRecorder:
    """Called by one :class:`DeformableAttention` during its forward pass; appends a record."""

    def __init__(self, num_groups: int, stage: int, block: int,
                 records: List[DeformableAttentionRecord], with_attention: bool,
                 query_indices: Optional[List[int]]):
        self.num_groups = num_groups
        self.stage = stage
        self.block = block
        self.records = records
        self.with_attention = with_attention
        self.query_indices = query_indices

    def __call__(self, reference: torch.Tensor, positions: torch.Tensor, query: torch.Tensor,
                 key: torch.Tensor, bias: torch.Tensor, map_size: Tuple[int, int]) -> None:
        """Args: the module's reference ``(Hk, Wk, 2)`` and positions ``(B * groups, Hk, Wk, 2)``,
        its per-head query ``(B, heads, H * W, d)`` and key ``(B, heads, Hk * Wk, d)``, position
        bias ``(B, heads, Nq, Nk)`` and query map size ``(H, W)``.
        """
        height, width = map_size
        batch = query.shape[0]
        attention = None
        if self.with_attention:
            rows = slice(None)
            if self.query_indices is not None:
                bad = [i for i in self.query_indices if not 0 <= i < height * width]
                if bad:
                    raise ValueError(f'query_indices {bad} are outside the {height}x{width} map of '
                                     f'stage {self.stage} block {self.block}')
                rows = torch.tensor(self.query_indices, device=query.device)
            # The softmax of the reference attention path, from the module's own q, k and bias;
            # the SDPA and fused paths never materialise these weights.
            attention = attention_probabilities(query[:, :, rows].detach().float(),
                                                key.detach().float(), bias[:, :, rows].detach().float())
        self.records.append(
            DeformableAttentionRecord(
                stage=self.stage, block=self.block, map_size=tuple(map_size),
                reference=reference.detach(),
                positions=positions.detach().view(batch, self.num_groups, *reference.shape[:2], 2),
                attention=attention, query_indices=self.query_indices))


def deformable_blocks(backbone: nn.Module) -> List[Tuple[int, int]]:
    """``(stage, block)`` indices (0-based) of the deformable attention blocks of a DAT backbone."""
    stages = getattr(backbone, 'stages', None)
    if not isinstance(stages, nn.ModuleList):
        raise TypeError(f'Expected a DAT backbone (with .stages), got {type(backbone).__name__}')
    return [(i, j) for i, stage in enumerate(stages) for j, block in enumerate(stage.blocks)
            if isinstance(block.attn, DeformableAttention)]


@contextmanager
def record_deformable_attention(
        backbone: nn.Module,
        blocks: Optional[Sequence[Tuple[int, int]]] = None,
        with_attention: bool = True,
        query_indices: Optional[Sequence[int]] = None) -> Iterator[List[DeformableAttentionRecord]]:
    """Record the sampling positions and attention weights of deformable blocks.

    Inside the ``with`` block every forward pass of a chosen block appends a
    :class:`DeformableAttentionRecord` to the yielded list; on leaving it the blocks are back
    to their normal forward pass. Recording does not change the backbone's outputs. Run the
    backbone under ``torch.no_grad()``: with gradient checkpointing (``with_cp``) a block
    recomputed in the backward pass would record a second time.

    Example:
        >>> with record_deformable_attention(backbone, blocks=[(2, 1)]) as records:
        ...     backbone(images)
        >>> records[0].positions.shape  # (B, groups, H, W, 2)

    Args:
        backbone (nn.Module): A :class:`mmdat.models.DAT` backbone.
        blocks (Sequence[tuple[int, int]], optional): ``(stage, block)`` pairs, 0-based, as in
            ``backbone.stages[stage].blocks[block]``; ``None`` for every deformable block.
        with_attention (bool): Also compute the attention weights (``B x heads x Nq x Nk``
            floats per block and pass, each as large as the block's position bias).
        query_indices (Sequence[int], optional): Keep only the attention rows of these queries,
            row-major indices into each recorded block's map; ``None`` keeps all rows.

    Yields:
        list[DeformableAttentionRecord]: Filled in as the backbone runs.
    """
    available = deformable_blocks(backbone)
    if blocks is None:
        blocks = available
    else:
        blocks = [tuple(b) for b in blocks]
        wrong = [b for b in blocks if b not in available]
        if wrong:
            raise ValueError(f'{wrong} are not deformable blocks of this backbone; the (stage, '
                             f'block) pairs (0-based) of its deformable blocks are {available}')
    if not isinstance(with_attention, bool):
        raise TypeError(f'with_attention must be a bool, got {with_attention!r}')
    if query_indices is not None:
        if not with_attention:
            raise ValueError('query_indices select attention rows: they need with_attention=True')
        query_indices = [int(i) for i in query_indices]
        if not query_indices:
            raise ValueError('query_indices must name at least one query, or be None for all')
    records: List[DeformableAttentionRecord] = []
    modules = [backbone.stages[stage].blocks[block].attn for stage, block in blocks]
    busy = [(s, b) for (s, b), m in zip(blocks, modules) if m.recorder is not None]
    if busy:
        raise RuntimeError(f'Blocks {busy} are already being recorded')
    try:
        for (stage, block), module in zip(blocks, modules):
            module.recorder = _BlockRecorder(module.num_groups, stage, block, records,
                                             with_attention, query_indices)
        yield records
    finally:
        for module in modules:
            module.recorder = None
