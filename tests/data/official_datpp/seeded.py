"""Deterministic weights for an official-layout DAT++ state dict, shared by fixture and test."""
from typing import Dict, Sequence, Tuple

import torch


def seeded_official_weights(layout: Sequence[Tuple[str, Sequence[int]]],
                            seed: int = 0) -> Dict[str, torch.Tensor]:
    """Weights for ``layout`` (official keys and shapes, in order) drawn from ``seed``.

    Scales make every part matter: LayerNorm gains near 1, strong position tables, and offsets
    of about a tenth of the map, so that some sampling positions are clamped at the border.
    """
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for key, shape in layout:
        value = torch.randn(*shape, generator=generator)
        if 'norm' in key and key.endswith('weight'):
            value = 1 + 0.2 * value
        elif key.endswith('rpe_table') or key.endswith('rpb'):
            value = 2 * value
        else:
            value = 0.05 * value
        weights[key] = value
    return weights


def seeded_input(seed: int = 0) -> torch.Tensor:
    return 2 * torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(seed))
