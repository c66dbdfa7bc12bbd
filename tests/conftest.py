"""Test-session setup that must happen before mmdat is imported, and the suite's shared helpers.

Test modules import the helpers by name (``from tests.conftest import REPO_ROOT, load_tool``):
``tests`` is a package, so pytest imports this file as ``tests.conftest`` and every test module
gets this one copy.
"""
import importlib.util
import json
import os
import select
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Dict, Optional

import pytest
import torch


#: The checkout's root folder (configs/, tools/, tests/data/ ...).
REPO_ROOT = Path(__file__).resolve().parents[1]
TEST_CONFIGS = REPO_ROOT / 'tests' / 'data' / 'configs'

#: Small DAT archs per version, 2 blocks in every stage. Version 1: window attention, then
#: shifted windows (stages 0-1) or deformable attention (2-3); version 2: neighborhood and DAT++
#: deformable blocks in every stage but the last (two deformable blocks).
SMALL_ARCHS = {
    1: dict(embed_dims=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), offset_groups=(0, 0, 2, 2)),
    2: dict(version=2, embed_dims=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4),
            offset_groups=(1, 1, 2, 2), block_types=('ND', 'ND', 'ND', 'DD')),
}
#: Every attention of each version in as few blocks as the arch allows (for slow paths: compiling,
#: exporting): shifted windows in stage 0 and deformable attention in stage 2 (version 1);
#: neighborhood and DAT++ deformable attention (version 2).
MINIMAL_ARCHS = {
    1: dict(embed_dims=16, depths=(2, 1, 2, 1), num_heads=(1, 2, 2, 4), offset_groups=(0, 0, 1, 2)),
    2: dict(version=2, embed_dims=16, depths=(2, 1, 1, 1), num_heads=(1, 2, 2, 4),
            offset_groups=(1, 1, 1, 2), block_types=('ND', 'N', 'D', 'D')),
}


def load_module(path, name: Optional[str] = None) -> ModuleType:
    """The Python file ``path`` run as a module named ``name`` (default: its stem), not put in
    ``sys.modules``: for scripts that are not in a package (tools, test data recipes)."""
    path = Path(path)
    spec = importlib.util.spec_from_file_location(name or path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_tool(relative_path: str) -> ModuleType:
    """A tool of ``tools/`` by its path there, e.g. ``load_tool('analysis_tools/get_flops.py')``,
    as a module whose functions the tests call in-process."""
    return load_module(REPO_ROOT / 'tools' / relative_path)


def small_backbone(version: int = 1, arch: Optional[dict] = None, **kwargs):
    """An initialised DAT of :data:`SMALL_ARCHS` (or ``arch``), the same weights for the same
    arguments, stochastic depth off unless ``drop_path_rate`` is given; in training mode."""
    from mmdat.models import DAT  # after the environment above is set
    torch.manual_seed(0)
    kwargs.setdefault('drop_path_rate', 0.0)
    model = DAT(arch=SMALL_ARCHS[version] if arch is None else arch, **kwargs)
    model.init_weights()
    return model


#: The project's Mask R-CNN and Cascade Mask R-CNN configs (for :func:`small_two_stage`).
MASK_RCNN_CONFIG = REPO_ROOT / 'configs' / 'mask_rcnn_dat_t_coco.py'
CASCADE_CONFIG = REPO_ROOT / 'configs' / 'cascade_mask_rcnn_dat_t_3x_coco.py'


def small_two_stage(config, **overrides):
    """The config's two-stage model with a small DAT, narrow heads and 3 classes (random
    weights, seeded): the real structure (RPN, RoI extractors, box and mask heads, cascade)
    at a size that runs in seconds."""
    import importlib

    from mmengine.config import Config

    from mmdat.utils import register_scope
    arch = dict(_delete_=True, embed_dims=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4), offset_groups=(0, 0, 2, 2))
    channels = 32
    cfg = Config.fromfile(str(config))
    cfg.merge_from_dict(dict(model=dict(backbone=dict(arch=arch),
                                        neck=dict(in_channels=[16, 32, 64, 128], out_channels=channels),
                                        rpn_head=dict(in_channels=channels, feat_channels=channels))))
    if overrides:
        cfg.merge_from_dict(overrides)
    roi = cfg.model.roi_head
    for head in roi.bbox_head if isinstance(roi.bbox_head, list) else [roi.bbox_head]:
        head.update(num_classes=3, in_channels=channels, fc_out_channels=64)
        if 'conv_out_channels' in head:
            head.conv_out_channels = channels
    for head in roi.mask_head if isinstance(roi.mask_head, list) else [roi.mask_head]:
        head.update(num_classes=3, in_channels=channels, conv_out_channels=channels)
    roi.bbox_roi_extractor.out_channels = roi.mask_roi_extractor.out_channels = channels
    scope = register_scope(cfg)
    cfg.model.backbone.pop('init_cfg', None)
    torch.manual_seed(0)
    return importlib.import_module(f'{scope}.registry').MODELS.build(cfg.model).eval()


