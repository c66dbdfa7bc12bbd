"""Benchmark building blocks: models and inputs, timing, one process per measurement.

Used by ``tools/analysis_tools/benchmark.py`` (the command line and its tables). Imports only
torch, mmengine and mmdat; the peer models (mmdet's Swin Transformer) import mmdet when built.

A measurement is a *cell*: a JSON-able dict whose ``kind`` names a function of
:data:`CELL_FUNCTIONS`. :func:`run_cell` runs it in a fresh Python process (``python -m
mmdat.utils.benchmark --cell JSON``) so that peak memory is per cell and an out-of-memory cell
does not disturb the next, or in this process with ``isolated=False``.

Common cell keys: ``device`` (``'cpu'``/``'cuda'``), ``amp`` (a key of :data:`AMP_DTYPES`),
``batch``, ``warmup``, ``repeats``, ``isolated``, ``threads`` (torch's CPU threads or None),
``memory_limit_gib`` (CPU, isolated cells: the most the process's address space may grow),
``with_cp`` (gradient checkpointing of every block of the backbones built; default False) and
``malloc`` (isolated cells: a key of :data:`MALLOC_SETTINGS`; default ``'system'``).
"""
import functools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmdat.models import DAT
from mmdat.models.layers import (DeformableAttention, DeformableAttentionPP, datpp_query_grid, datpp_reference_grid,
                                 deformable_attention_op, pixel_centre_grid)
from mmdat.models.layers.policy import CPU_DWCONV_GELU, DEFORMABLE, layer_impls

AMP_DTYPES = {'none': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}
#: How failed allocations read (CUDA, and torch's CPU allocator in its versions).
ALLOCATION_FAILURES = ('out of memory', 'not enough memory', "can't allocate memory", 'bad_alloc')
#: Stage whose deformable maps are the largest (stride 16): the shapes of the ``op`` cells.
OP_STAGE = 2
#: The C library's allocator settings of a cell's process (``GLIBC_TUNABLES``, glibc only).
#: ``'system'``: glibc's defaults, under which every block over 32 MiB is a fresh ``mmap``,
#: unmapped when freed: each large tensor of each step faults in new zeroed pages, which on a
#: VM can cost more system time than the step's arithmetic (docs/benchmarks.md). ``'kept'``:
#: no ``mmap`` for large blocks and no trimming of the heap, so freed memory stays in the
#: process and later steps reuse touched pages, as a caching allocator (jemalloc, tcmalloc,
#: CUDA's) would; the process never gives memory back.
MALLOC_SETTINGS = {
    'system': None,
    'kept': 'glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1099511627776',
}
#: The paths of the ``op`` cells: every ``attn_impl`` of the deformable layers, run by the
#: layer's own dispatcher, and SDPA without the bias on the same q, k, v.
OP_PATHS = layer_impls(DEFORMABLE) + ('sdpa-no-bias', )

#: The models of the peer table: mmdat's DAT archs and mmdet's Swin Transformer as in its
#: detection configs (Swin-T: 2/2/6/2 blocks, Swin-S: 2/2/18/2; 96 channels, 3/6/12/24 heads,
#: window 7; Swin-B: 2/2/18/2 blocks, 128 channels, 4/8/16/32 heads, window 7, the 224x224
#: pre-trained Swin-B). Stochastic depth is off in all of them, as in the backbone cells.
PEER_MODELS = {
    'Swin-T': dict(type='swin', depths=(2, 2, 6, 2)),
    'Swin-S': dict(type='swin', depths=(2, 2, 18, 2)),
    'DAT-T': dict(type='dat', arch='tiny'),
    'DAT-S': dict(type='dat', arch='small'),
    'DAT-T++': dict(type='dat', arch='tiny++'),
    'DAT-S++': dict(type='dat', arch='small++'),
    'Swin-B': dict(type='swin', depths=(2, 2, 18, 2), embed_dims=128, num_heads=(4, 8, 16, 32)),
    'DAT-B': dict(type='dat', arch='base'),
    'DAT-B++': dict(type='dat', arch='base++'),
}
#: The Swin Transformer each model is compared with (of its size).
PEER_OF = {'Swin-T': 'Swin-T', 'DAT-T': 'Swin-T', 'DAT-T++': 'Swin-T', 'Swin-S': 'Swin-S', 'DAT-S': 'Swin-S',
           'DAT-S++': 'Swin-S', 'Swin-B': 'Swin-B', 'DAT-B': 'Swin-B', 'DAT-B++': 'Swin-B'}


