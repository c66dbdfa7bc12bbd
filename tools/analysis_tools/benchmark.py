"""Speed and memory of the DAT backbone and of its deformable attention, per attention path.

A command line over :mod:`mmdat.utils.benchmark` (models, inputs, timing, one process per
cell). Seven modes; all but ``--peers`` and ``--profile`` (for Swin) import only torch,
mmengine and mmdat, so they run where mmcv/mmdet are absent:

* default: backbone throughput (images/s) and peak memory for inference and for a training
  step (forward + backward of the backbone, no optimizer), for each arch x input size x
  attention path, printed as one Markdown table::

      python tools/analysis_tools/benchmark.py --archs tiny small base \\
          --sizes 224 512 800x1333 --paths reference sdpa fused --batch 2 --amp bf16

* ``--op``: the attention op alone at the shapes of stage 3 (the largest deformable maps) for one
  arch (DAT v1: as many keys as queries; DAT++: its strided grid of keys) and input size, forward and
  forward + backward: the fused kernel against the materialised paths and against plain SDPA
  *without* bias on the same q/k/v (the flash attention floor)::

      python tools/analysis_tools/benchmark.py --op --archs tiny --sizes 800x1333 --batch 2 --amp bf16

  With ``--scaling`` (CPU): the C++ kernel at the shapes of every deformable stage (DAT v1: 3
  and 4; DAT++: all four), forward and forward + backward, at 1 thread and at ``--threads`` (default: the machine's
  cores) in turns in one process: the parallel tasks of the kernel's work split, the wall-time
  ratio, a load-independent proxy (the 1-thread run's CPU time over the busiest thread's in the
  N-thread run) and the achieved GFLOP/s of the op's products against a square ``torch.mm``
  of about the forward's FLOPs at the same thread counts::

      python tools/analysis_tools/benchmark.py --op --scaling --device cpu --archs tiny small base \\
          --sizes 800x1333 --batch 1

* ``--blocks``: the attention module of the first two blocks of every stage alone (window,
  shifted window, deformable; DAT++: neighborhood, deformable), fed what it gets in the
  backbone at that input size, per path: where each path is fast::

      python tools/analysis_tools/benchmark.py --blocks --archs tiny --sizes 224 512 --paths reference sdpa auto

* ``--mlps``: the MLP of the first block of every stage of a DAT++ arch alone, fed what it
  gets in the backbone, with its depthwise conv and GELU through the C++ kernel and through the
  plain operators in turns in one process (CPU)::

      python tools/analysis_tools/benchmark.py --mlps --device cpu --archs tiny++ --sizes 224 800x1333

* ``--max-size``: for each path, the largest input (aspect 800:1333, sides multiples of 32) whose
  training step fits in GPU memory at the given batch::

      python tools/analysis_tools/benchmark.py --max-size --archs tiny --batch 2 --amp bf16

* ``--peers``: DAT-T, DAT-S and DAT-T++ (default ``attn_impl``) against mmdet's Swin-T and
  Swin-S, inference and training step, time and peak memory, as ratios to Swin-T: the models
  of each size and mode timed in turns in one process, the memory of each model in a process
  of its own (needs mmdet)::

      python tools/analysis_tools/benchmark.py --peers --device cpu --sizes 800x1333 --modes infer
      python tools/analysis_tools/benchmark.py --peers --device cpu --sizes 512 --modes train

* ``--profile``: where the step of each of ``--models`` spends its time, by component
  (window attention op, deformable attention op, attention projections, offsets and sampling,
  neighborhood attention op, MLP, norms, layout copies, stem and downsampling, ...;
  :mod:`mmdat.utils.step_profile`), one step of each
  model profiled per round, in turns, medians; each DAT model also as the difference from its
  Swin peer (needs mmdet for the Swin models)::

      python tools/analysis_tools/benchmark.py --profile --device cpu --sizes 800x1333 --modes train \\
          --models Swin-T Swin-S DAT-T DAT-T++ DAT-S --warmup 1 --repeats 1

Timing: ``--warmup`` untimed steps, then ``--repeats`` timed steps, each between device
synchronisations; the median is reported. Every cell runs in a fresh Python process so that
peak memory is per cell and an out-of-memory cell does not disturb the next; ``--no-isolate``
runs them in this process (faster; then CPU memory is not reported). Peak memory is, on CUDA,
``torch.cuda.max_memory_allocated`` over the timed steps (weights, input and activations
included); on CPU, the growth of the process's peak resident set size over its size before the
first step; ``--memory-limit`` caps the growth of a CPU cell's address space so that it fails
with "out of memory" instead of waking the kernel's OOM killer. ``--malloc kept`` (CPU, glibc)
starts every cell's process with glibc's allocator keeping freed memory in its heap: under
glibc's defaults each tensor over 32 MiB is a fresh mapping whose pages fault in anew at every
step, which on a VM can cost more than the step's arithmetic and varies from process to
process. The paths are the model's ``attn_impl`` values, run by its own dispatcher; a path
without a kernel for the device and dtype here, or for layers the arch lacks (the attention
policy's table), is listed as skipped, and a cell that fails
as an error row. ``--out FILE`` also writes the table there (its folder must exist).
"""
import argparse
import os
import platform
import sys
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from mmdat.models import DAT
from mmdat.models.backbones.dat import BLOCK_TYPES
from mmdat.models.layers import IMPLEMENTATIONS, attn_impls, triton_deformable
from mmdat.models.layers.policy import runs_on
from mmdat.utils import benchmark as lib
from mmdat.utils.benchmark import (AMP_DTYPES, MALLOC_SETTINGS, OP_PATHS, PEER_MODELS, PEER_OF, markdown_table,
                                   run_cell)
