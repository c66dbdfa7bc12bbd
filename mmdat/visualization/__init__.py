"""Drawing helpers (need matplotlib, unlike :mod:`mmdat.models`)."""
from .deformable import (STAGE_STRIDES, draw_deformable_attention, pixel_centre, query_index,
                         to_image_pixels, top_keys)
from .predictions import DRAW_OVERLAP, DRAW_SCORE_THR, detections_to_draw, draw_prediction

__all__ = [
    'DRAW_OVERLAP', 'DRAW_SCORE_THR', 'detections_to_draw', 'draw_prediction', 'STAGE_STRIDES', 'draw_deformable_attention', 'pixel_centre', 'query_index', 'to_image_pixels',
    'top_keys'
]