def build_model(spec: dict, with_cp: bool = False) -> nn.Module:
    """A backbone from a spec: ``dict(type='dat', arch=..., attn_impl='auto')`` or
    ``dict(type='swin', depths=...)`` (mmdet's SwinTransformer; needs mmdet). Gradient
    checkpointing of every block: ``with_cp``, unless the spec sets its own ``with_cp``."""
    spec = dict(spec)
    kind = spec.pop('type')
    with_cp = spec.get('with_cp', with_cp)
    if kind == 'dat':
        return DAT(arch=spec['arch'], attn_impl=spec.get('attn_impl', 'auto'), drop_path_rate=0.0,
                   with_cp=with_cp)
    if kind == 'swin':
        from mmdet.models.backbones import SwinTransformer  # only the peer table needs mmdet
        return SwinTransformer(embed_dims=spec.get('embed_dims', 96), depths=spec['depths'],
                               num_heads=spec.get('num_heads', (3, 6, 12, 24)), window_size=7, drop_path_rate=0.0,
                               with_cp=with_cp)
    raise ValueError(f"model type must be 'dat' or 'swin', got {kind!r}")


def capture_inputs(model: nn.Module, modules: Sequence[nn.Module],
                   images: torch.Tensor) -> Dict[nn.Module, torch.Tensor]:
    """The first positional input each of ``modules`` receives in one forward of ``model``
    (under ``no_grad``; on the meta device this gives the shapes for free)."""
    inputs = {}

    def capture(module: nn.Module, args: tuple) -> None:
        inputs.setdefault(module, args[0])

    hooks = [module.register_forward_pre_hook(capture) for module in modules]
    try:
        with torch.no_grad():
            model(images)
    finally:
        for hook in hooks:
            hook.remove()
    return inputs


def attention_modules(model: DAT) -> List[nn.Module]:
    """The attention modules of the first two blocks of every stage of a DAT."""
    return [block.attn for stage in model.stages for block in stage.blocks[:2]]


def deformable_stages(arch: str) -> List[int]:
    """The stages (0-based) of a DAT built at ``arch`` that have deformable blocks."""
    model = DAT(arch=arch).to('meta')
    return [i for i, stage in enumerate(model.stages)
            if any(isinstance(m, DeformableAttention) for m in stage.modules())]


def op_shapes(arch: str, size: Tuple[int, int], batch: int, stage: int = OP_STAGE) -> dict:
    """The shapes of the first deformable block of ``stage`` (default: stage 3) of a DAT built
    at ``arch``, read from the module and from its input in a forward on the meta device: the
    query map ``height x width`` and the grid of sampled keys ``key_height x key_width`` (the
    query map in DAT v1; DAT++'s strided grid, ``datpp`` True)."""
    return dict(_op_shapes(arch, tuple(size), batch, stage))  # a copy: the cached dict stays as it is


# Building the model and its meta forward take ~0.3-0.6 s on a CPU; an op table asks for the
# same shapes for every cell and row, so they are worked out once per process.
@functools.lru_cache(maxsize=None)
def _op_shapes(arch: str, size: Tuple[int, int], batch: int, stage: int) -> dict:
    model = DAT(arch=arch).to('meta')
    attn = next((m for m in model.stages[stage].modules() if isinstance(m, DeformableAttention)), None)
    if attn is None:
        raise ValueError(f'stage {stage + 1} of {arch} has no deformable blocks')
    x = capture_inputs(model, [attn], torch.empty(batch, 3, *size, device='meta'))[attn]
    _, height, width, channels = x.shape
    with torch.no_grad():
        _, positions = attn.sampling_positions(torch.empty(1, height, width, channels, device='meta'))
    return dict(batch=batch, heads=attn.num_heads, groups=attn.num_groups, height=height, width=width,
                key_height=positions.shape[1], key_width=positions.shape[2], head_dims=channels // attn.num_heads,
                table=tuple(attn.rpe_table.shape), datpp=isinstance(attn, DeformableAttentionPP))