from mmdat.utils.step_profile import COMPONENTS

#: Every attn_impl of the model (the attention policy's table). 'auto' (the default of DAT) is
#: accepted but not run by default.
BACKBONE_PATHS = attn_impls()
#: The model the peer table divides by.
PEER_BASE = 'Swin-T'
MAX_SIZE_ASPECT = 1333 / 800


def parse_size(text: str) -> Tuple[int, int]:
    """``'224'`` -> (224, 224); ``'800x1333'`` -> (800, 1333)."""
    try:
        sides = tuple(int(s) for s in text.lower().split('x'))
    except ValueError:
        sides = ()
    if len(sides) == 1:
        sides = sides * 2
    if len(sides) != 2 or min(sides) < 32:
        raise argparse.ArgumentTypeError(f'a size is H or HxW with sides >= 32, got {text!r}')
    return sides


def skip_reason(path: str, device: str, amp: str = 'none', arch: Optional[str] = None) -> Optional[str]:
    """Why a cell of ``path`` cannot run here (None if it can), by the attention policy's own
    table: a path whose kernels run neither on the device nor in the dtype (e.g. ``'fused'``:
    C++ on CPU in float32/float64, Triton on CUDA), or for layers the arch has none of (e.g.
    ``'natten'`` in a v1 arch)."""
    dtype = AMP_DTYPES[amp] or torch.float32
    if path in IMPLEMENTATIONS and arch is not None:
        layers = {BLOCK_TYPES[letter][0] for types in DAT._check_arch(arch)['block_types'] for letter in types}
        if not layers & set(IMPLEMENTATIONS[path].layers):
            return f'skipped: no {" or ".join(IMPLEMENTATIONS[path].layers)} blocks in {arch}'
    if path in IMPLEMENTATIONS and not runs_on(path, torch.device(device), dtype):
        return f'skipped: no {path} kernel for {device} {str(dtype).replace("torch.", "")} here'
    return None


def _format_size(size: Tuple[int, int]) -> str:
    return f'{size[0]}x{size[1]}'


def _mib(peak: Optional[int]) -> str:
    return '-' if peak is None else f'{peak / 2**20:.0f}'


def _progress(row: dict, name: str = 'path') -> None:
    """One line per finished row: ``arch size mode path`` (``--peers``: ``size mode model``)."""
    result = row.get('error') or f"{row['seconds'] * 1e3:.2f} ms"
    label = [row['arch']] if 'arch' in row else []
    label += [_format_size(row['size']), row['mode'], row[name]]
    print(f"  {' '.join(label)}: {result}", flush=True)


