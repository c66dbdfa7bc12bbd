"""Speed and memory of the DAT backbone and of its deformable attention, per attention path.

Four modes (imports only torch, mmengine and mmdat, so it runs where mmcv/mmdet are absent):

* default: backbone throughput (images/s) and peak memory for inference and for a training
  step (forward + backward of the backbone, no optimizer), for each arch x input size x
  attention path, printed as one Markdown table::

      python tools/analysis_tools/benchmark.py --archs tiny small base \\
          --sizes 224 512 800x1333 --paths reference sdpa fused --batch 2 --amp bf16

* ``--op``: the attention op alone at the shapes of stage 3 (the largest deformable maps) for one
  arch and input size, forward and forward + backward: the fused kernel against the
  materialised paths and against plain SDPA *without* bias on the same q/k/v (the flash
  attention floor)::

      python tools/analysis_tools/benchmark.py --op --archs tiny --sizes 800x1333 --batch 2 --amp bf16

* ``--blocks``: the attention module of the first two blocks of every stage alone (window,
  shifted window, deformable; DAT++: neighborhood, deformable), fed what it gets in the
  backbone at that input size, per path: where each path is fast::

      python tools/analysis_tools/benchmark.py --blocks --archs tiny --sizes 224 512 --paths reference sdpa auto

* ``--max-size``: for each path, the largest input (aspect 800:1333, sides multiples of 32) whose
  training step fits in GPU memory at the given batch::

      python tools/analysis_tools/benchmark.py --max-size --archs tiny --batch 2 --amp bf16

Timing: ``--warmup`` untimed steps, then ``--repeats`` timed steps, each between device
synchronisations; the median is reported. Every cell runs in a fresh Python process so that
peak memory is per cell and an out-of-memory cell does not disturb the next; ``--no-isolate``
runs them in this process (faster; then CPU memory is not reported). Peak memory is, on CUDA,
``torch.cuda.max_memory_allocated`` over the timed steps (weights, input and activations
included); on CPU, the growth of the process's peak resident set size over its size before the
first step; ``--memory-limit`` caps the growth of a CPU cell's address space so that it fails
with "out of memory" instead of waking the kernel's OOM killer. The fused path needs CUDA; on CPU its cells
are listed as skipped.
"""
import argparse
import json
import math
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
import torch.nn.functional as F

import mmdat
from mmdat.models import DAT
from mmdat.models.layers import fused_deformable_attention as fused_module
from mmdat.models.layers.deformable_attention import pixel_centre_grid

#: 'auto' (the default of DAT: fused on CUDA; on CPU SDPA or matmuls, whichever is faster for
#: the block) is accepted but not run by default.
BACKBONE_PATHS = ('reference', 'sdpa', 'fused', 'auto')
OP_PATHS = ('reference', 'sdpa', 'fused', 'sdpa-no-bias')
AMP_DTYPES = {'none': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}
#: Stage whose deformable maps are the largest (stride 16), and the pre-training image size that
#: sets its position bias table (27 x 27 entries).
OP_STAGE = 2
PRETRAIN_IMG_SIZE = 224
MAX_SIZE_ASPECT = 1333 / 800
#: How failed allocations read (CUDA, and torch's CPU allocator in its versions).
ALLOCATION_FAILURES = ('out of memory', 'not enough memory', "can't allocate memory", 'bad_alloc')


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


def device_name(device: str, threads: Optional[int] = None) -> str:
    if device == 'cuda':
        return torch.cuda.get_device_name()
    model = platform.processor() or 'CPU'
    try:
        with open('/proc/cpuinfo') as f:
            model = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        pass
    return f'{model}, {os.cpu_count()} cores, torch using {threads or torch.get_num_threads()} threads'


def _rss_bytes() -> int:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _address_space_bytes() -> int:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[0]) * resource.getpagesize()


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _synchronize(device: str) -> None:
    if device == 'cuda':
        torch.cuda.synchronize()


