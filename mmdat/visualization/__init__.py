"""Drawing helpers (need matplotlib, unlike :mod:`mmdat.models`)."""
from .deformable import (STAGE_STRIDES, draw_deformable_attention, pixel_centre, query_index,
                         to_image_pixels, top_keys)

__all__ = [
    'STAGE_STRIDES', 'draw_deformable_attention', 'pixel_centre', 'query_index', 'to_image_pixels',
    'top_keys'
]