def header(args: argparse.Namespace) -> str:
    versions = f'torch {torch.__version__}'
    if triton_deformable.TRITON_AVAILABLE:
        versions += f', triton {triton_deformable.triton.__version__}'
    memory = ('not measured (--interleave)' if args.interleave else
              'not measured (--scaling)' if args.scaling else
              'not measured (--blocks)' if args.blocks else
              'not measured (--mlps)' if args.mlps else
              'not measured (--profile)' if args.profile else
              'peak allocated (torch.cuda.max_memory_allocated)' if args.device == 'cuda' else
              'peak RSS growth of the process' if args.isolated else 'not measured (--no-isolate)')
    checkpointing = 'with_cp=True; ' if args.with_cp else ''
    timing = ('paths in turns, ' if args.interleave else
              f'1 and {args.threads} threads and torch.mm in turns, ' if args.scaling else
              'models in turns, ' if args.peers else
              'kernel and plain operators in turns, ' if args.mlps else
              'models in turns, one profiled step each per round, ' if args.profile else '')
    load = lib.load_average()
    load = f'; load average at the start {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}' if load else ''
    malloc = ('; malloc: freed memory kept in the heap (GLIBC_TUNABLES ' + MALLOC_SETTINGS['kept'] + ')'
              if args.malloc == 'kept' else '')
    return (f'Device: {lib.device_name(args.device, args.threads)} ({args.device}){load}; {versions}; '
            f'amp: {args.amp}; batch {args.batch}; {checkpointing}{timing}warm-up {args.warmup}, median of {args.repeats}; '
            f'memory: {memory}{malloc}.')


def benchmark_backbone(args: argparse.Namespace) -> Tuple[List[dict], List[str]]:
    rows = []
    for arch in args.archs:
        for size in args.sizes:
            for mode in args.modes:
                group = [dict(arch=arch, size=size, mode=mode, path=path) for path in args.paths]
                for row in group:
                    reason = skip_reason(row['path'], args.device, args.amp, arch)
                    if reason:
                        row['error'] = reason
                runnable = [row for row in group if 'error' not in row]
                if args.interleave and runnable:
                    result = run_cell(dict(kind='interleaved', arch=arch, size=size, mode=mode,
                                           paths=[row['path'] for row in runnable], **_common(args)))
                    for row in runnable:
                        row.update(dict(error=result['error']) if 'error' in result else
                                   dict(seconds=result[row['path']], peak_bytes=None))
                else:
                    for row in runnable:
                        row.update(run_cell(dict(kind='backbone', arch=arch, size=size, mode=mode,
                                                 path=row['path'], **_common(args))))
                for row in group:
                    _progress(row)
                rows += group
    lines = ['| arch | input | mode | path | images/s | ms/iter | peak MiB | speed vs reference '
             '| memory vs reference |', '|---|---|---|---|---:|---:|---:|---:|---:|']
    for row in rows:
        base = next((r for r in rows if r['path'] == 'reference' and 'seconds' in r
                     and (r['arch'], r['size'], r['mode']) == (row['arch'], row['size'], row['mode'])), None)
        cells = [row['arch'], _format_size(row['size']), row['mode'], row['path']]
        if 'error' in row:
            cells += [row['error'], '', '', '', '']
        else:
            speed = memory = ''
            if base is not None:
                speed = f'{base["seconds"] / row["seconds"]:.2f}x'
                if row['peak_bytes'] is not None and base['peak_bytes']:
                    memory = f'{row["peak_bytes"] / base["peak_bytes"]:.2f}x'
            cells += [f'{args.batch / row["seconds"]:.2f}', f'{row["seconds"] * 1e3:.1f}',
                      _mib(row['peak_bytes']), speed, memory]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return rows, lines


def benchmark_op(args: argparse.Namespace) -> Tuple[List[dict], List[str]]:
    rows = []
    for arch in args.archs:
        for size in args.sizes:
            for mode in args.modes:
                for path in args.paths:
                    row = dict(arch=arch, size=size, mode=mode, path=path)
                    reason = skip_reason(path, args.device, args.amp, arch)
                    if reason:
                        row['error'] = reason
                    else:
                        row.update(run_cell(dict(kind='op', arch=arch, size=size, mode=mode, path=path,
                                                 **_common(args))))
                    rows.append(row)
                    _progress(row)
    lines = ['| arch (stage-3 shapes) | input | queries | keys | mode | path | ms | peak MiB | time / sdpa-no-bias |',
             '|---|---|---:|---:|---|---|---:|---:|---:|']
    for row in rows:
        shapes = lib.op_shapes(row['arch'], row['size'], args.batch)
        base = next((r for r in rows if r['path'] == 'sdpa-no-bias' and 'seconds' in r
                     and (r['arch'], r['size'], r['mode']) == (row['arch'], row['size'], row['mode'])), None)
        cells = [row['arch'], _format_size(row['size']), str(shapes['height'] * shapes['width']),
                 str(shapes['key_height'] * shapes['key_width']), 'fwd' if row['mode'] == 'infer' else 'fwd+bwd',
                 row['path']]
        if 'error' in row:
            cells += [row['error'], '', '']
        else:
            ratio = f'{row["seconds"] / base["seconds"]:.2f}x' if base else ''
            cells += [f'{row["seconds"] * 1e3:.2f}', _mib(row['peak_bytes']), ratio]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return rows, lines