def time_steps(step: Callable[[], None], device: str, warmup: int, repeats: int,
               isolated: bool) -> Dict[str, Optional[float]]:
    """Median seconds per step after warm-up, and the peak memory in bytes (None if unknown)."""
    cpu_base = _rss_bytes() if device == 'cpu' else 0
    for _ in range(warmup):
        step()
    _synchronize(device)
    if device == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        step()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    if device == 'cuda':
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = max(0, _peak_rss_bytes() - cpu_base) if isolated else None
    return dict(seconds=statistics.median(times), peak_bytes=peak)


def _autocast(device: str, amp: str):
    dtype = AMP_DTYPES[amp]
    return torch.autocast(device, dtype=dtype, enabled=dtype is not None)


def backbone_step(cell: dict, path: str) -> Callable[[], None]:
    """One inference or training step of a freshly built backbone (the same weights for every path)."""
    device, amp = cell['device'], cell['amp']
    torch.manual_seed(0)
    model = DAT(arch=cell['arch'], attn_impl=path, drop_path_rate=0.0).to(device)
    images = torch.randn(cell['batch'], 3, *cell['size'], device=device)
    if cell['mode'] == 'infer':
        model.eval()

        def step():
            with torch.inference_mode(), _autocast(device, amp):
                model(images)
    else:
        model.train()

        def step():
            with _autocast(device, amp):
                loss = sum(out.float().mean() for out in model(images))
            loss.backward()
            model.zero_grad(set_to_none=True)

    return step


def backbone_cell(cell: dict) -> dict:
    """One (arch, size, path, mode) measurement of the backbone."""
    step = backbone_step(cell, cell['path'])
    return time_steps(step, cell['device'], cell['warmup'], cell['repeats'], cell['isolated'])


def interleaved_cell(cell: dict) -> dict:
    """Several paths timed in turns, one step each per round (rotating the order), so that the
    load of a shared machine weighs on all of them alike. Median seconds per path; no memory."""
    paths = cell['paths']
    steps = {path: backbone_step(cell, path) for path in paths}
    for _ in range(cell['warmup']):
        for step in steps.values():
            step()
    times = {path: [] for path in paths}
    for round_index in range(cell['repeats']):
        for i in range(len(paths)):
            path = paths[(round_index + i) % len(paths)]
            _synchronize(cell['device'])
            start = time.perf_counter()
            steps[path]()
            _synchronize(cell['device'])
            times[path].append(time.perf_counter() - start)
    return {path: statistics.median(t) for path, t in times.items()}


def op_inputs(arch: str, size: Tuple[int, int], batch: int, dtype: torch.dtype,
              device: str) -> List[torch.Tensor]:
    """Random q, k, v, reference points, key positions and table at the shapes of stage 3."""
    zoo = DAT.arch_zoo[arch]
    heads, groups = zoo['num_heads'][OP_STAGE], zoo['offset_groups'][OP_STAGE]
    head_dims = zoo['embed_dims'] * 2**OP_STAGE // heads
    stride = 4 * 2**OP_STAGE
    height, width = (math.ceil(s / stride) for s in size)
    table_side = 2 * (PRETRAIN_IMG_SIZE // stride) - 1
    tokens = height * width
    gen = torch.Generator(device=device).manual_seed(0)
    qkv = [torch.randn(batch, heads, tokens, head_dims, device=device, dtype=dtype, generator=gen)
           for _ in range(3)]
    reference = pixel_centre_grid(height, width, torch.device(device), torch.float32).view(tokens, 2)
    # Positions moved by up to one pixel, as the offsets of DAT (range factor 2) move them.
    shift = (torch.rand(batch * groups, tokens, 2, device=device, generator=gen) * 2 - 1)
    positions = reference + shift * reference.new_tensor([2 / height, 2 / width])
    table = torch.randn(heads, table_side, table_side, device=device, generator=gen) * 0.02
    return qkv + [reference, positions, table]


def op_function(path: str) -> Callable[..., torch.Tensor]:
    def materialised_sdpa(q, k, v, reference, positions, table):
        bias = fused_module.sampled_position_bias(reference, positions, table, q.shape[0])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))

    return dict(fused=fused_module.fused_deformable_attention,
                reference=fused_module.reference_deformable_attention,
                sdpa=materialised_sdpa,
                **{'sdpa-no-bias': lambda q, k, v, *_: F.scaled_dot_product_attention(q, k, v)})[path]


