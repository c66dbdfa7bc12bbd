from .attention import ATTN_IMPLS, MASK_VALUE, biased_attention, check_attn_impl
from .deformable_attention import DeformableAttention, OffsetNetwork, pixel_centre_grid
from .deformable_attention_pp import (DeformableAttentionPP, StridedOffsetNetwork,
                                      datpp_query_grid, datpp_reference_grid)
from .neighborhood_attention import (NA_IMPLS, NeighborhoodAttention, natten_available,
                                     neighborhood_attention)
from .window_attention import WindowAttention, window_attention_mask

__all__ = [
    'ATTN_IMPLS', 'MASK_VALUE', 'biased_attention', 'check_attn_impl', 'DeformableAttention',
    'OffsetNetwork', 'pixel_centre_grid', 'DeformableAttentionPP', 'StridedOffsetNetwork',
    'datpp_query_grid', 'datpp_reference_grid', 'NA_IMPLS', 'NeighborhoodAttention',
    'natten_available', 'neighborhood_attention', 'WindowAttention', 'window_attention_mask'
]