def _ratio(numerator: Optional[float], denominator: Optional[float]) -> str:
    return f'{numerator / denominator:.2f}x' if numerator and denominator else '-'


def benchmark_scaling(args: argparse.Namespace) -> Tuple[List[dict], List[str]]:
    """``--op --scaling``: per arch, size, deformable stage and mode, the CPU kernel's op at 1
    thread and at ``--threads`` in turns in one process, with its parallel tasks, its achieved
    GFLOP/s and that of a square ``torch.mm`` at the same thread counts."""
    rows = []
    for arch in args.archs:
        for size in args.sizes:
            result = run_cell(dict(kind='scaling', arch=arch, size=size, modes=args.modes, **_common(args)))
            print(f"  {arch} {_format_size(size)}: {result.get('error', 'done')}", flush=True)
            if 'error' in result:
                rows.append(dict(arch=arch, size=size, error=result['error']))
            for stage in result.get('stages', []):
                rows.append(dict(arch=arch, size=size, **stage))
    threads = args.threads
    lines = markdown_table(
        ['arch', 'input', 'stage (heads, map)', 'mode', f'tasks at {threads} threads', 'ms, 1 thread',
         f'ms, {threads} threads', 'wall 1 / N', 'CPU proxy 1 / N', 'GFLOP/s, 1 / N',
         'mm GFLOP/s, 1 / N (side)', 'op / mm rate, 1 / N'],
        _scaling_table(rows, args.modes, threads), right=tuple(range(4, 12)))
    return rows, lines


def _scaling_table(rows: List[dict], modes: Sequence[str], threads: int) -> List[List[str]]:
    table = []
    for row in rows:
        cells = [row['arch'], _format_size(row['size'])]
        if 'error' in row:
            table.append(cells + ['', '', row['error']] + [''] * 7)
            continue
        shapes, times = row['shapes'], row['times']
        keys = (f", keys {shapes['key_height']}x{shapes['key_width']}" if shapes['datpp'] else '')
        stage = f"{row['stage']} ({shapes['heads']}, {shapes['height']}x{shapes['width']}{keys})"
        rate = {name: t['flops'] / t['seconds'] / 1e9 for name, t in times.items()}
        matmul = [times[f'matmul {n}'] for n in (1, threads)]
        for mode in modes:
            one, many = times[f'{mode} 1'], times[f'{mode} {threads}']
            tasks = (str(row['forward_tasks']) if mode == 'infer'
                     else f"{row['forward_tasks']} fwd, {row['backward_tasks']} bwd")
            table.append(cells + [
                stage, 'fwd' if mode == 'infer' else 'fwd+bwd', tasks, f"{one['seconds'] * 1e3:.2f}",
                f"{many['seconds'] * 1e3:.2f}", _ratio(one['seconds'], many['seconds']),
                _ratio(one['busiest_cpu_seconds'], many['busiest_cpu_seconds']),
                f"{rate[f'{mode} 1']:.1f} / {rate[f'{mode} {threads}']:.1f}",
                f"{rate['matmul 1']:.1f} / {rate[f'matmul {threads}']:.1f} ({row['matmul_side']})",
                f"{rate[f'{mode} 1'] / rate['matmul 1']:.2f} / "
                f"{rate[f'{mode} {threads}'] / rate[f'matmul {threads}']:.2f}"])
    return table