# The official models' parity data (tests/data/official_dat*/README.md): per version, the folder,
# the file prefix of its layouts and pinned features.
_OFFICIAL = {1: ('official_dat', 'dat'), 2: ('official_datpp', 'datpp')}


def official_data(version: int) -> Path:
    return REPO_ROOT / 'tests' / 'data' / _OFFICIAL[version][0]


def official_layout(version: int, size: str) -> dict:
    """``{'parameters': [[key, shape], ...], 'buffers': [...]}`` of an official classification
    model (``size``: 'tiny', 'small' or 'base'), in its state-dict order."""
    return json.loads((official_data(version) / f'{_OFFICIAL[version][1]}_{size}_layout.json').read_text())


def _seeded(version: int) -> ModuleType:
    return load_module(official_data(version) / 'seeded.py', f'official_{version}_seeded')


def official_state_dict(version: int, size: str) -> Dict[str, torch.Tensor]:
    """An official classification checkpoint's state dict with the seeded weights the pinned
    features were computed with, and a zero ``cls_head`` (it comes last: the seeded draws of the
    other keys do not depend on it)."""
    weights = _seeded(version).seeded_official_weights(
        [(k, s) for k, s in official_layout(version, size)['parameters'] if not k.startswith('cls_head.')])
    weights['cls_head.weight'] = torch.zeros(1000, weights['cls_norm.norm.weight'].shape[0])
    weights['cls_head.bias'] = torch.zeros(1000)
    return weights


def official_input(version: int) -> torch.Tensor:
    """The seeded 224x224 image the pinned features were computed from."""
    return _seeded(version).seeded_input()


