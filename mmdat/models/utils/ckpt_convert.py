"""Conversion of the official DAT and DAT++ checkpoints (LeapLabTHU/DAT) to mmdat's layout."""
import re
from typing import Dict

import torch

#: Keys that only the official layout has.
_OFFICIAL_MARKERS = ('patch_proj.0.weight', 'stages.0.layer_norms.0.norm.weight')
#: A key that only the official DAT++ layout has (the second conv of its stem).
_DATPP_MARKER = 'patch_proj.3.weight'

#: Stem renames of v1 (patch conv and norm) and of DAT++ (conv, norm, GELU, conv, norm).
_STEM_RENAMES = [
    (r'^patch_proj\.0\.', 'patch_embed.conv.'),
    (r'^patch_proj\.1\.norm\.', 'patch_embed.norm.'),
]
_DATPP_STEM_RENAMES = [
    (r'^patch_proj\.0\.', 'patch_embed.conv1.'),
    (r'^patch_proj\.1\.norm\.', 'patch_embed.norm1.'),
    (r'^patch_proj\.3\.', 'patch_embed.conv2.'),
    (r'^patch_proj\.4\.norm\.', 'patch_embed.norm2.'),
]
#: ``(pattern, replacement)`` applied in order to every official key after the stem's.
_RENAMES = [
    (r'^down_projs\.(\d)\.0\.', lambda m: f'stages.{int(m[1]) + 1}.downsample.conv.'),
    (r'^down_projs\.(\d)\.1\.norm\.', lambda m: f'stages.{int(m[1]) + 1}.downsample.norm.'),
    (r'^cls_norm\.norm\.', 'norm3.'),
    # the output norms of the official detection and segmentation backbones
    (r'^norms\.(\d)\.norm\.', r'norm\1.'),
    (r'^stages\.(\d)\.layer_norms\.(\d+)\.norm\.',
     lambda m: f'stages.{m[1]}.blocks.{int(m[2]) // 2}.norm{int(m[2]) % 2 + 1}.'),
    (r'^stages\.(\d)\.mlps\.(\d+)\.chunk\.linear(\d)\.', r'stages.\1.blocks.\2.mlp.fc\3.'),
    (r'^stages\.(\d)\.mlps\.(\d+)\.linear(\d)\.0\.', r'stages.\1.blocks.\2.mlp.fc\3.'),
    (r'^stages\.(\d)\.mlps\.(\d+)\.dwc\.', r'stages.\1.blocks.\2.mlp.dwconv.'),
    (r'^stages\.(\d)\.local_perception_units\.(\d+)\.', r'stages.\1.blocks.\2.lpu.'),
    (r'^stages\.(\d)\.attns\.(\d+)\.', r'stages.\1.blocks.\2.attn.'),
    (r'\.attn\.proj_qkv\.', '.attn.qkv.'),
    (r'\.attn\.conv_offset\.0\.', '.attn.offset_net.dwconv.'),
    (r'\.attn\.conv_offset\.1\.norm\.', '.attn.offset_net.norm.'),
    (r'\.attn\.conv_offset\.3\.', '.attn.offset_net.proj.'),
]
#: Official entries mmdat does not keep: the classifier and buffers it recomputes.
_DROPPED = re.compile(r'^cls_head\.|relative_position_index$|attn_mask$')


def is_official_dat(state_dict: Dict[str, torch.Tensor]) -> bool:
    """Whether ``state_dict`` has the layout of the official DAT or DAT++ backbones."""
    return any(key in state_dict for key in _OFFICIAL_MARKERS)


def is_official_datpp(state_dict: Dict[str, torch.Tensor]) -> bool:
    """Whether ``state_dict`` has the layout of the official DAT++ backbones (conv stem)."""
    return _DATPP_MARKER in state_dict


def dat_converter(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Convert an official DAT or DAT++ state dict to the layout of :class:`mmdat.models.DAT`.

    The version is told by the stem (DAT++ has a second stem conv). The classifier head is
    dropped and the classifier's final norm becomes ``norm3``, the norm of the last output, so
    that the last output equals the official ``cls_norm`` features; the output norms of the
    official detection/segmentation backbones (``norms.i``) become ``norm{i}``. 1x1 convs
    become linear layers. Recomputed buffers (relative position index, window masks) are
    dropped.

    Args:
        state_dict (dict[str, Tensor]): The official model's weights (without ``backbone.``).

    Returns:
        dict[str, Tensor]: Weights for ``DAT(arch=..., out_indices=(..., 3))``, with ``arch``
        one of ``'tiny'``, ``'small'``, ``'base'`` or, for DAT++, ``'tiny++'``, ``'small++'``,
        ``'base++'``.
    """
    renames = (_DATPP_STEM_RENAMES if is_official_datpp(state_dict) else _STEM_RENAMES) + _RENAMES
    converted = {}
    window_blocks = {key[:-len('.proj_qkv.weight')] for key in state_dict
                     if key.endswith('.proj_qkv.weight')}
    for key, value in state_dict.items():
        if _DROPPED.search(key):
            continue
        new_key = key
        block = key.rsplit('.', 2)[0]
        if block in window_blocks and key.startswith(f'{block}.proj_out.'):
            # the window blocks' output projection; the deformable blocks keep the name
            new_key = f'{block}.proj.{key.rsplit(".", 1)[1]}'
        for pattern, replacement in renames:
            new_key = re.sub(pattern, replacement, new_key)
        if value.dim() == 4 and value.shape[2:] == (1, 1):
            value = value.flatten(1)
        converted[new_key] = value
    return converted


def is_official_dat_det_seg(state_dict: Dict[str, torch.Tensor]) -> bool:
    """Whether ``state_dict`` is a whole official DAT/DAT++ detector or segmentor (mmdet 2.x /
    mmseg 0.x, from LeapLabTHU/DAT-Detection or DAT-Segmentation)."""
    return any(f'backbone.{key}' in state_dict for key in _OFFICIAL_MARKERS)


def dat_det_seg_converter(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Convert an official DAT/DAT++ detector or segmentor to mmdet 3.x / mmseg 1.x with mmdat.

    ``backbone.`` weights are converted with :func:`dat_converter` (the official per-output norms
    ``norms.i`` become ``norm{i}``). The necks and heads these models use (FPN; RetinaNet, RPN,
    standard and cascade RoI heads with their mask heads; UperNet, FCN and FPN decode heads) kept
    their parameter names from mmdet 2.x to 3.x and mmseg 0.x to 1.x, so their weights are
    copied as they are.

    Args:
        state_dict (dict[str, Tensor]): The official model's ``state_dict``.

    Returns:
        dict[str, Tensor]: Weights for the matching mmdet/mmseg model with a ``DAT`` backbone.
    """
    backbone = {k[len('backbone.'):]: v for k, v in state_dict.items() if k.startswith('backbone.')}
    converted = {f'backbone.{k}': v for k, v in dat_converter(backbone).items()}
    converted.update((k, v) for k, v in state_dict.items() if not k.startswith('backbone.'))
    return converted
