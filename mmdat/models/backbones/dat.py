"""DAT (Xia et al., CVPR 2022) and DAT++ (arXiv 2309.01430) backbones."""
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from mmengine.model import BaseModule

from mmdat.registry import register_model
from ..layers import (IMPLEMENTATIONS, MLP, DeformableAttention, DeformableAttentionPP, NeighborhoodAttention,
                      WindowAttention, block_attn_impl, check_attn_impl)
from ..layers.tracing import pad_to_multiple
from ..utils import check_pretrained_file, load_backbone_weights

#: Stem stride and output strides of the stages: 4, 8, 16, 32.
STEM_STRIDE = 4
NUM_STAGES = 4
#: Depthwise kernel of the offset network in each stage (the official v1 and DAT++ values).
OFFSET_KERNEL_SIZES = (9, 7, 5, 3)
#: DAT++: stride of the offset network, i.e. spacing of the reference points, in each stage.
OFFSET_STRIDES = (8, 4, 2, 1)
MLP_RATIO = 4
OFFSET_RANGE_FACTOR = 2.0


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch of a sample with probability ``p``."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0], ) + (1, ) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f'p={self.p}'


class ConvDownsample(nn.Module):
    """Non-overlapping ``stride x stride`` conv followed by LayerNorm.

    The input is zero-padded at the bottom and right to a multiple of ``stride``, so the output
    size is ``ceil(size / stride)``.

    Args:
        in_channels (int): Input channels.
        out_channels (int): Output channels.
        stride (int): Kernel size and stride of the conv.
        bias (bool): Whether the conv has a bias.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, bias: bool):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(in_channels, out_channels, stride, stride, bias=bias)
        self.norm = nn.LayerNorm(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x (Tensor): ``(B, C, H, W)``. Returns: Tensor ``(B, H', W', C')``."""
        height, width = x.shape[2:]
        x = F.pad(x, (0, pad_to_multiple(width, self.stride), 0, pad_to_multiple(height, self.stride)))
        return self.norm(self.conv(x).permute(0, 2, 3, 1))