def op_inputs(arch: str, size: Tuple[int, int], batch: int, dtype: torch.dtype,
              device: str, stage: int = OP_STAGE) -> List[torch.Tensor]:
    """Random q, k, v, query points (the ``(H, W, 2)`` grid of the layer's queries), key
    positions and table at the shapes of :func:`op_shapes`; key positions are the layer's
    reference points moved by up to one cell of their grid (DAT v1's offsets, range factor 2,
    move them by up to one pixel), clamped to the map in DAT++ as the layer clamps them."""
    shapes = op_shapes(arch, size, batch, stage)
    height, width, key_height, key_width = (shapes[k] for k in ('height', 'width', 'key_height', 'key_width'))
    keys = key_height * key_width
    gen = torch.Generator(device=device).manual_seed(0)

    def tokens(count: int) -> torch.Tensor:
        return torch.randn(batch, shapes['heads'], count, shapes['head_dims'], device=device, dtype=dtype,
                           generator=gen)

    q, k, v = tokens(height * width), tokens(keys), tokens(keys)
    on = dict(device=torch.device(device), dtype=torch.float32)
    if shapes['datpp']:
        queries, reference = datpp_query_grid(height, width, **on), datpp_reference_grid(key_height, key_width, **on)
    else:
        queries = reference = pixel_centre_grid(height, width, **on)
    shift = torch.rand(batch * shapes['groups'], keys, 2, device=device, generator=gen) * 2 - 1
    positions = reference.view(keys, 2) + shift * reference.new_tensor([2 / key_height, 2 / key_width])
    if shapes['datpp']:
        positions = positions.clamp(-1, 1)
    table = torch.randn(shapes['table'], device=device, generator=gen) * 0.02
    return [q, k, v, queries, positions, table]


def op_function(path: str) -> Callable[..., torch.Tensor]:
    """The deformable attention op of a path of :data:`OP_PATHS`: an ``attn_impl`` as the model
    runs it (:func:`~mmdat.models.layers.deformable_attention_op`, which resolves the path once
    per call, as the layer does), or ``'sdpa-no-bias'`` (plain SDPA on the same q, k, v)."""
    if path not in OP_PATHS:
        raise ValueError(f'op path must be one of {OP_PATHS}, got {path!r}')
    if path == 'sdpa-no-bias':
        return lambda q, k, v, *_: F.scaled_dot_product_attention(q, k, v)
    return lambda *inputs: deformable_attention_op(*inputs, attn_impl=path)


def cpu_description(cpuinfo: str) -> str:
    """The CPU of a ``/proc/cpuinfo`` text: its model name and, on x86, its family and model
    numbers and widest vector instructions, e.g. ``'AMD EPYC (family 25, model 17, AVX-512)'``.
    Virtual machines often show a generic model name; the family tells CPU generations apart
    (AMD: 25 Zen 3/4, 26 Zen 5), and with them the speed of AVX-512 code, which the C++ kernels
    use and MKL's GEMM on AMD does not."""
    fields = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(':')
        fields.setdefault(key.strip(), value.strip())  # the first processor's
    name = fields.get('model name') or platform.processor() or 'CPU'
    flags = fields.get('flags', '').split()
    details = [f"family {fields['cpu family']}, model {fields.get('model', '?')}"] if 'cpu family' in fields else []
    if flags:
        details.append('AVX-512' if 'avx512f' in flags else 'AVX2' if 'avx2' in flags else 'no AVX2')
    return f"{name} ({', '.join(details)})" if details else name


def device_name(device: str, threads: Optional[int] = None) -> str:
    """The GPU's name, or the CPU (:func:`cpu_description`), its cores and torch's threads."""
    if device == 'cuda':
        return torch.cuda.get_device_name()
    try:
        with open('/proc/cpuinfo') as f:
            cpu = cpu_description(f.read())
    except OSError:
        cpu = platform.processor() or 'CPU'
    return f'{cpu}, {os.cpu_count()} cores, torch using {threads or torch.get_num_threads()} threads'


def load_average() -> Optional[Tuple[float, float, float]]:
    """The machine's 1, 5 and 15 minute load averages (None where unknown)."""
    try:
        return os.getloadavg()
    except OSError:
        return None


def _statm(field: int) -> int:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[field]) * resource.getpagesize()