def benchmark_blocks(args: argparse.Namespace) -> Tuple[List[dict], List[str]]:
    rows = []
    for arch in args.archs:
        for size in args.sizes:
            for mode in args.modes:
                for path in args.paths:
                    reason = skip_reason(path, args.device, args.amp, arch)
                    result = dict(error=reason) if reason else run_cell(
                        dict(kind='blocks', arch=arch, size=size, mode=mode, path=path, **_common(args)))
                    row = dict(arch=arch, size=size, mode=mode, path=path)
                    print(f"  {arch} {_format_size(size)} {mode} {path}: {result.get('error', 'done')}", flush=True)
                    if 'error' in result:
                        rows.append(dict(row, error=result['error']))
                    for index, block in enumerate(result.get('blocks', [])):
                        rows.append(dict(row, index=index, stage=index // 2 + 1, **block))
    lines = ['| arch | input | stage | block | map | mode | path | ms | time / reference |',
             '|---|---|---:|---|---|---|---|---:|---:|']
    for row in rows:
        cells = [row['arch'], _format_size(row['size'])]
        if 'error' in row:
            lines.append('| ' + ' | '.join(cells + ['', '', '', row['mode'], row['path'], row['error'], '']) + ' |')
            continue
        key = (row['arch'], row['size'], row['mode'], row['index'])
        base = next((r for r in rows if r['path'] == 'reference' and 'seconds' in r and
                     (r['arch'], r['size'], r['mode'], r['index']) == key), None)
        ratio = f"{row['seconds'] / base['seconds']:.2f}x" if base else ''
        cells += [str(row['stage']), row['block'], row['map'], 'fwd' if row['mode'] == 'infer' else 'fwd+bwd',
                  row['path'], f"{row['seconds'] * 1e3:.2f}", ratio]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return rows, lines


def benchmark_mlps(args: argparse.Namespace) -> Tuple[List[dict], List[str]]:
    """``--mlps``: per DAT++ arch, size and mode, the first MLP of every stage with its conv and
    GELU through the C++ kernel and through the plain operators, in turns."""
    rows = []
    for arch in args.archs:
        for size in args.sizes:
            for mode in args.modes:
                result = run_cell(dict(kind='mlps', arch=arch, size=size, mode=mode, **_common(args)))
                print(f"  {arch} {_format_size(size)} {mode}: {result.get('error', 'done')}", flush=True)
                row = dict(arch=arch, size=size, mode=mode)
                if 'error' in result:
                    rows.append(dict(row, error=result['error']))
                for stage, mlp in enumerate(result.get('mlps', []), 1):
                    rows.append(dict(row, stage=stage, **mlp))
    table = []
    for row in rows:
        cells = [row['arch'], _format_size(row['size'])]
        if 'error' in row:
            table.append(cells + ['', '', row['mode'], row['error'], '', ''])
            continue
        kernel, plain = (row['seconds'][path] for path in lib.MLP_PATHS)
        table.append(cells + [str(row['stage']), f"{row['map']} x {row['channels']}",
                              'fwd' if row['mode'] == 'infer' else 'fwd+bwd', f'{kernel * 1e3:.2f}',
                              f'{plain * 1e3:.2f}', f'{plain / kernel:.2f}x'])
    lines = markdown_table(['arch', 'input', 'stage', 'hidden map', 'mode', 'ms, kernel', 'ms, plain operators',
                            'speed-up'], table, right=(2, 5, 6, 7))
    return rows, lines


def benchmark_peers(args: argparse.Namespace) -> Tuple[List[dict], List[str]]:
    """The peer table: every model of each size and mode timed in turns in one process, then
    the memory of each model in a process of its own."""
    rows = []
    models = {name: PEER_MODELS[name] for name in args.models}
    for size in args.sizes:
        for mode in args.modes:
            group = [dict(model=name, size=size, mode=mode) for name in models]
            times = run_cell(dict(kind='interleaved', size=size, mode=mode, models=models, **_common(args)))
            for row in group:
                row.update(dict(error=times['error']) if 'error' in times else dict(seconds=times[row['model']]))
                if args.isolated and 'error' not in row:
                    memory = run_cell(dict(kind='backbone', size=size, mode=mode, model=models[row['model']],
                                           **dict(_common(args), warmup=0, repeats=1)))
                    row['peak_bytes'] = memory.get('peak_bytes')
                    if 'error' in memory:
                        row['memory_error'] = memory['error']
                _progress(row, 'model')
            rows += group
    table = []
    for row in rows:
        base = next((r for r in rows if r['model'] == PEER_BASE and 'seconds' in r
                     and (r['size'], r['mode']) == (row['size'], row['mode'])), None)
        cells = [row['model'], _format_size(row['size']), 'inference' if row['mode'] == 'infer' else 'training step']
        if 'error' in row:
            table.append(cells + [row['error'], '', '', '', '', '', ''])
            continue
        peak = row.get('peak_bytes')
        peer = next((r for r in rows if r['model'] == PEER_OF[row['model']] and 'seconds' in r
                     and (r['size'], r['mode']) == (row['size'], row['mode'])), None)
        ratios = []
        for ref in (base, peer):
            speed = f"{row['seconds'] / ref['seconds']:.2f}x" if ref else ''
            memory = (f"{peak / ref['peak_bytes']:.2f}x" if ref and peak is not None and ref.get('peak_bytes')
                      else '')
            ratios.append((speed, memory))
        table.append(cells + [f"{row['seconds']:.3f}", ratios[0][0], row.get('memory_error') or _mib(peak),
                              ratios[0][1], PEER_OF[row['model']], *ratios[1]])
    lines = markdown_table(['model', 'input', 'mode', 's/iter', f'time / {PEER_BASE}', 'peak MiB',
                            f'memory / {PEER_BASE}', 'peer', 'time / peer', 'memory / peer'], table,
                           right=(3, 4, 5, 6, 8, 9))
    return rows, lines


def benchmark_profile(args: argparse.Namespace) -> Tuple[List[dict], List[str]]:
    """Per size and mode, one table: the seconds of each component per model (and its share of
    the model's step); for a model whose Swin peer ran too, the difference from the peer."""
    rows, lines = [], []
    models = {name: PEER_MODELS[name] for name in args.models}
    for size in args.sizes:
        for mode in args.modes:
            result = run_cell(dict(kind='profile', size=size, mode=mode, models=models, **_common(args)))
            print(f"  {_format_size(size)} {mode}: {result.get('error', 'done')}", flush=True)
            rows.append(dict(size=size, mode=mode, **result))
            title = f"{_format_size(size)}, {'inference' if mode == 'infer' else 'training step'}"
            if 'error' in result:
                lines += ['', f"{title}: {result['error']}"]
                continue
            table = []
            for component in COMPONENTS + ('sum', 'profiled step'):
                cells = [component]
                for name in models:
                    times = result[name]
                    total = sum(times.get(c, 0.0) for c in COMPONENTS)
                    value = total if component == 'sum' else times.get(component, 0.0)
                    text = f'{value:.2f} s' if component == 'profiled step' else f'{value:.2f} s ({value / total:.0%})'
                    peer = PEER_OF[name]
                    if peer != name and peer in result and component in COMPONENTS + ('sum', ):
                        peer_times = result[peer]
                        peer_value = (sum(peer_times.get(c, 0.0) for c in COMPONENTS) if component == 'sum'
                                      else peer_times.get(component, 0.0))
                        text += f', {value - peer_value:+.2f} s'
                    cells.append(text)
                table.append(cells)
            lines += ['', f'{title}; seconds (share of the step{", difference from its Swin peer" if any(PEER_OF[n] != n and PEER_OF[n] in models for n in models) else ""}):', '']
            lines += markdown_table(['component'] + list(models), table, right=tuple(range(1, len(models) + 1)))
    return rows, lines


def max_size_height(size_of: Callable[[int], Tuple[int, int]], fits: Callable[[Tuple[int, int]], bool],
                    low: int, high: int, step: int) -> Optional[int]:
    """The largest height in ``low, low + step, ..., <= high`` whose size fits (None if ``low``
    does not): doubling from ``low``, then bisection. Assumes that fitting is monotone in size."""
    if not fits(size_of(low)):
        return None
    good, bad = low, None
    while bad is None:
        candidate = min(high, good * 2)
        if candidate == good:
            return good
        if fits(size_of(candidate)):
            good = candidate
        else:
            bad = candidate
    while bad - good > step:
        middle = good + (bad - good) // 2 // step * step
        if fits(size_of(middle)):
            good = middle
        else:
            bad = middle
    return good


def _aspect_size(height: int) -> Tuple[int, int]:
    """``height`` x the width of the 800:1333 aspect, rounded to a multiple of 32."""
    return height, max(32, round(height * MAX_SIZE_ASPECT / 32) * 32)


def benchmark_max_size(args: argparse.Namespace) -> Tuple[List[dict], List[str]]:
    rows = []
    for arch in args.archs:
        for path in args.paths:
            row = dict(arch=arch, path=path)
            reason = skip_reason(path, args.device, args.amp, arch)
            if reason:
                row['error'] = reason
            else:
                errors = []

                def fits(size: Tuple[int, int]) -> bool:
                    result = run_cell(dict(kind='probe', arch=arch, size=size, path=path, **_common(args)))
                    print(f"  {arch} {path} {_format_size(size)}: {result.get('error') or 'fits'}", flush=True)
                    if result.get('error') not in (None, 'out of memory'):
                        errors.append(result['error'])
                    return 'error' not in result

                height = max_size_height(_aspect_size, fits, args.min_height, args.max_height, 32)
                if errors:
                    row['error'] = 'failed: ' + errors[0]
                elif height is None:
                    row['error'] = f'{_format_size(_aspect_size(args.min_height))} does not fit'
                else:
                    row['size'] = _aspect_size(height)
                    row['capped'] = height == args.max_height
            rows.append(row)
    lines = ['| arch | path | largest training input | pixels vs reference |', '|---|---|---|---:|']
    for row in rows:
        if 'error' in row:
            lines.append(f"| {row['arch']} | {row['path']} | {row['error']} | |")
            continue
        base = next((r for r in rows if r['arch'] == row['arch'] and r['path'] == 'reference'
                     and 'size' in r), None)
        ratio = f"{row['size'][0] * row['size'][1] / (base['size'][0] * base['size'][1]):.2f}x" if base else ''
        capped = f' (the --max-height cap)' if row['capped'] else ''
        lines.append(f"| {row['arch']} | {row['path']} | {_format_size(row['size'])}{capped} | {ratio} |")
    return rows, lines


def _common(args: argparse.Namespace) -> dict:
    return dict(device=args.device, amp=args.amp, batch=args.batch, warmup=args.warmup,
                repeats=args.repeats, isolated=args.isolated, threads=args.threads,
                memory_limit_gib=args.memory_limit, with_cp=args.with_cp, malloc=args.malloc)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    task = parser.add_mutually_exclusive_group()
    task.add_argument('--op', action='store_true', help='benchmark the attention op alone at stage-3 shapes')
    parser.add_argument('--scaling', action='store_true',
                        help='with --op --device cpu: the CPU kernel at the shapes of every deformable '
                             'stage, at 1 thread and at --threads (default: the machine\'s cores) in turns, '
                             'with its parallel tasks and its GFLOP/s against a torch.mm\'s')
    task.add_argument('--blocks', action='store_true',
                      help='benchmark the attention module of the first two blocks of each stage alone')
    task.add_argument('--mlps', action='store_true',
                      help="DAT++'s MLPs alone (first block of each stage), their conv and GELU through the "
                           'C++ kernel and through the plain operators (CPU)')
    task.add_argument('--max-size', action='store_true',
                      help='search the largest input whose training step fits (CUDA only)')
    task.add_argument('--peers', action='store_true',
                      help=f'DAT against mmdet\'s Swin Transformer, ratios to {PEER_BASE} and to each '
                           'model\'s Swin peer (needs mmdet)')
    task.add_argument('--profile', action='store_true',
                      help='the step of each of --models profiled by component (needs mmdet for Swin)')
    parser.add_argument('--archs', nargs='+', default=['tiny', 'small', 'base'], choices=sorted(DAT.arch_zoo))
    parser.add_argument('--models', nargs='+', default=list(PEER_MODELS), choices=list(PEER_MODELS),
                        help=f'--peers, --profile: the models (default: all; {PEER_BASE} is the base of the '
                             'ratios)')
    parser.add_argument('--sizes', nargs='+', type=parse_size, default=None,
                        help='input sizes, H or HxW (default: 224 512 800x1333)')
    parser.add_argument('--paths', nargs='+', default=None,
                        help=f'attention paths: {BACKBONE_PATHS} (--op: {OP_PATHS}); default: all '
                             "but 'auto'")
    parser.add_argument('--modes', nargs='+', default=['infer', 'train'], choices=['infer', 'train'],
                        help='infer: forward under inference_mode; train: forward + backward')
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--amp', default='none', choices=sorted(AMP_DTYPES),
                        help='autocast dtype (the op mode runs its inputs in this dtype)')
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--repeats', type=int, default=10)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                        choices=['cuda', 'cpu'])
    parser.add_argument('--interleave', action='store_true',
                        help='time the paths of each arch/size/mode in turns in one process (steadier '
                             'on a shared machine; no memory column)')
    parser.add_argument('--threads', type=int, default=None,
                        help='CPU threads of torch (default: torch\'s choice; --scaling: the machine\'s '
                             'cores); 1 avoids the large slowdown of busy-waiting OpenMP threads on a '
                             'machine shared with other jobs')
    parser.add_argument('--memory-limit', type=float, default=None, metavar='GIB',
                        help='CPU: let every cell\'s process grow its address space (RLIMIT_AS; more '
                             'than its resident memory) by at most this many GiB, so that a cell that '
                             'needs more is reported as out of memory')
    parser.add_argument('--with-cp', action='store_true',
                        help='gradient checkpointing of every block (with_cp=True) in the backbones built '
                             '(default mode, --peers, --profile)')
    parser.add_argument('--malloc', default='system', choices=list(MALLOC_SETTINGS),
                        help='CPU, glibc: the allocator settings of every cell\'s process. system: the C '
                             'library\'s defaults (each tensor over 32 MiB is fresh memory, faulted in '
                             'anew at every step); kept: freed memory stays in the heap, so steps after '
                             'the first reuse touched pages, as a caching allocator would')
    parser.add_argument('--no-isolate', dest='isolated', action='store_false',
                        help='run every cell in this process (no per-cell CPU memory)')
    parser.add_argument('--min-height', type=int, default=224, help='--max-size: smallest height tried')
    parser.add_argument('--max-height', type=int, default=4096, help='--max-size: largest height tried')
    parser.add_argument('--out', help='also write the table (Markdown) to this file; its folder must exist')
    args = parser.parse_args(argv)
    if args.scaling:
        if not args.op or args.device != 'cpu':
            parser.error('--scaling measures the CPU kernel: it needs --op and --device cpu')
        if args.paths is not None or args.amp != 'none':
            parser.error('--scaling times the CPU kernel in float32: no --paths or --amp')
        if args.threads is None:
            args.threads = os.cpu_count() or 1
        if args.threads < 2:
            parser.error('--scaling compares 1 thread with --threads N: N must be >= 2')
    if args.mlps:
        if args.device != 'cpu' or args.paths is not None:
            parser.error('--mlps times the CPU kernel of the MLPs: it needs --device cpu and no --paths')
        v1 = [arch for arch in args.archs if not arch.endswith('++')]
        if v1:
            parser.error(f"--mlps compares DAT++'s MLPs (a depthwise conv): {v1} are DAT v1 archs")
    allowed = OP_PATHS if args.op else BACKBONE_PATHS
    args.paths = args.paths or [p for p in allowed if p != 'auto']
    bad = [p for p in args.paths if p not in allowed]
    if bad:
        parser.error(f'unknown paths {bad}; choose from {allowed}')
    args.sizes = args.sizes or [(224, 224), (512, 512), (800, 1333)]
    if args.device == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda: CUDA is not available')
    if args.max_size and args.device != 'cuda':
        parser.error('--max-size searches GPU memory; it needs --device cuda')
    if args.interleave and (args.op or args.blocks or args.mlps or args.max_size or args.peers or args.profile):
        parser.error('--interleave applies to the backbone table only (--peers always times in turns)')
    if args.memory_limit is not None and (args.device != 'cpu' or not args.isolated
                                          or args.memory_limit <= 0):
        parser.error('--memory-limit is a positive number of GiB, for CPU cells in their own '
                     'processes (not with --device cuda or --no-isolate)')
    if args.malloc != 'system' and (args.device != 'cpu' or not args.isolated
                                    or platform.libc_ver()[0] != 'glibc'):
        parser.error(f'--malloc {args.malloc} sets glibc\'s allocator in each cell\'s process: it needs '
                     '--device cpu, cells in their own processes (not --no-isolate) and glibc')
    if args.with_cp and (args.op or args.blocks or args.mlps):
        parser.error('--with-cp applies to whole backbones (not --op, --blocks or --mlps)')
    if args.threads is not None and args.threads < 1:
        parser.error('--threads must be >= 1')
    if args.batch < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error('--batch and --repeats must be >= 1, --warmup >= 0')
    if not 32 <= args.min_height <= args.max_height or args.min_height % 32 or args.max_height % 32:
        parser.error('--min-height and --max-height must be multiples of 32 with 32 <= min <= max')
    if args.amp == 'fp16' and args.device == 'cpu':
        parser.error('--amp fp16 needs CUDA (CPU autocast runs bfloat16)')
    if args.out is not None:
        # checked now rather than after a run of many minutes
        folder = Path(args.out).expanduser().resolve().parent
        if not folder.is_dir():
            parser.error(f'--out: the folder {folder} does not exist')
        if Path(args.out).is_dir():
            parser.error(f'--out: {args.out} is a folder; give a file name')
    return args


def main(argv: Optional[Sequence[str]] = None) -> Tuple[List[dict], str]:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    title = header(args)
    print(title, flush=True)
    if args.scaling:
        rows, lines = benchmark_scaling(args)
    elif args.op:
        rows, lines = benchmark_op(args)
    elif args.blocks:
        rows, lines = benchmark_blocks(args)
    elif args.mlps:
        rows, lines = benchmark_mlps(args)
    elif args.max_size:
        rows, lines = benchmark_max_size(args)
    elif args.peers:
        rows, lines = benchmark_peers(args)
    elif args.profile:
        rows, lines = benchmark_profile(args)
    else:
        rows, lines = benchmark_backbone(args)
    table = '\n'.join([title, ''] + lines)
    print('\n' + table)
    if args.out:
        out = Path(args.out).expanduser().resolve()
        out.write_text(table + '\n')
        print(f'\nTable written to {out}')
    return rows, table


if __name__ == '__main__':
    main()