class ConvStem(nn.Module):
    """DAT++ stem: two 3x3 stride-2 convs (with LayerNorm, GELU between), stride 4 in all.

    Args:
        in_channels (int): Input channels.
        out_channels (int): Output channels; the first conv has half as many.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels // 2, 3, 2, 1)
        self.norm1 = nn.LayerNorm(out_channels // 2)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(out_channels // 2, out_channels, 3, 2, 1)
        self.norm2 = nn.LayerNorm(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x (Tensor): ``(B, C, H, W)``. Returns: Tensor ``(B, ceil(H/4), ceil(W/4), C')``."""
        x = self.act(self.norm1(self.conv1(x).permute(0, 2, 3, 1)))
        return self.norm2(self.conv2(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class OverlappingDownsample(nn.Module):
    """DAT++ downsampling: 3x3 stride-2 conv (padding 1, no bias) and LayerNorm.

    Args:
        in_channels (int): Input channels.
        out_channels (int): Output channels.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, 2, 1, bias=False)
        self.norm = nn.LayerNorm(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x (Tensor): ``(B, C, H, W)``. Returns: Tensor ``(B, ceil(H/2), ceil(W/2), C')``."""
        return self.norm(self.conv(x).permute(0, 2, 3, 1))


def _residual(x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """``x + branch``; without autograd, summed in place in ``branch``.

    A branch's output (a conv's, a linear layer's, or DropPath's product) is a new tensor that
    nothing else holds, so in inference the sum needs no new map: on CPU each new map of this
    size costs page faults as well as the pass over it. Autograd would have to track the
    in-place sum on a view (linear layers return one), so training sums out of place.
    """
    if (torch.is_grad_enabled() and (x.requires_grad or branch.requires_grad)) or branch.dtype != x.dtype:
        return x + branch  # the dtype: e.g. a bfloat16 branch under autocast, a float32 stream
    return branch.add_(x)


class DATBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``.

    DAT++ blocks (``datpp=True``) start with a local perception unit, ``x + dwconv3x3(x)``,
    and their :class:`~mmdat.models.layers.MLP` has a depthwise conv; v1 blocks have a plain
    two-layer MLP.

    Args:
        embed_dims (int): Channels.
        attn (nn.Module): Token mixer mapping ``(B, H, W, C)`` to the same shape.
        drop_path (float): Stochastic depth rate of both residual branches.
        with_cp (bool): Recompute the block in backward instead of storing its activations.
        datpp (bool): DAT++ block (local perception unit, MLP with a depthwise conv).
    """

    def __init__(self, embed_dims: int, attn: nn.Module, drop_path: float = 0.0,
                 with_cp: bool = False, datpp: bool = False):
        super().__init__()
        self.with_cp = with_cp
        self.lpu = nn.Conv2d(embed_dims, embed_dims, 3, 1, 1, groups=embed_dims) if datpp else None
        self.norm1 = nn.LayerNorm(embed_dims)
        self.attn = attn
        self.norm2 = nn.LayerNorm(embed_dims)
        self.mlp = MLP(embed_dims, MLP_RATIO * embed_dims, dwconv=datpp)
        self.drop_path = DropPath(drop_path)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lpu is not None:
            x = _residual(x, self.lpu(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
        x = _residual(x, self.drop_path(self.attn(self.norm1(x))))
        return _residual(x, self.drop_path(self.mlp(self.norm2(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_cp and x.requires_grad:
            return cp.checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)


def _deformable(stage: dict, attn_impl: str) -> nn.Module:
    if stage['datpp']:
        return DeformableAttentionPP(stage['embed_dims'], stage['num_heads'], stage['offset_groups'],
                                     stage['offset_kernel_size'], stage['offset_stride'], stage['table_size'],
                                     attn_impl)
    return DeformableAttention(stage['embed_dims'], stage['num_heads'], stage['offset_groups'],
                               stage['offset_kernel_size'], stage['table_size'], OFFSET_RANGE_FACTOR, attn_impl)


#: Each block letter: the layer kind it has (for the attention policy, see
#: :func:`~mmdat.models.layers.policy.block_attn_impl`) and how a stage builds it from its
#: arguments (see :class:`DATStage`) and the block's ``attn_impl``.
BLOCK_TYPES: Dict[str, Tuple[str, Callable[[dict, str], nn.Module]]] = dict(
    W=(WindowAttention.LAYER, lambda stage, impl: WindowAttention(
        stage['embed_dims'], stage['num_heads'], stage['window_size'], 0, impl)),
    S=(WindowAttention.LAYER, lambda stage, impl: WindowAttention(
        stage['embed_dims'], stage['num_heads'], stage['window_size'], -(-stage['window_size'] // 2), impl)),
    N=(NeighborhoodAttention.LAYER, lambda stage, impl: NeighborhoodAttention(
        stage['embed_dims'], stage['num_heads'], stage['window_size'], impl, stage['with_cp'])),
    D=(DeformableAttention.LAYER, _deformable),
)


class DATStage(nn.Module):
    """A downsampling layer (except in the first stage) and a sequence of :class:`DATBlock`.

    Block ``i`` uses the attention named by ``block_types[i]`` (:data:`BLOCK_TYPES`): ``'W'``
    window, ``'S'`` shifted-window (shift ``ceil(window_size / 2)``), ``'D'`` deformable (v1's
    :class:`DeformableAttention`, or :class:`DeformableAttentionPP` in DAT++ stages) and ``'N'``
    neighborhood attention (kernel ``window_size``).

    Args:
        in_channels (int): Channels entering the stage.
        embed_dims (int): Channels inside the stage.
        block_types (str): Attention of each block, one letter per block (see above).
        num_heads (int): Attention heads of every block.
        offset_groups (int): Offset groups of the deformable blocks.
        window_size (int): Window side of the window blocks, kernel of the neighborhood blocks.
        offset_kernel_size (int): Depthwise kernel of the offset network.
        offset_stride (int): DAT++: stride of the offset network.
        table_size (int): Map size the deformable position bias table is made for.
        drop_path_rates (Sequence[float]): Stochastic depth rate of each block.
        downsample (bool): Start with a stride-2 conv (no bias) and LayerNorm: 2x2 in v1,
            3x3 with padding 1 in DAT++.
        datpp (bool): DAT++ stage (blocks, downsampling and deformable attention of DAT++).
        attn_impl (str): The backbone's ``attn_impl``; each block gets
            :func:`block_attn_impl` of it.
        with_cp (bool): Gradient checkpointing of every block (neighborhood blocks then leave
            natten out under ``'auto'``).
    """

    def __init__(self, in_channels: int, embed_dims: int, block_types: str, num_heads: int,
                 offset_groups: int, window_size: int, offset_kernel_size: int, offset_stride: int,
                 table_size: int, drop_path_rates: Sequence[float], downsample: bool, datpp: bool,
                 attn_impl: str, with_cp: bool):
        super().__init__()
        if not downsample:
            self.downsample = None
        elif datpp:
            self.downsample = OverlappingDownsample(in_channels, embed_dims)
        else:
            self.downsample = ConvDownsample(in_channels, embed_dims, 2, bias=False)
        stage = dict(embed_dims=embed_dims, num_heads=num_heads, offset_groups=offset_groups,
                     window_size=window_size, offset_kernel_size=offset_kernel_size,
                     offset_stride=offset_stride, table_size=table_size, datpp=datpp, with_cp=with_cp)
        self.blocks = nn.ModuleList()
        for i, block_type in enumerate(block_types):
            if block_type not in BLOCK_TYPES:
                raise ValueError(f'Unknown block type {block_type!r}')
            layer, build = BLOCK_TYPES[block_type]
            attn = build(stage, block_attn_impl(attn_impl, layer))
            self.blocks.append(DATBlock(embed_dims, attn, drop_path_rates[i], with_cp, datpp))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x (Tensor): ``(B, H, W, C)``. Returns: Tensor ``(B, H', W', C')``."""
        if self.downsample is not None:
            x = self.downsample(x.permute(0, 3, 1, 2))
        for block in self.blocks:
            x = block(x)
        return x


@register_model
class DAT(BaseModule):
    """Deformable Attention Transformer backbone: DAT (CVPR 2022) and DAT++.

    Papers: `Vision Transformer with Deformable Attention <https://arxiv.org/abs/2201.00520>`_
    and `DAT++: Spatially Dynamic Vision Transformer with Deformable Attention
    <https://arxiv.org/abs/2309.01430>`_. A hierarchical transformer with outputs at strides 4,
    8, 16 and 32. Works at any input size: the outputs have ``ceil(size / stride)`` pixels a side.

    - DAT (``'tiny'``, ``'small'``, ``'base'``): a 4x4 patch stem and 2x2 downsampling convs;
      stages 1-2 alternate window and shifted-window attention, stages 3-4 window and
      deformable attention; plain MLPs.
    - DAT++ (``'tiny++'``, ``'small++'``, ``'base++'``): a convolutional stem (two 3x3 stride-2
      convs) and 3x3 stride-2 downsampling convs; stages 1-3 alternate neighborhood attention
      (kernel ``window_size``) and DAT++ deformable attention (reference points every 8, 4, 2,
      1 pixels, offset kernels 9, 7, 5, 3, positions clamped to the map), stage 4 is
      deformable only; every block starts with a local perception unit (a residual 3x3
      depthwise conv) and has a depthwise-conv MLP.

    Args:
        arch (str | dict): A key of :attr:`arch_zoo`, or a dict with the keys of its entries:
            ``embed_dims`` (channels of stage 1, doubled in each later stage), ``depths``,
            ``num_heads`` and ``offset_groups`` (one per stage), and for DAT++ also
            ``version=2`` and ``block_types`` (one string per stage with a letter per block,
            ``'N'`` neighborhood or ``'D'`` deformable attention). In a v1 dict (``version``
            1 or absent) ``offset_groups[i] > 0`` makes stage ``i`` alternate window and
            deformable attention with that many offset groups, 0 window and shifted-window
            attention. Defaults to ``'tiny'``.
        in_channels (int): Channels of the input image. Defaults to 3.
        pretrain_img_size (int): Image size of pre-training; sets the size of the deformable
            position bias tables (``2 * size / stride - 1`` a side) so that checkpoints load
            as they are. Defaults to 224.
        window_size (int): Window side of the window blocks (v1), kernel of the neighborhood
            attention (DAT++, odd). Defaults to 7.
        out_indices (Sequence[int]): Stages whose outputs are returned, in ``0..3``; the outputs
            come in stage order whatever the order given (as mmdet's Swin). Defaults to
            ``(0, 1, 2, 3)``.
        drop_path_rate (float): Stochastic depth rate, increasing linearly over the blocks from
            0 to this value. Defaults to 0.1.
        attn_impl (str): How attention is computed: one vocabulary for every block, from the
            table of :mod:`mmdat.models.layers.policy`: ``'sdpa'``
            (:func:`torch.nn.functional.scaled_dot_product_attention` with the bias as
            ``attn_mask``), ``'reference'`` (plain matmul and softmax, the same function),
            ``'fused'`` (deformable blocks sample the position bias inside a kernel and never
            store an ``N x N`` tensor: Triton on CUDA, a C++ kernel compiled on first use on CPU;
            DAT++'s neighborhood blocks compute their ``K**2`` scores per query in a C++ kernel
            on CPU, the tiles elsewhere; the other blocks use SDPA), ``'natten'`` (DAT++: the
            neighborhood blocks run natten's kernels, the others SDPA), or ``'auto'``: per call,
            the deformable blocks run the fused kernel on CUDA (with Triton) and on CPU from 512
            scores per query row (map width x keys), the neighborhood blocks the C++ kernel on
            CPU; otherwise SDPA, except on CPU when the bias needs a gradient
            (training) and for attention over fewer than 128 keys (windows, neighborhoods),
            where matmuls are faster; in DAT++ elsewhere than CPU, natten for the neighborhood blocks when a
            compatible natten is installed and ``with_cp`` is off (natten 0.14's backward does
            not work under non-reentrant checkpointing). Each kernel checks itself against the
            reference math the first time it runs on a device type and dtype; under ``'auto'``
            one that fails is left out after a warning, an explicit value raises.
            Defaults to ``'auto'``.
        with_cp (bool): Gradient checkpointing: less memory, same results, slower backward.
            Defaults to False.
        frozen_stages (int): Stages to freeze (no gradients, eval mode), ``-1..4``; 0 freezes
            the stem only, ``i > 0`` the stem and the first ``i`` stages with their output norms.
            Defaults to -1.
        init_cfg (dict, optional): ``None`` for the default initialisation, or
            ``dict(type='Pretrained', checkpoint=PATH)`` to load a checkpoint: mmdat's (a
            backbone, or a whole model whose ``backbone.`` weights are used) or an official DAT
            or DAT++ classification file, converted on the fly. Position tables of another
            window or pre-training size are resized. ``checkpoint=None`` means no file has been
            chosen yet: ``init_weights`` then stops with an error that says how to choose one
            (mmdat's configs set it from their top-level ``pretrained``, see
            :mod:`mmdat.models.utils.pretrained`), as it does for a missing file.
            Defaults to None.
    """
    arch_zoo: Dict[str, dict] = {
        'tiny': dict(embed_dims=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
                     offset_groups=(0, 0, 3, 6)),
        'small': dict(embed_dims=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24),
                      offset_groups=(0, 0, 3, 6)),
        'base': dict(embed_dims=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32),
                     offset_groups=(0, 0, 4, 8)),
        'tiny++': dict(version=2, embed_dims=64, depths=(2, 4, 18, 2), num_heads=(2, 4, 8, 16),
                       offset_groups=(1, 2, 4, 8), block_types=('ND', 'ND' * 2, 'ND' * 9, 'DD')),
        'small++': dict(version=2, embed_dims=96, depths=(2, 4, 18, 2), num_heads=(3, 6, 12, 24),
                        offset_groups=(1, 2, 3, 6), block_types=('ND', 'ND' * 2, 'ND' * 9, 'DD')),
        'base++': dict(version=2, embed_dims=128, depths=(2, 4, 18, 2), num_heads=(4, 8, 16, 32),
                       offset_groups=(2, 4, 8, 16), block_types=('ND', 'ND' * 2, 'ND' * 9, 'DD')),
    }

    def __init__(self,
                 arch: Union[str, dict] = 'tiny',
                 in_channels: int = 3,
                 pretrain_img_size: int = 224,
                 window_size: int = 7,
                 out_indices: Sequence[int] = (0, 1, 2, 3),
                 drop_path_rate: float = 0.1,
                 attn_impl: str = 'auto',
                 with_cp: bool = False,
                 frozen_stages: int = -1,
                 init_cfg: Optional[dict] = None):
        if init_cfg is not None and (not isinstance(init_cfg, dict) or init_cfg.get('type') != 'Pretrained'
                                     or 'checkpoint' not in init_cfg):
            raise ValueError("init_cfg must be None or dict(type='Pretrained', checkpoint=PATH), "
                             f'got {init_cfg!r}')
        super().__init__(init_cfg=init_cfg)
        arch = self._check_arch(arch)
        datpp = arch['version'] == 2
        self.out_indices = self._check_out_indices(out_indices)
        if not isinstance(frozen_stages, int) or not -1 <= frozen_stages <= NUM_STAGES:
            raise ValueError(f'frozen_stages must be an int in [-1, {NUM_STAGES}], got {frozen_stages!r}')
        if (not isinstance(drop_path_rate, (int, float)) or isinstance(drop_path_rate, bool)
                or not 0.0 <= drop_path_rate < 1.0):
            raise ValueError(f'drop_path_rate must be a number in [0, 1), got {drop_path_rate!r}')
        if not isinstance(window_size, int) or window_size < 2:
            raise ValueError(f'window_size must be an int >= 2, got {window_size!r}')
        if datpp and (window_size < 3 or window_size % 2 != 1):
            raise ValueError('DAT++ uses window_size as the neighborhood attention kernel, which '
                             f'must be odd and >= 3, got {window_size!r}')
        if not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f'in_channels must be a positive int, got {in_channels!r}')
        if pretrain_img_size < STEM_STRIDE * 2**(NUM_STAGES - 1):
            raise ValueError(f'pretrain_img_size must be at least {STEM_STRIDE * 2**(NUM_STAGES - 1)}, '
                             f'got {pretrain_img_size!r}')
        self._check_attn_impl(attn_impl, arch['block_types'])
        self.arch = arch
        self.in_channels = in_channels
        self.frozen_stages = frozen_stages
        self.num_features = [arch['embed_dims'] * 2**i for i in range(NUM_STAGES)]

        if datpp:
            self.patch_embed = ConvStem(in_channels, self.num_features[0])
        else:
            self.patch_embed = ConvDownsample(in_channels, self.num_features[0], STEM_STRIDE,
                                              bias=True)
        rates = torch.linspace(0, drop_path_rate, sum(arch['depths'])).tolist()
        self.stages = nn.ModuleList()
        for i in range(NUM_STAGES):
            start = sum(arch['depths'][:i])
            self.stages.append(
                DATStage(
                    in_channels=self.num_features[i - 1] if i else self.num_features[0],
                    embed_dims=self.num_features[i],
                    block_types=arch['block_types'][i],
                    num_heads=arch['num_heads'][i],
                    offset_groups=arch['offset_groups'][i],
                    window_size=window_size,
                    offset_kernel_size=OFFSET_KERNEL_SIZES[i],
                    offset_stride=OFFSET_STRIDES[i],
                    table_size=pretrain_img_size // (STEM_STRIDE * 2**i),
                    drop_path_rates=rates[start:start + arch['depths'][i]],
                    downsample=i > 0,
                    datpp=datpp,
                    attn_impl=attn_impl,
                    with_cp=with_cp))
        for i in self.out_indices:
            self.add_module(f'norm{i}', nn.LayerNorm(self.num_features[i]))
        self._freeze_stages()

    @staticmethod
    def _check_attn_impl(attn_impl: str, block_types: Sequence[str]) -> None:
        """A known ``attn_impl`` whose kernels are installed, and that some block of the arch has
        (blocks without it run :func:`block_attn_impl` of it)."""
        layers = {BLOCK_TYPES[t][0] for types in block_types for t in types}
        if attn_impl in IMPLEMENTATIONS and not layers & set(IMPLEMENTATIONS[attn_impl].layers):
            raise ValueError(f'attn_impl={attn_impl!r} is for {" or ".join(IMPLEMENTATIONS[attn_impl].layers)} '
                             f'blocks, and this arch has none (its blocks: {" and ".join(sorted(layers))})')
        check_attn_impl(attn_impl)

    @classmethod
    def _check_arch(cls, arch: Union[str, dict]) -> dict:
        """Validate ``arch`` and return it as a dict with ``version`` and ``block_types``."""
        if isinstance(arch, str):
            if arch not in cls.arch_zoo:
                raise ValueError(f'Unknown arch {arch!r}; choose one of {sorted(cls.arch_zoo)} '
                                 'or pass a dict')
            arch = cls.arch_zoo[arch]
        elif not isinstance(arch, dict):
            raise TypeError(f'arch must be a str or a dict, got {type(arch).__name__}')
        version = arch.get('version', 1)
        if version not in (1, 2):
            raise ValueError(f'arch version must be 1 (DAT) or 2 (DAT++), got {version!r}')
        keys = {'embed_dims', 'depths', 'num_heads', 'offset_groups'}
        if version == 2:
            keys |= {'version', 'block_types'}
        if set(arch) - {'version'} != keys - {'version'} or (version == 2 and 'version' not in arch):
            raise ValueError(f'A custom arch of version {version} needs exactly the keys '
                             f'{sorted(keys)}, got {sorted(arch)}')
        if not isinstance(arch['embed_dims'], int) or arch['embed_dims'] < 1:
            raise ValueError(f'arch embed_dims must be a positive int, got {arch["embed_dims"]!r}')
        if version == 2 and arch['embed_dims'] % 2:
            raise ValueError(f'DAT++ embed_dims must be even (the stem halves it), got {arch["embed_dims"]}')
        for key in keys - {'embed_dims', 'version'}:
            if len(arch[key]) != NUM_STAGES:
                raise ValueError(f'arch[{key!r}] needs {NUM_STAGES} values, got {arch[key]!r}')
        block_types = []
        for i in range(NUM_STAGES):
            dims, heads, groups = arch['embed_dims'] * 2**i, arch['num_heads'][i], arch['offset_groups'][i]
            depth = arch['depths'][i]
            if depth < 1:
                raise ValueError(f'arch depths must be >= 1, got {arch["depths"]!r}')
            if heads < 1 or dims % heads:
                raise ValueError(f'Stage {i}: embed_dims {dims} must be divisible by num_heads {heads}')
            if version == 1:
                if groups < 0 or (groups and heads % groups):
                    raise ValueError(f'Stage {i}: num_heads {heads} must be divisible by offset_groups '
                                     f'{groups} (or offset_groups 0 for shifted windows)')
                block_types.append(('WD' if groups else 'WS') * (depth // 2) + 'W' * (depth % 2))
                continue
            types = arch['block_types'][i]
            if not isinstance(types, str) or len(types) != depth or set(types) - set('ND'):
                raise ValueError(f'Stage {i}: block_types must be a string of {depth} letters N '
                                 f'(neighborhood) or D (deformable), got {types!r}')
            if groups < 1 or heads % groups:
                raise ValueError(f'Stage {i}: num_heads {heads} must be divisible by offset_groups '
                                 f'{groups} (>= 1)')
            block_types.append(types)
        return dict(arch, version=version, block_types=tuple(block_types))

    @staticmethod
    def _check_out_indices(out_indices: Sequence[int]) -> List[int]:
        if isinstance(out_indices, int):
            out_indices = [out_indices]
        indices = list(out_indices)
        if (not indices or len(set(indices)) != len(indices)
                or any(not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < NUM_STAGES
                       for i in indices)):
            raise ValueError(f'out_indices must be distinct ints in [0, {NUM_STAGES - 1}], '
                             f'got {out_indices!r}')
        return sorted(indices)

    def _freeze_stages(self) -> None:
        frozen: List[nn.Module] = [self.patch_embed] if self.frozen_stages >= 0 else []
        for i in range(self.frozen_stages):
            frozen.append(self.stages[i])
            if i in self.out_indices:
                frozen.append(getattr(self, f'norm{i}'))
        for module in frozen:
            module.eval()
            for param in module.parameters():
                param.requires_grad = False

    def train(self, mode: bool = True) -> 'DAT':
        """Set training mode, keeping the frozen stages in eval mode."""
        super().train(mode)
        self._freeze_stages()
        return self

    def init_weights(self) -> None:
        if self.init_cfg is None:
            for module in self.modules():
                if isinstance(module, nn.Linear):
                    nn.init.trunc_normal_(module.weight, std=0.02)
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)
                elif isinstance(module, nn.LayerNorm):
                    nn.init.ones_(module.weight)
                    nn.init.zeros_(module.bias)
            return
        checkpoint = self.init_cfg['checkpoint']
        check_pretrained_file(checkpoint)  # a one-line error, also under mmdet's/mmseg's tools
        self.load_pretrained(checkpoint)

    def load_pretrained(self, checkpoint: str) -> List[str]:
        """Load an mmdat or official DAT/DAT++ checkpoint (see ``init_cfg``) into the backbone:
        :func:`~mmdat.models.utils.pretrained.load_backbone_weights`.

        Returns:
            list[str]: Names of the parameters left at their initialisation.
        """
        return load_backbone_weights(self, checkpoint)

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f'DAT expects a 4D (N, C, H, W) tensor, got {shape}')
        if x.shape[0] == 0:
            raise ValueError(f'DAT got an empty batch (input of shape {tuple(x.shape)})')
        if x.shape[1] != self.in_channels:
            raise ValueError(f'DAT expects {self.in_channels} input channels (in_channels), '
                             f'got {x.shape[1]} in an input of shape {tuple(x.shape)}')
        if min(x.shape[2:]) < STEM_STRIDE:
            raise ValueError(f'DAT needs inputs of at least {STEM_STRIDE}x{STEM_STRIDE} pixels '
                             f'(one stem patch), got {tuple(x.shape[2:])}')

    def forward(self, x: torch.Tensor) -> tuple:
        """Args:
            x (Tensor): Images ``(N, C, H, W)`` of any size of at least 4x4.

        Returns:
            tuple[Tensor]: For each index of ``out_indices``, the normalised output of that stage,
            ``(N, C_i, ceil(H / s_i), ceil(W / s_i))`` with ``s_i = 4 * 2**i``.
        """
        self._check_input(x)
        x = self.patch_embed(x)
        outs = []
        for i, stage in enumerate(self.stages[:self.out_indices[-1] + 1]):
            x = stage(x)
            if i in self.out_indices:
                outs.append(getattr(self, f'norm{i}')(x).permute(0, 3, 1, 2).contiguous())
        return tuple(outs)
