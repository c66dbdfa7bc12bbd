from .attention import (ATTN_IMPLS, MASK_VALUE, attention_probabilities, biased_attention,
                        block_attn_impl, check_attn_impl, resolve_attn_impl, sampled_position_bias)
from .cpu_deformable_attention import cpu_deformable_attention, cpu_kernel_available
from .deformable_attention import (DeformableAttention, OffsetNetwork, deformable_attention_kernel,
                                   pixel_centre_grid)
from .deformable_attention_pp import (DeformableAttentionPP, StridedOffsetNetwork,
                                      datpp_query_grid, datpp_reference_grid)
from .neighborhood_attention import (NA_IMPLS, NeighborhoodAttention, natten_available,
                                     neighborhood_attention)
from .window_attention import WindowAttention, build_window_attention_mask, window_attention_mask

__all__ = [
    'ATTN_IMPLS', 'MASK_VALUE', 'attention_probabilities', 'biased_attention', 'block_attn_impl',
    'check_attn_impl', 'resolve_attn_impl', 'sampled_position_bias', 'cpu_deformable_attention',
    'cpu_kernel_available', 'DeformableAttention', 'OffsetNetwork', 'deformable_attention_kernel',
    'pixel_centre_grid', 'DeformableAttentionPP', 'StridedOffsetNetwork', 'datpp_query_grid',
    'datpp_reference_grid', 'NA_IMPLS', 'NeighborhoodAttention', 'natten_available',
    'neighborhood_attention', 'WindowAttention',
    'build_window_attention_mask', 'window_attention_mask'
]
