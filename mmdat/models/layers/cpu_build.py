"""Building and loading the C++ CPU kernels (``csrc/*.cpp``): one set of flags and one cache.

Each kernel is compiled with :func:`torch.utils.cpp_extension.load` the first time it is
needed and cached in torch's extension directory (``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``) under a name that changes with its source, the flags, torch and
the CPU's instruction sets. Where that fails (no C++ compiler), :func:`build_or_warn` gives one
warning and the kernel's layer uses a PyTorch path instead.
"""
import glob
import hashlib
import os
import os.path as osp
import platform
import shutil
import warnings
from typing import Sequence

import torch

#: Folder of the kernels' sources.
SOURCES = osp.join(osp.dirname(osp.abspath(__file__)), 'csrc')

#: Compiler flags of the kernels. ``-march=native``: AVX-512 paths are compiled only where the
#: machine has AVX-512 (``__AVX512F__``), and portable loops vectorise with the machine's own
#: vector instructions. ``-fno-trapping-math``: lets the compiler vectorise float-to-index
#: conversions (the kernels use no floating-point traps; values do not change).
CFLAGS = ['-O3', '-march=native', '-fno-trapping-math', '-fopenmp']


def cpu_flags() -> str:
    """The CPU's instruction sets: the first ``flags`` (x86) or ``Features`` (Arm) line of
    ``/proc/cpuinfo``, empty where there is none."""
    try:
        with open('/proc/cpuinfo') as f:
            return next((line for line in f if line.startswith(('flags', 'Features'))), '')
    except OSError:
        return ''


def has_avx512() -> bool:
    """Whether this machine's CPU has AVX-512 (``avx512f`` among its flags), so that
    :data:`CFLAGS` compile the kernels' AVX-512 code."""
    return 'avx512f' in cpu_flags().split()


def load_without_avx512(source: str, prefix: str, library: str) -> None:
    """Build and load ``source`` as on a CPU with AVX2 but no AVX-512 (:data:`CFLAGS` with
    ``-mno-avx512f``), its operators under the namespace ``library`` instead of its own, beside
    the main build: how the tests check that code on machines with AVX-512. Only for x86
    machines with AVX-512 (elsewhere the main build is that code already)."""
    if not has_avx512():
        raise RuntimeError('load_without_avx512 needs an x86 machine with AVX-512')
    load(source, prefix, CFLAGS + ['-mno-avx512f', f'-DMMDAT_LIBRARY={library}'])


def source_path(source: str) -> str:
    """Path of the kernel source ``source`` (a file name of ``csrc``)."""
    return osp.join(SOURCES, source)


def build_name(source: str, prefix: str, cflags: Sequence[str]) -> str:
    """Name of a build of ``source``: ``prefix`` and a digest that changes with the source (and
    the shared headers of ``csrc``), the flags, torch and the CPU's instruction sets, so a build
    cached in a home directory shared by different machines is not reused."""
    digest = hashlib.sha1()
    for path in [source_path(source)] + sorted(glob.glob(osp.join(SOURCES, '*.h'))):  # the headers it may include
        with open(path, 'rb') as f:
            digest.update(f.read())
    digest.update(' '.join(list(cflags) + [torch.__version__, platform.machine()]).encode())
    digest.update(cpu_flags().encode())
    return f'{prefix}_{digest.hexdigest()[:12]}'


def _library(name: str) -> str:
    root = os.environ.get('TORCH_EXTENSIONS_DIR') or osp.join(osp.expanduser('~'), '.cache', 'torch_extensions')
    return osp.join(root, name, f'{name}.so')


def load(source: str, prefix: str, cflags: Sequence[str] = tuple(CFLAGS)) -> None:
    """Build (once per machine, source version and flags) and load ``source`` compiled with
    ``cflags``, registering its operators; raises when it cannot be built."""
    name = build_name(source, prefix, cflags)
    library = _library(name)
    if osp.exists(library):  # built before: load it without torch's (slow) freshness checks
        try:
            torch.ops.load_library(library)
            return
        except Exception:  # e.g. a half-written file: rebuild below
            pass
    from torch.utils.cpp_extension import load as build
    os.makedirs(osp.dirname(library), exist_ok=True)
    build(name=name, sources=[source_path(source)], build_directory=osp.dirname(library), is_python_module=False,
          extra_cflags=list(cflags), extra_ldflags=['-fopenmp'], verbose=False)


def _compiler() -> str:
    return os.environ.get('CXX', 'c++')


def installed(source: str, prefix: str) -> bool:
    """Whether ``source`` can be built or loaded here (a C++ compiler, or a build made before),
    without building it."""
    name = build_name(source, prefix, CFLAGS)
    return shutil.which(_compiler()) is not None or osp.exists(_library(name))


def build_or_warn(source: str, prefix: str, what: str, fallback: str) -> bool:
    """Build (once per machine and source version) and load ``source`` with :data:`CFLAGS`;
    False, after one warning naming ``what`` (the kernel) and ``fallback`` (what its layer runs
    instead), when it cannot be built."""
    if not installed(source, prefix):
        warnings.warn(f'mmdat: no C++ compiler ({_compiler()!r}) found; {what} on CPU uses {fallback} (slower)')
        return False
    try:
        load(source, prefix, CFLAGS)
    except Exception as error:  # a failed build must not stop the model: fall back
        first_line = (str(error).strip().splitlines() or [''])[0]
        warnings.warn(f'mmdat: the CPU {what} kernel did not build ({type(error).__name__}: {first_line}); '
                      f'using {fallback} (slower)')
        return False
    return True
