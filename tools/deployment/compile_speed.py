"""Speed of ``torch.compile`` of a DAT backbone against eager mode, in inference.

Example::

    python tools/deployment/compile_speed.py tiny --sizes 224 512x512 --repeats 7

For each size: compiles once (``dynamic=False``, so one compile per size), checks the compiled
outputs against eager (max relative error), then times eager and compiled calls in two
alternating rounds of ``--repeats`` calls each (median per round, best round reported), batch
1, random weights, under ``torch.no_grad()``.
"""
import argparse
import os
import time
from typing import Callable, List, Tuple

import torch

from mmdat.models import DAT


def parse_size(text: str) -> Tuple[int, int]:
    height, _, width = text.partition('x')
    return int(height), int(width or height)


def median_time(fn: Callable, x: torch.Tensor, repeats: int) -> float:
    times: List[float] = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main(argv=None) -> List[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('arch', choices=sorted(DAT.arch_zoo))
    parser.add_argument('--sizes', nargs='+', default=['224', '512x512'], help='HxW or H (square)')
    parser.add_argument('--repeats', type=int, default=7, help='timed calls per round (default 7)')
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f'--repeats must be >= 1, got {args.repeats}')
    torch.manual_seed(0)
    model = DAT(args.arch, drop_path_rate=0.0)
    model.init_weights()
    model.eval()
    compiled = torch.compile(model, dynamic=False)
    rows = []
    for size in map(parse_size, args.sizes):
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            start = time.time()
            outputs = compiled(x)
            compile_s = time.time() - start
            error = max(float((out - ref).abs().max() / ref.abs().max())
                        for out, ref in zip(outputs, model(x)))
            eager = min(median_time(model, x, args.repeats) for _ in range(2))
            fast = min(median_time(compiled, x, args.repeats) for _ in range(2))
        rows.append(dict(size=size, compile_s=compile_s, error=error, eager=eager, compiled=fast))
        print(f'{args.arch} {size[0]}x{size[1]}: compile {compile_s:.0f} s, max relative error '
              f'{error:.1e}, eager {1e3 * eager:.1f} ms, compiled {1e3 * fast:.1f} ms, '
              f'speed-up {eager / fast:.2f}x (load average {os.getloadavg()[0]:.1f})', flush=True)
    return rows


if __name__ == '__main__':
    main()
