"""Where a backbone's step spends its time, by component: the window attention op, the deformable
attention op, projections, offsets and sampling, neighborhood attention op, MLP, norms, layout copies, ...

One step runs under :mod:`torch.profiler` (CPU activities). Forward hooks open a named range
(``record_function``) around every module that names a component (:func:`module_components`),
so each operator of the forward falls in the innermost such range; backward operators have no
module, and are given to the component of the forward operator that recorded them (autograd's
sequence number, which the profiler keeps on both). Checkpointed modules recompute their
forward inside backward, under their own ranges again. Each operator's *self* time is counted
once, so the components add up to the profiled step (profiler overhead included; the shares are
what matters).

Works for mmdat's DAT and mmdet's Swin Transformer (modules are recognised by class name, so
mmdet is not imported here).
"""
import contextlib
import time
from collections import defaultdict
from typing import Callable, Dict, Iterator, Optional

import torch
import torch.nn as nn
from torch.profiler import ProfilerActivity, profile

#: The components, in the order of the tables.
COMPONENTS = ('window attention op', 'deformable attention op', 'attention projections',
              'offsets and sampling', 'neighborhood attention op', 'MLP', 'norms', 'layout copies',
              'stem and downsampling', 'local perception unit', 'other')
#: The labels of attention modules -> the component of their attention op; their other operators
#: are split further (:func:`operator_component`).
ATTENTION_OPS = {'window attention': 'window attention op', 'deformable attention': 'deformable attention op'}

#: Module class names (of the class or a base class) -> component (innermost wins), or the label
#: of an attention module (:data:`ATTENTION_OPS`).
MODULE_COMPONENTS = {
    'DeformableAttention': 'deformable attention',  # and DAT++'s, a subclass
    'WindowAttention': 'window attention', 'ShiftWindowMSA': 'window attention',  # DAT's, mmdet Swin's
    'NeighborhoodAttention': 'neighborhood attention op',
    'OffsetNetwork': 'offsets and sampling',
    'MLP': 'MLP', 'FFN': 'MLP',  # DAT's, mmdet Swin's
    'LayerNorm': 'norms',
    'ConvDownsample': 'stem and downsampling', 'OverlappingDownsample': 'stem and downsampling',
    'ConvStem': 'stem and downsampling', 'PatchEmbed': 'stem and downsampling',
    'PatchMerging': 'stem and downsampling',
}
#: Operators that only move data (their time is layout, wherever they run), except inside the
#: neighborhood attention op, whose gathers (tiles, off the CPU kernel) are its own cost.
LAYOUT_OPERATORS = {
    'aten::copy_', 'aten::clone', 'aten::contiguous', 'aten::cat', 'aten::roll', 'aten::pad',
    'aten::constant_pad_nd', 'aten::flip', 'aten::stack', 'aten::reshape', 'aten::permute',
    'aten::transpose', 'aten::view', 'aten::flatten', 'aten::_unsafe_view', 'aten::expand',
    'aten::slice', 'aten::select', 'aten::narrow', 'aten::split', 'aten::chunk', 'aten::unbind',
    'aten::as_strided', 'aten::to', 'aten::_to_copy', 'aten::unsqueeze', 'aten::squeeze'}
#: Sampling at the deformed points (keys and values).
SAMPLING_OPERATORS = {'aten::grid_sampler', 'aten::grid_sampler_2d'}
RANGE_PREFIX = 'component::'


def module_components(model: nn.Module) -> Dict[nn.Module, str]:
    """The component each labelled module of ``model`` stands for: by class name
    (:data:`MODULE_COMPONENTS`), plus DAT++'s local perception unit (``lpu``) and the linear
    layers of attention modules (projections)."""
    labels = {}

    def visit(module: nn.Module, name: str, parent: Optional[str]) -> None:
        # by the class or the nearest base class named (e.g. DAT++'s offset network)
        label = next((MODULE_COMPONENTS[c.__name__] for c in type(module).__mro__ if c.__name__ in MODULE_COMPONENTS),
                     None)
        leaf = name.rsplit('.', 1)[-1]
        if label is None and leaf == 'lpu':
            label = 'local perception unit'
        elif isinstance(module, nn.Linear) and (parent in ATTENTION_OPS or parent == 'neighborhood attention op'):
            label = 'attention projections'
        if label is not None:
            labels[module] = label
        for child_name, child in module.named_children():
            visit(child, f'{name}.{child_name}' if name else child_name, label or parent)

    visit(model, '', None)
    return labels


def operator_component(label: Optional[str], operator: Optional[str]) -> str:
    """The component of an operator (the outermost one below the range) run in a module range
    ``label`` (None: outside every labelled module)."""
    if label == 'neighborhood attention op':
        return label
    if operator in LAYOUT_OPERATORS:
        return 'layout copies'
    if label in ATTENTION_OPS:
        return 'offsets and sampling' if operator in SAMPLING_OPERATORS else ATTENTION_OPS[label]
    return label or 'other'


@contextlib.contextmanager
def labelled_ranges(model: nn.Module) -> Iterator[None]:
    """While inside, every module of :func:`module_components` runs its forward in a profiler
    range named ``'component::' + its component``."""
    handles = []
    for module, label in module_components(model).items():
        ranges = []

        def enter(module, args, label=label, ranges=ranges):
            ranges.append(torch.autograd.profiler.record_function(RANGE_PREFIX + label))
            ranges[-1].__enter__()

        def leave(module, args, output, ranges=ranges):
            ranges.pop().__exit__(None, None, None)

        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _is_backward_node(event) -> bool:
    return event.sequence_nr >= 0 and event.name.split(': ')[-1].endswith(
        ('Backward0', 'Backward1', 'Backward2', 'Backward'))


def component_times(events) -> Dict[str, float]:
    """Self CPU seconds of profiler ``events`` (``prof.events()``) by component."""
    totals: Dict[str, float] = defaultdict(float)
    forward_component: Dict[int, str] = {}

    def walk(event, label: Optional[str], operator: Optional[str], backward: Optional[str]) -> None:
        name = event.name
        if name.startswith(RANGE_PREFIX):
            label, operator, backward = name[len(RANGE_PREFIX):], None, None
            component = operator_component(label, None)  # its own time: Python between operators
        elif backward is None and _is_backward_node(event) and event.sequence_nr in forward_component:
            backward = forward_component[event.sequence_nr]
            component = backward
        elif backward is not None:
            component = backward
        else:
            operator = operator or name
            component = operator_component(label, operator)
            if event.sequence_nr >= 0:
                # operators that make no autograd node see the next node's number too; the
                # one that makes it starts last (e.g. aten::t inside aten::linear)
                forward_component[event.sequence_nr] = component
        totals[component] += event.self_cpu_time_total * 1e-6
        for child in event.cpu_children:
            walk(child, label, operator, backward)

    roots = sorted((e for e in events if e.cpu_parent is None), key=lambda e: e.time_range.start)
    for root in roots:  # in time order: forward operators before the backward nodes they made
        walk(root, None, None, None)
    return dict(totals)


def profile_step(model: nn.Module, step: Callable[[], None]) -> Dict[str, float]:
    """Seconds by component of one call of ``step`` (a step of ``model``) under the profiler,
    and ``'profiled step'``: its wall time under the profiler."""
    with labelled_ranges(model), profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        step()
        wall = time.perf_counter() - start
    times = component_times(prof.events())
    times['profiled step'] = wall
    return times
