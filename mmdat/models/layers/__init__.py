from .attention import ATTN_IMPLS, MASK_VALUE, biased_attention, check_attn_impl
from .deformable_attention import DeformableAttention, OffsetNetwork, pixel_centre_grid
from .window_attention import WindowAttention, window_attention_mask

__all__ = [
    'ATTN_IMPLS', 'MASK_VALUE', 'biased_attention', 'check_attn_impl', 'DeformableAttention',
    'OffsetNetwork', 'pixel_centre_grid', 'WindowAttention', 'window_attention_mask'
]
