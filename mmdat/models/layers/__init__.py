from .attention_math import (MASK_VALUE, attention_probabilities, biased_attention, reference_deformable_attention,
                             reference_neighborhood_attention, sampled_position_bias)
from .cpu_deformable import cpu_deformable_attention, cpu_kernel_available
from .deformable_attention import (DeformableAttention, OffsetNetwork, deformable_attention_op,
                                   pixel_centre_grid)
from .deformable_attention_pp import (DeformableAttentionPP, StridedOffsetNetwork, datpp_query_grid,
                                      datpp_reference_grid)
from .mlp import MLP
from .natten_kernel import installed as natten_available
from .neighborhood_attention import NeighborhoodAttention, neighborhood_attention
from .policy import (IMPLEMENTATIONS, Implementation, Kernel, attn_impls, block_attn_impl, check_attn_impl,
                     resolve_attn_impl)
from .triton_deformable import fused_deformable_attention
from .window_attention import WindowAttention, build_window_attention_mask, window_attention_mask

__all__ = [
    'MASK_VALUE', 'attention_probabilities', 'biased_attention', 'reference_deformable_attention',
    'reference_neighborhood_attention', 'sampled_position_bias', 'cpu_deformable_attention',
    'cpu_kernel_available', 'DeformableAttention', 'OffsetNetwork', 'deformable_attention_op', 'pixel_centre_grid',
    'DeformableAttentionPP', 'StridedOffsetNetwork', 'datpp_query_grid', 'datpp_reference_grid', 'MLP',
    'natten_available',
    'NeighborhoodAttention', 'neighborhood_attention', 'IMPLEMENTATIONS', 'Implementation', 'Kernel',
    'attn_impls', 'block_attn_impl', 'check_attn_impl', 'resolve_attn_impl', 'fused_deformable_attention',
    'WindowAttention', 'build_window_attention_mask', 'window_attention_mask'
]