def _reset_peak_rss() -> None:
    """Start the peak resident set size afresh (Linux), so that a cell's peak is its own and not
    the import's."""
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
    except OSError:
        pass


def _peak_rss_bytes() -> int:
    """This process's peak resident set size. Linux: ``VmHWM``, the peak of this program only;
    ``ru_maxrss`` also keeps the size of the process it was forked from (a large test runner or
    tool started it), which exec does not reset."""
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('VmHWM:'):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def synchronize(device: str) -> None:
    if device == 'cuda':
        torch.cuda.synchronize()


def autocast(device: str, amp: str):
    dtype = AMP_DTYPES[amp]
    return torch.autocast(device, dtype=dtype, enabled=dtype is not None)


def time_steps(step: Callable[[], None], device: str, warmup: int, repeats: int,
               isolated: bool) -> Dict[str, Optional[float]]:
    """Median seconds per step after warm-up, and the peak memory in bytes (None if unknown).

    Memory: on CUDA ``max_memory_allocated`` over the timed steps; on CPU, in an isolated
    process only, the growth of the peak resident set size over its size before the first step.
    """
    if device == 'cpu' and isolated:
        _reset_peak_rss()
    cpu_base = _statm(1) if device == 'cpu' else 0
    for _ in range(warmup):
        step()
    synchronize(device)
    if device == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    if device == 'cuda':
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = max(0, _peak_rss_bytes() - cpu_base) if isolated else None
    return dict(seconds=statistics.median(times), peak_bytes=peak)