def op_cell(cell: dict) -> dict:
    """The attention op alone: forward, or forward + backward into q, k, v, positions, table."""
    device = cell['device']
    dtype = AMP_DTYPES[cell['amp']] or torch.float32
    inputs = op_inputs(cell['arch'], cell['size'], cell['batch'], dtype, device)
    fn = op_function(cell['path'])
    if cell['mode'] == 'infer':
        def step():
            with torch.inference_mode():
                fn(*inputs)
    else:
        for i in (0, 1, 2, 4, 5):
            inputs[i].requires_grad_(True)
        grad_out = torch.randn_like(inputs[0])

        def step():
            fn(*inputs).backward(grad_out)
            for t in inputs:
                t.grad = None

    return time_steps(step, device, cell['warmup'], cell['repeats'], cell['isolated'])


def block_name(attn: torch.nn.Module) -> str:
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
    attns = [block.attn for stage in model.stages for block in stage.blocks[:2]]
    inputs = {}

    def capture(module: torch.nn.Module, args: tuple) -> None:
        inputs.setdefault(module, args[0])

    hooks = [attn.register_forward_pre_hook(capture) for attn in attns]
    with torch.no_grad(), _autocast(device, amp):
        model(torch.randn(cell['batch'], 3, *cell['size'], device=device))
    for hook in hooks:
        hook.remove()
    results = []
    for attn in attns:
        x = inputs[attn].detach()
        if cell['mode'] == 'infer':
            def step():
                with torch.inference_mode(), _autocast(device, amp):
                    attn(x)
        else:
            x.requires_grad_(True)

            def step():
                with _autocast(device, amp):
                    out = attn(x)
                out.float().sum().backward()
                x.grad = None
                attn.zero_grad(set_to_none=True)
        timing = time_steps(step, device, cell['warmup'], cell['repeats'], isolated=False)
        results.append(dict(block=block_name(attn), map='x'.join(map(str, x.shape[1:3])),
                            seconds=timing['seconds']))
    return dict(blocks=results)


def probe_cell(cell: dict) -> dict:
    """One training step (forward + backward) at one size: does it fit?"""
    return backbone_cell(dict(cell, mode='train', warmup=0, repeats=1))


CELL_FUNCTIONS = dict(backbone=backbone_cell, interleaved=interleaved_cell, op=op_cell, probe=probe_cell,
                      blocks=blocks_cell)


def _run_here(cell: dict) -> dict:
    if cell['threads']:
        torch.set_num_threads(cell['threads'])
    if cell.get('memory_limit_gib'):
        # Only ever set in a child process: a failed allocation then raises instead of
        # waking the kernel's OOM killer, which may pick any process of the machine. Counted
        # from the size the process has now (torch's libraries: ~1.3 GiB for a CPU build, more
        # with CUDA), so that the option means the same for every build.
        limit = _address_space_bytes() + int(cell['memory_limit_gib'] * 2**30)
        hard = resource.getrlimit(resource.RLIMIT_AS)[1]
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        return CELL_FUNCTIONS[cell['kind']](cell)
    except (torch.cuda.OutOfMemoryError, MemoryError):
        return dict(error='out of memory')
    except RuntimeError as e:  # CPU allocation failures and kernel errors
        if any(text in str(e).lower() for text in ALLOCATION_FAILURES):
            return dict(error='out of memory')
        return dict(error=f'{type(e).__name__}: {str(e).splitlines()[0]}')
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run_cell(cell: dict) -> dict:
    """Run a cell in a fresh Python process (or here with ``isolated=False``)."""
    if not cell['isolated']:
        return _run_here(cell)
    # The child imports the mmdat this process uses, wherever it comes from.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(mmdat.__file__).resolve().parents[1])] + os.environ.get('PYTHONPATH', '').split(os.pathsep)))
    child = subprocess.run([sys.executable, __file__, '--cell', json.dumps(cell)], env=env,
                           capture_output=True, text=True)
    lines = child.stdout.strip().splitlines()
    if child.returncode != 0 or not lines:
        reason = 'killed (out of memory?)' if child.returncode < 0 else f'exit code {child.returncode}'
        tail = child.stderr.strip().splitlines()[-1:] or ['']
        return dict(error=f'the process failed: {reason} {tail[0]}'.strip())
    return json.loads(lines[-1])