def official_features(version: int, size: str) -> torch.Tensor:
    """The official model's ``cls_norm`` features for :func:`official_input` and the weights of
    :func:`official_state_dict`."""
    return torch.load(official_data(version) / f'{_OFFICIAL[version][1]}_{size}_cls_norm.pth')


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` are skipped where no CUDA device is visible."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason='needs a CUDA GPU')
    for item in items:
        if item.get_closest_marker('gpu'):
            item.add_marker(skip)


def _write_hostile_checkpoints(folder):
    """Checkpoint files that run ``touch MARKER`` when unpickled without restrictions, in each
    format torch reads (zip, legacy non-zip, a raw pickle), and broken files."""
    import pickle

    marker = folder / 'PAYLOAD_RAN'

    class Payload:

        def __reduce__(self):
            return (os.system, (f'touch {marker}', ))

    state = {'state_dict': {'backbone.patch_embed.conv.weight': torch.zeros(1)}, 'x': Payload()}
    hostile = {'raw_pickle': folder / 'raw_pickle.pth', 'legacy': folder / 'legacy.pth',
               'zip': folder / 'zip.pth'}
    hostile['raw_pickle'].write_bytes(pickle.dumps(Payload()))
    torch.save(state, hostile['legacy'], _use_new_zipfile_serialization=False)
    torch.save(state, hostile['zip'])
    good = folder / 'good.pth'
    torch.save({'state_dict': {'w': torch.zeros(4)}}, good)
    broken = {'empty': folder / 'empty.pth', 'text': folder / 'text.pth',
              'truncated_zip': folder / 'truncated_zip.pth',
              'truncated_legacy': folder / 'truncated_legacy.pth'}
    broken['empty'].write_bytes(b'')
    broken['text'].write_text('not a checkpoint\n')
    broken['truncated_zip'].write_bytes(good.read_bytes()[:200])
    torch.save({'w': torch.zeros(4)}, folder / 'legacy_good.pth', _use_new_zipfile_serialization=False)
    broken['truncated_legacy'].write_bytes((folder / 'legacy_good.pth').read_bytes()[:60])
    return hostile, broken, marker


def run_without_compiler(code: str, folder: Path) -> None:
    """Run Python ``code`` in a fresh process where no C++ compiler is found and the extension
    folder (``folder``, empty) holds no cached kernel build; fails if the code fails."""
    env = dict(os.environ, CXX=str(Path(folder) / 'no-such-compiler'), TORCH_EXTENSIONS_DIR=str(folder))
    subprocess.run([sys.executable, '-c', code], check=True, env=env)


def kernel_without_avx512(kernel_module):
    """The operators of a C++ CPU kernel (``kernel_module``: its Python module, with ``SOURCE``
    and ``BUILD_PREFIX``) built as on a CPU with AVX2 but no AVX-512, under their own
    namespace, for a test to swap in; skips the test where the machine has no AVX-512 (its main
    build is that code already)."""
    from mmdat.models.layers import cpu_build
    if not cpu_build.has_avx512():
        pytest.skip('no AVX-512 here: the main build is the code without it')
    library = f'{kernel_module.BUILD_PREFIX}_without_avx512'
    cpu_build.load_without_avx512(kernel_module.SOURCE, kernel_module.BUILD_PREFIX, library)
    return getattr(torch.ops, library)


@pytest.fixture
def threads():
    """``torch.set_num_threads`` for one test: the count is restored after it."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.fixture(scope='session')
def hostile_checkpoints(tmp_path_factory):
    """``(hostile, broken, marker)``: dicts of kind -> path and the file a payload would create."""
    return _write_hostile_checkpoints(tmp_path_factory.mktemp('hostile'))


# --- tools as commands, without paying for the imports each time ---------------------------------

#: What a tool's process imports before it does anything; the command runner imports it once.
_PRELOADED = ('torch', 'numpy', 'cv2', 'matplotlib', 'mmengine.config', 'mmengine.runner', 'mmcv', 'mmdat',
              'mmdat.utils')

#: Environment variables read when the interpreter or a native library starts, not later: a
#: command whose value differs from the runner's runs in a fresh process. Except
#: ``OMP_NUM_THREADS``: the child sets torch's thread count to it (``torch.set_num_threads``), as
#: torch does at start-up.
_STARTUP_VARIABLES = ('PYTHON', 'OMP_', 'MKL_', 'OPENBLAS_', 'TRITON_', 'CUDA_', 'LD_')
_SET_IN_THE_CHILD = ('OMP_NUM_THREADS', )

# The runner: imports _PRELOADED, then for each request (a JSON line: argv, cwd, env, stdout and
# stderr files) forks; the child runs the script as ``__main__`` in the requested folder and
# environment, its output going to the files, so an uncaught exception or SystemExit ends it the
# way it ends ``python script.py``. Answers the child's pid, then its exit status.
_RUNNER = r'''
import importlib, json, os, runpy, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
sys.stderr.flush()
protocol_in, protocol_out = sys.stdin, os.fdopen(os.dup(1), 'w')
print('ready', file=protocol_out, flush=True)
for line in protocol_in:
    request = json.loads(line)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        protocol_out.close()
        os.chdir(request['cwd'])
        os.environ.clear()
        os.environ.update(request['env'])
        if 'OMP_NUM_THREADS' in os.environ:
            sys.modules['torch'].set_num_threads(int(os.environ['OMP_NUM_THREADS']))
        for fd, path, mode in ((0, os.devnull, os.O_RDONLY), (1, request['stdout'], os.O_WRONLY),
                               (2, request['stderr'], os.O_WRONLY | os.O_APPEND)):
            os.dup2(os.open(path, mode), fd)
        sys.stdin = open(os.devnull)
        script = request['argv'][0]
        sys.argv = list(request['argv'])
        sys.path[0] = os.path.dirname(os.path.abspath(script))
        runpy.run_path(script, run_name='__main__')
        sys.exit(0)
    print(json.dumps(dict(pid=pid)), file=protocol_out, flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps(dict(status=os.waitstatus_to_exitcode(status))), file=protocol_out, flush=True)
'''


class _CommandRunner:
    """A process that has imported what the tools import and forks a child per command."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.env = {**os.environ, 'PYTHONPATH': str(REPO_ROOT)}
        self.preload_output = folder / 'preload.err'
        with open(self.preload_output, 'w') as preload_err:
            self.process = subprocess.Popen([sys.executable, '-c', _RUNNER, *_PRELOADED], cwd=folder,
                                            env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            stderr=preload_err, text=True)
        assert self.process.stdout.readline() == 'ready\n', self.preload_output.read_text()[-3000:]
        self.count = 0

    def handles(self, env: dict) -> bool:
        def startup(variables):
            return {k: v for k, v in variables.items()
                    if k.startswith(_STARTUP_VARIABLES) and k not in _SET_IN_THE_CHILD}
        return self.process.poll() is None and startup(env) == startup(self.env)

    def run(self, argv, cwd, env, timeout):
        self.count += 1
        out, err = self.folder / f'{self.count}.out', self.folder / f'{self.count}.err'
        out.write_text('')
        # the preloaded modules' import-time output, which the command would have printed too
        err.write_text(self.preload_output.read_text())
        request = dict(argv=[str(a) for a in argv], cwd=str(cwd), env=env, stdout=str(out), stderr=str(err))
        self.process.stdin.write(json.dumps(request) + '\n')
        self.process.stdin.flush()
        pid = json.loads(self.process.stdout.readline())['pid']
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not ready:
            os.kill(pid, signal.SIGKILL)
            self.process.stdout.readline()
            raise subprocess.TimeoutExpired(argv, timeout, out.read_text(), err.read_text())
        returncode = json.loads(self.process.stdout.readline())['status']
        return subprocess.CompletedProcess(argv, returncode, out.read_text(), err.read_text())

    def close(self):
        self.process.stdin.close()
        self.process.wait(timeout=60)


_runner: Optional[_CommandRunner] = None


def run_script(script, *args, cwd, env: Optional[dict] = None,
               timeout: Optional[float] = None) -> subprocess.CompletedProcess:
    """``python script *args`` in ``cwd`` with ``PYTHONPATH`` set to this checkout, as
    ``subprocess.run(..., capture_output=True, text=True)`` returns it.

    The command runs in a child forked from a process that imported torch, mmengine, mmcv and
    mmdat once for the whole session (3-8 s saved per command), as ``__main__`` with the same
    ``sys.argv``, ``sys.path[0]``, folder, environment, output and exit status; where ``env``
    differs in a variable read at start-up (``PYTHON*``, ``OMP_*``, ...) it runs in a fresh
    process, but for ``OMP_NUM_THREADS``, which the child applies to torch. For tests of a tool's command line; a test of what a fresh interpreter does (imports,
    start-up) starts its own process.
    """
    global _runner
    env = {**os.environ, **(env or {}), 'PYTHONPATH': str(REPO_ROOT)}
    argv = [str(script), *map(str, args)]
    if _runner is None:
        import tempfile
        _runner = _CommandRunner(Path(tempfile.mkdtemp(prefix='mmdat_commands_')))
    if _runner.handles(env):
        return _runner.run(argv, cwd, env, timeout)
    return subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def pytest_sessionfinish(session, exitstatus):
    if _runner is not None:
        _runner.close()
        shutil.rmtree(_runner.folder, ignore_errors=True)