def time_in_turns(steps: Dict[str, Callable[[], None]], device: str, warmup: int,
                  repeats: int) -> Dict[str, float]:
    """Median seconds per step of several steps timed in turns, one step each per round (the
    order rotating), so that the load of a shared machine weighs on all of them alike."""
    names = list(steps)
    for _ in range(warmup):
        for step in steps.values():
            step()
    times = {name: [] for name in names}
    for round_index in range(repeats):
        for i in range(len(names)):
            name = names[(round_index + i) % len(names)]
            synchronize(device)
            start = time.perf_counter()
            steps[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def model_step(model: nn.Module, images: torch.Tensor, mode: str, amp: str) -> Callable[[], None]:
    """One inference step (forward under ``inference_mode``) or training step (forward and
    backward of the loss ``sum(mean(output))``, no optimizer) of a backbone."""
    device = images.device.type
    if mode == 'infer':
        model.eval()

        def step():
            with torch.inference_mode(), autocast(device, amp):
                model(images)
    else:
        model.train()

        def step():
            with autocast(device, amp):
                loss = sum(out.float().mean() for out in model(images))
            loss.backward()
            model.zero_grad(set_to_none=True)

    return step


def _model_spec(cell: dict, path: Optional[str] = None) -> dict:
    """A cell's model: ``model`` (a spec), or ``arch`` and the attention ``path`` of a DAT."""
    if 'model' in cell:
        return cell['model']
    return dict(type='dat', arch=cell['arch'], attn_impl=path or cell['path'])


def _backbone_step(cell: dict, spec: dict) -> Callable[[], None]:
    torch.manual_seed(0)  # the same weights for every path
    model = build_model(spec, cell.get('with_cp', False)).to(cell['device'])
    images = torch.randn(cell['batch'], 3, *cell['size'], device=cell['device'])
    return model_step(model, images, cell['mode'], cell['amp'])


def backbone_cell(cell: dict) -> dict:
    """One (model, size, mode) measurement: median seconds per step and peak memory."""
    step = _backbone_step(cell, _model_spec(cell))
    return time_steps(step, cell['device'], cell['warmup'], cell['repeats'], cell['isolated'])


def interleaved_cell(cell: dict) -> dict:
    """Several DAT paths (``paths``) or models (``models``: name -> spec) timed in turns in
    one process: median seconds per path or model; no memory."""
    if 'models' in cell:
        specs = cell['models']
    else:
        specs = {path: _model_spec(cell, path) for path in cell['paths']}
    steps = {name: _backbone_step(cell, spec) for name, spec in specs.items()}
    return time_in_turns(steps, cell['device'], cell['warmup'], cell['repeats'])


def op_cell(cell: dict) -> dict:
    """The deformable attention op alone: forward, or forward + backward into q, k, v, key
    positions and table."""
    device = cell['device']
    dtype = AMP_DTYPES[cell['amp']] or torch.float32
    inputs = op_inputs(cell['arch'], cell['size'], cell['batch'], dtype, device)
    step = op_step(op_function(cell['path']), inputs, cell['mode'])
    return time_steps(step, device, cell['warmup'], cell['repeats'], cell['isolated'])


def op_step(fn: Callable[..., torch.Tensor], inputs: List[torch.Tensor], mode: str) -> Callable[[], None]:
    """One call of an op on the inputs of :func:`op_inputs`: forward under ``inference_mode``
    (``'infer'``), or forward + backward into q, k, v, key positions and table (``'train'``)."""
    if mode == 'infer':
        def step():
            with torch.inference_mode():
                fn(*inputs)
    else:
        inputs = [t.detach().requires_grad_(i in (0, 1, 2, 4, 5)) for i, t in enumerate(inputs)]
        grad_out = torch.randn_like(inputs[0])

        def step():
            fn(*inputs).backward(grad_out)
            for t in inputs:
                t.grad = None

    return step


#: Matmul-like products of ``B x heads x Nq x Nk x head_dims`` multiply-adds that the CPU kernel
#: computes (csrc/deformable_attention_cpu.cpp): forward, the scores ``K Q^T`` and ``V^T P^T``;
#: backward recomputes the scores from the log-sum-exp and computes ``V dO^T``, ``P dO`` (dV),
#: ``dS Q`` (dK) and ``K^T dS^T`` (dQ): 5 more. The bias, exp and softmax work is not counted.
KERNEL_PRODUCTS = dict(infer=2, train=2 + 5)


def deformable_op_flops(shapes: dict, mode: str) -> float:
    """Floating-point operations (a multiply-add is 2) of the products of the CPU kernel's
    deformable attention op at ``shapes`` (:func:`op_shapes`) in ``mode`` (``'infer'``:
    forward; ``'train'``: forward + backward): ``height x width`` queries against
    ``key_height x key_width`` keys."""
    pairs = shapes['height'] * shapes['width'] * shapes['key_height'] * shapes['key_width']
    return 2.0 * KERNEL_PRODUCTS[mode] * shapes['batch'] * shapes['heads'] * pairs * shapes['head_dims']


def matmul_side(flops: float, multiple: int = 64, low: int = 64, high: int = 4096) -> int:
    """The side ``n`` (a multiple of ``multiple`` in ``[low, high]``) of the square matmul whose
    ``2 n^3`` FLOPs are nearest ``flops``: the yardstick of the achieved rate."""
    side = round((flops / 2) ** (1 / 3) / multiple) * multiple
    return int(min(high, max(low, side)))


def thread_cpu_seconds() -> Dict[int, float]:
    """CPU seconds (user + system) of each thread of this process so far, by thread id, from
    ``/proc/self/task/*/stat`` (Linux; empty elsewhere). Ticks of the kernel's clock (10 ms)."""
    ticks = os.sysconf('SC_CLK_TCK') if hasattr(os, 'sysconf') else 100
    seconds = {}
    try:
        tasks = os.listdir('/proc/self/task')
    except OSError:
        return seconds
    for task in tasks:
        try:
            with open(f'/proc/self/task/{task}/stat') as f:
                fields = f.read().rsplit(')', 1)[1].split()  # after the command name
        except OSError:
            continue  # a thread that ended
        seconds[int(task)] = (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return seconds


def time_with_threads(steps: Dict[str, Tuple[int, Callable[[], None]]], warmup: int,
                      repeats: int) -> Dict[str, dict]:
    """Steps (name -> (torch's CPU threads, step)) timed in turns in one process, the order
    rotating, ``torch.set_num_threads`` before each: per name the median wall seconds and the
    median CPU seconds of the busiest thread during the step (see :func:`thread_cpu_seconds`;
    None where unknown)."""
    before_threads = torch.get_num_threads()
    names = list(steps)
    walls = {name: [] for name in names}
    busiest = {name: [] for name in names}
    try:
        for _ in range(warmup):
            for threads, step in steps.values():
                torch.set_num_threads(threads)
                step()
        for round_index in range(repeats):
            for i in range(len(names)):
                name = names[(round_index + i) % len(names)]
                threads, step = steps[name]
                torch.set_num_threads(threads)
                cpu = thread_cpu_seconds()
                start = time.perf_counter()
                step()
                walls[name].append(time.perf_counter() - start)
                after = thread_cpu_seconds()
                if after:
                    busiest[name].append(max(after[t] - cpu.get(t, 0.0) for t in after))
    finally:
        torch.set_num_threads(before_threads)
    return {name: dict(seconds=statistics.median(walls[name]),
                       busiest_cpu_seconds=statistics.median(busiest[name]) if busiest[name] else None)
            for name in names}


def scaling_cell(cell: dict) -> dict:
    """The CPU kernel's deformable attention op (``attn_impl='fused'``, float32) at the shapes
    of every deformable stage of ``arch`` at ``size``, in each of ``modes``, at 1 thread and at
    ``threads``, with a square float32 ``torch.mm`` of about the forward's FLOPs at both thread
    counts: all timed in turns in one process (:func:`time_with_threads`). Per stage: the
    shapes, the kernel's parallel tasks (:func:`~mmdat.models.layers.cpu_deformable.work_split`)
    and the matmul's side; per stage, mode (or ``'matmul'``) and thread count: median seconds,
    the busiest thread's median CPU seconds and FLOPs."""
    from mmdat.models.layers.cpu_deformable import supports, work_split
    if cell['device'] != 'cpu' or not supports(torch.device('cpu'), torch.float32):
        raise RuntimeError('the scaling cell needs the CPU kernel (device cpu, a C++ compiler)')
    threads = cell['threads']
    if not threads or threads < 2:
        raise ValueError(f'the scaling cell compares 1 thread with threads >= 2, got {threads}')
    counts = (1, threads)
    fn = op_function('fused')
    results = []
    for stage in deformable_stages(cell['arch']):
        shapes = op_shapes(cell['arch'], cell['size'], cell['batch'], stage)
        inputs = op_inputs(cell['arch'], cell['size'], cell['batch'], torch.float32, 'cpu', stage)
        side = matmul_side(deformable_op_flops(shapes, 'infer'))
        a, b = torch.randn(side, side), torch.randn(side, side)
        steps, flops = {}, {}
        for mode in cell['modes']:
            step = op_step(fn, inputs, mode)
            for count in counts:
                steps[f'{mode} {count}'] = count, step
                flops[f'{mode} {count}'] = deformable_op_flops(shapes, mode)
        for count in counts:
            steps[f'matmul {count}'] = count, lambda: torch.mm(a, b)
            flops[f'matmul {count}'] = 2.0 * side ** 3
        times = time_with_threads(steps, cell['warmup'], cell['repeats'])
        forward_tasks, backward_tasks = work_split(shapes['batch'], shapes['heads'], shapes['height'], threads)
        results.append(dict(stage=stage + 1, shapes=shapes, matmul_side=side, threads=threads,
                            forward_tasks=forward_tasks, backward_tasks=backward_tasks,
                            times={name: dict(times[name], flops=flops[name]) for name in steps}))
    return dict(stages=results)


def block_name(attn: nn.Module) -> str:
    """``'window'``, ``'shifted window'``, ``'deformable'``, ... for an attention module of DAT."""
    name = type(attn).__name__
    if name == 'WindowAttention':
        return 'shifted window' if attn.shift_size else 'window'
    return dict(DeformableAttention='deformable', DeformableAttentionPP='deformable++',
                NeighborhoodAttention='neighborhood').get(name, name)


def blocks_cell(cell: dict) -> dict:
    """The attention modules of the first two blocks of every stage, each timed alone on the
    input it receives in the backbone (captured in one forward). Seconds per block, in order."""
    device, amp = cell['device'], cell['amp']
    torch.manual_seed(0)
    model = DAT(arch=cell['arch'], attn_impl=cell['path'], drop_path_rate=0.0).to(device)
    attns = attention_modules(model)
    with autocast(device, amp):
        inputs = capture_inputs(model, attns, torch.randn(cell['batch'], 3, *cell['size'], device=device))
    results = []
    for attn in attns:
        x = inputs[attn].detach()
        if cell['mode'] == 'infer':
            def step():
                with torch.inference_mode(), autocast(device, amp):
                    attn(x)
        else:
            x.requires_grad_(True)

            def step():
                with autocast(device, amp):
                    out = attn(x)
                out.float().sum().backward()
                x.grad = None
                attn.zero_grad(set_to_none=True)
        timing = time_steps(step, device, cell['warmup'], cell['repeats'], isolated=False)
        results.append(dict(block=block_name(attn), map='x'.join(map(str, x.shape[1:3])),
                            seconds=timing['seconds']))
    return dict(blocks=results)


#: How the MLPs' benchmark runs DAT++'s depthwise conv and GELU (``--mlps``).
MLP_PATHS = ('kernel', 'plain operators')


def mlps_cell(cell: dict) -> dict:
    """The MLP of the first block of every stage, each timed alone on the input it receives in
    the backbone (captured in one forward), with DAT++'s conv and GELU through the C++ kernel
    and through the plain operators (:data:`MLP_PATHS`) in turns: seconds per stage and path."""
    device, amp = cell['device'], cell['amp']
    torch.manual_seed(0)
    model = DAT(arch=cell['arch'], drop_path_rate=0.0).to(device)
    mlps = [stage.blocks[0].mlp for stage in model.stages]
    if mlps[0].dwconv is None:
        raise ValueError(f"--mlps compares the kernel of DAT++'s MLPs: {cell['arch']!r} is a DAT v1 arch")
    with autocast(device, amp):
        inputs = capture_inputs(model, mlps, torch.randn(cell['batch'], 3, *cell['size'], device=device))
    results = []
    for mlp in mlps:
        x = inputs[mlp].detach()
        hidden_dtype = AMP_DTYPES[amp] or x.dtype
        if not CPU_DWCONV_GELU.module.supports(x.device, hidden_dtype):
            raise ValueError(f'the CPU kernel does not run on {device} {str(hidden_dtype).replace("torch.", "")} '
                             'hidden maps')
        steps = {path: _mlp_step(mlp, x, cell['mode'], amp, CPU_DWCONV_GELU.module if path == 'kernel' else None)
                 for path in MLP_PATHS}
        seconds = time_in_turns(steps, device, cell['warmup'], cell['repeats'])
        results.append(dict(map='x'.join(map(str, x.shape[1:3])), channels=mlp.fc1.out_features, seconds=seconds))
    return dict(mlps=results)


def _mlp_step(mlp: nn.Module, x: torch.Tensor, mode: str, amp: str, kernel) -> Callable[[], None]:
    device = x.device.type
    if mode == 'infer':
        def step():
            with torch.inference_mode(), autocast(device, amp):
                mlp.from_hidden(mlp.fc1(x), kernel)
    else:
        x = x.detach().requires_grad_(True)

        def step():
            with autocast(device, amp):
                out = mlp.from_hidden(mlp.fc1(x), kernel)
            out.float().sum().backward()
            x.grad = None
            mlp.zero_grad(set_to_none=True)
    return step


def probe_cell(cell: dict) -> dict:
    """One training step (forward + backward) at one size: does it fit?"""
    return backbone_cell(dict(cell, mode='train', warmup=0, repeats=1))


def profile_cell(cell: dict) -> dict:
    """The models of ``models`` (name -> spec), one step of each profiled by component
    (:func:`mmdat.utils.step_profile.profile_step`) per round, in turns after ``warmup`` plain
    steps of each: per model the median seconds of each component over ``repeats`` rounds."""
    from .step_profile import profile_step
    models = {}
    for name, spec in cell['models'].items():
        torch.manual_seed(0)
        model = build_model(spec, cell.get('with_cp', False)).to(cell['device'])
        images = torch.randn(cell['batch'], 3, *cell['size'], device=cell['device'])
        models[name] = model, model_step(model, images, cell['mode'], cell['amp'])
    for _ in range(cell['warmup']):
        for _, step in models.values():
            step()
    rounds = {name: [] for name in models}
    names = list(models)
    for round_index in range(cell['repeats']):
        for i in range(len(names)):
            name = names[(round_index + i) % len(names)]
            rounds[name].append(profile_step(*models[name]))
    return {name: {key: statistics.median(r.get(key, 0.0) for r in results)
                   for key in set().union(*results)} for name, results in rounds.items()}


CELL_FUNCTIONS = dict(backbone=backbone_cell, interleaved=interleaved_cell, op=op_cell, probe=probe_cell,
                      blocks=blocks_cell, mlps=mlps_cell, profile=profile_cell, scaling=scaling_cell)


def _limit_memory(gib: float) -> None:
    """Let this process's address space grow by at most ``gib``: a failed allocation then
    raises instead of waking the kernel's OOM killer, which may pick any process of the
    machine. Counted from the size the process has now (torch's libraries: ~1.3 GiB for a
    CPU build, more with CUDA), so that the limit means the same for every build."""
    limit = _statm(0) + int(gib * 2**30)
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def run_here(cell: dict) -> dict:
    """Run a cell in this process; errors (out of memory included) come back as ``error``."""
    if cell.get('threads'):
        torch.set_num_threads(cell['threads'])
    if cell.get('memory_limit_gib'):
        if not cell['isolated']:
            raise ValueError('memory_limit_gib is for isolated cells (it limits the whole process)')
        _limit_memory(cell['memory_limit_gib'])
    try:
        return CELL_FUNCTIONS[cell['kind']](cell)
    except (torch.cuda.OutOfMemoryError, MemoryError):
        return dict(error='out of memory')
    except Exception as e:  # a failing cell is an error row, whatever failed
        if isinstance(e, RuntimeError) and any(text in str(e).lower() for text in ALLOCATION_FAILURES):
            return dict(error='out of memory')  # CPU allocation failures
        return dict(error=f'{type(e).__name__}: {(str(e).strip().splitlines() or [""])[0]}')
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def malloc_environment(malloc: str, environ: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """``environ`` (default: this process's) for a child process with the allocator settings
    ``malloc`` (a key of :data:`MALLOC_SETTINGS`), added to any tunables already set."""
    if malloc not in MALLOC_SETTINGS:
        raise ValueError(f'malloc must be one of {sorted(MALLOC_SETTINGS)}, got {malloc!r}')
    env = dict(os.environ if environ is None else environ)
    tunables = MALLOC_SETTINGS[malloc]
    if tunables is not None:
        env['GLIBC_TUNABLES'] = ':'.join(filter(None, [env.get('GLIBC_TUNABLES'), tunables]))
    return env


def run_cell(cell: dict) -> dict:
    """Run a cell in a fresh Python process (or here with ``isolated=False``)."""
    if cell['kind'] not in CELL_FUNCTIONS:
        raise ValueError(f'cell kind must be one of {sorted(CELL_FUNCTIONS)}, got {cell["kind"]!r}')
    malloc = cell.get('malloc', 'system')
    if not cell['isolated']:
        if malloc != 'system':
            raise ValueError('malloc applies to isolated cells (it sets up a new process)')
        return run_here(cell)
    # The child imports the mmdat this process uses, wherever it comes from.
    root = str(Path(__file__).resolve().parents[2])
    env = malloc_environment(malloc)
    env['PYTHONPATH'] = os.pathsep.join([root] + env.get('PYTHONPATH', '').split(os.pathsep))
    child = subprocess.run([sys.executable, '-m', 'mmdat.utils.benchmark', '--cell', json.dumps(cell)],
                           env=env, capture_output=True, text=True)
    lines = child.stdout.strip().splitlines()
    if child.returncode != 0 or not lines:
        reason = 'killed (out of memory?)' if child.returncode < 0 else f'exit code {child.returncode}'
        tail = child.stderr.strip().splitlines()[-1:] or ['']
        return dict(error=f'the process failed: {reason} {tail[0]}'.strip())
    return json.loads(lines[-1])


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> List[str]:
    """Lines of a Markdown table; the columns in ``right`` right-aligned."""
    align = ['---:' if i in right else '---' for i in range(len(header))]
    return ['| ' + ' | '.join(cells) + ' |' for cells in [list(header), align] + [list(r) for r in rows]]


def main(argv: Optional[Sequence[str]] = None) -> None:
    """``--cell JSON``: run one cell here and print its result as JSON (the child of
    :func:`run_cell`)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) != 2 or argv[0] != '--cell':
        raise SystemExit('usage: python -m mmdat.utils.benchmark --cell JSON')
    cell = json.loads(argv[1])
    if 'size' in cell:
        cell['size'] = tuple(cell['size'])
    print(json.dumps(run_here(cell)))


if __name__ == '__main__':
    main()