def skip_reason(path: str, device: str, arch: Optional[str] = None) -> Optional[str]:
    """Why a cell cannot run here (None if it can); ``arch`` when a whole DAT is built."""
    if path == 'fused' and arch is not None and DAT.arch_zoo[arch].get('version') == 2:
        return 'skipped: the fused kernel is for DAT v1 archs'
    if path == 'fused' and device != 'cuda':
        return 'skipped: the fused kernel needs CUDA'
    if path == 'fused' and not fused_module.TRITON_AVAILABLE:
        return 'skipped: Triton is not installed'
    return None


def _format_size(size: Tuple[int, int]) -> str:
    return f'{size[0]}x{size[1]}'


def _mib(peak: Optional[int]) -> str:
    return '-' if peak is None else f'{peak / 2**20:.0f}'


def _progress(row: dict) -> None:
    result = row.get('error') or f"{row['seconds'] * 1e3:.2f} ms"
    print(f"  {row['arch']} {_format_size(row['size'])} {row['mode']} {row['path']}: {result}", flush=True)


def header(args: argparse.Namespace) -> str:
    versions = f'torch {torch.__version__}'
    if fused_module.TRITON_AVAILABLE:
        versions += f', triton {fused_module.triton.__version__}'
    memory = ('not measured (--interleave)' if args.interleave else
              'not measured (--blocks)' if args.blocks else
              'peak allocated (torch.cuda.max_memory_allocated)' if args.device == 'cuda' else
              'peak RSS growth of the process' if args.isolated else 'not measured (--no-isolate)')
    timing = 'paths in turns, ' if args.interleave else ''

    return (f'Device: {device_name(args.device, args.threads)} ({args.device}); {versions}; amp: {args.amp}; '
            f'batch {args.batch}; {timing}warm-up {args.warmup}, median of {args.repeats}; memory: {memory}.')


def benchmark_backbone(args: argparse.Namespace) -> Tuple[List[dict], List[str]]:
    rows = []
    for arch in args.archs:
        for size in args.sizes:
            for mode in args.modes:
                group = [dict(arch=arch, size=size, mode=mode, path=path) for path in args.paths]
                for row in group:
                    reason = skip_reason(row['path'], args.device, arch)
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
                    reason = skip_reason(path, args.device)
                    if reason:
                        row['error'] = reason
                    else:
                        row.update(run_cell(dict(kind='op', arch=arch, size=size, mode=mode, path=path,
                                                 **_common(args))))
                    rows.append(row)
                    _progress(row)
    lines = ['| arch (stage-3 shapes) | input | tokens | mode | path | ms | peak MiB | time / sdpa-no-bias |',
             '|---|---|---:|---|---|---:|---:|---:|']
    for row in rows:
        stride = 4 * 2**OP_STAGE
        tokens = math.ceil(row['size'][0] / stride) * math.ceil(row['size'][1] / stride)
        base = next((r for r in rows if r['path'] == 'sdpa-no-bias' and 'seconds' in r
                     and (r['arch'], r['size'], r['mode']) == (row['arch'], row['size'], row['mode'])), None)
        cells = [row['arch'], _format_size(row['size']), str(tokens),
                 'fwd' if row['mode'] == 'infer' else 'fwd+bwd', row['path']]
        if 'error' in row:
            cells += [row['error'], '', '']
        else:
            ratio = f'{row["seconds"] / base["seconds"]:.2f}x' if base else ''
            cells += [f'{row["seconds"] * 1e3:.2f}', _mib(row['peak_bytes']), ratio]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return rows, lines


def benchmark_blocks(args: argparse.Namespace) -> Tuple[List[dict], List[str]]:
    rows = []
    for arch in args.archs:
        for size in args.sizes:
            for mode in args.modes:
                for path in args.paths:
                    reason = skip_reason(path, args.device, arch)
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
            reason = skip_reason(path, args.device, arch)
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
                memory_limit_gib=args.memory_limit)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    task = parser.add_mutually_exclusive_group()
    task.add_argument('--op', action='store_true', help='benchmark the attention op alone at stage-3 shapes')
    task.add_argument('--blocks', action='store_true',
                      help='benchmark the attention module of the first two blocks of each stage alone')
    task.add_argument('--max-size', action='store_true',
                      help='search the largest input whose training step fits (CUDA only)')
    parser.add_argument('--archs', nargs='+', default=['tiny', 'small', 'base'], choices=sorted(DAT.arch_zoo))
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
                        help='CPU threads of torch (default: torch\'s choice); 1 avoids the large '
                             'slowdown of busy-waiting OpenMP threads on a machine shared with other jobs')
    parser.add_argument('--memory-limit', type=float, default=None, metavar='GIB',
                        help='CPU: let every cell\'s process grow its address space (RLIMIT_AS; more '
                             'than its resident memory) by at most this many GiB, so that a cell that '
                             'needs more is reported as out of memory')
    parser.add_argument('--no-isolate', dest='isolated', action='store_false',
                        help='run every cell in this process (no per-cell CPU memory)')
    parser.add_argument('--min-height', type=int, default=224, help='--max-size: smallest height tried')
    parser.add_argument('--max-height', type=int, default=4096, help='--max-size: largest height tried')
    parser.add_argument('--out', help='also write the table (Markdown) to this file')
    args = parser.parse_args(argv)
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
    if args.interleave and (args.op or args.blocks or args.max_size):
        parser.error('--interleave applies to the backbone table only')
    if args.memory_limit is not None and (args.device != 'cpu' or not args.isolated
                                          or args.memory_limit <= 0):
        parser.error('--memory-limit is a positive number of GiB, for CPU cells in their own '
                     'processes (not with --device cuda or --no-isolate)')
    if args.threads is not None and args.threads < 1:
        parser.error('--threads must be >= 1')
    if args.batch < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error('--batch and --repeats must be >= 1, --warmup >= 0')
    if not 32 <= args.min_height <= args.max_height or args.min_height % 32 or args.max_height % 32:
        parser.error('--min-height and --max-height must be multiples of 32 with 32 <= min <= max')
    if args.amp == 'fp16' and args.device == 'cpu':
        parser.error('--amp fp16 needs CUDA (CPU autocast runs bfloat16)')
    return args


def main(argv: Optional[Sequence[str]] = None) -> Tuple[List[dict], str]:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ['--cell']:  # a child process of run_cell: one cell, the result as JSON
        cell = json.loads(argv[1])
        cell['size'] = tuple(cell['size'])
        print(json.dumps(_run_here(cell)))
        return [], ''
    args = parse_args(argv)
    title = header(args)
    print(title, flush=True)
    if args.op:
        rows, lines = benchmark_op(args)
    elif args.blocks:
        rows, lines = benchmark_blocks(args)
    elif args.max_size:
        rows, lines = benchmark_max_size(args)
    else:
        rows, lines = benchmark_backbone(args)
    table = '\n'.join([title, ''] + lines)
    print('\n' + table)
    if args.out:
        with open(args.out, 'w') as f:
            f.write(table + '\n')
    return rows, table


if __name__ == '__main__':
    main()
