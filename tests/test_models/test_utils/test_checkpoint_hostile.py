"""Files made to attack the checkpoint reader: each is refused with one line, and a refused file
leaves the process as it was (no global, class or table changed, later loads unchanged); no file
makes the reader allocate more than the data it holds plus a bounded allowance."""
import collections
import os
import re
import resource
import subprocess
import sys
import types
from pathlib import Path

import hostile_files as hf
import numpy as np
import pytest
import torch
from mmengine.logging.history_buffer import HistoryBuffer

import mmdat  # noqa: F401  (mmdat's allow-list for torch.load(weights_only=True))
from mmdat.models.utils import CheckpointError, load_checkpoint_file

#: The checkout whose mmdat is under test, for subprocesses.
MMDAT_ROOT = Path(mmdat.__file__).resolve().parents[1]

#: What the readers (mmdat's and torch's weights_only with mmdat's allow-list) may name.
ALLOWED = [
    ('torch._utils', '_rebuild_tensor'), ('torch._utils', '_rebuild_tensor_v2'),
    ('torch._utils', '_rebuild_parameter'), ('collections', 'OrderedDict'),
    ('collections', 'Counter'), ('builtins', 'set'), ('builtins', 'frozenset'),
    ('_codecs', 'encode'), ('torch', 'Size'), ('torch', 'device'), ('torch', 'FloatStorage'),
    ('torch', 'UntypedStorage'), ('numpy', 'dtype'), ('numpy', 'ndarray'),
    (hf.NUMPY_MULTIARRAY, '_reconstruct'), (hf.NUMPY_MULTIARRAY, 'scalar'),
    ('mmengine.logging.history_buffer', 'HistoryBuffer'),
]


def _lookup(module, name):
    __import__(module)
    return getattr(sys.modules[module], name)


def _state_of(obj):
    """What BUILD or ``__setstate__`` could change on ``obj``."""
    state = {}
    for attribute in ('__defaults__', '__kwdefaults__', '__code__'):
        if hasattr(obj, attribute):
            state[attribute] = getattr(obj, attribute)
    if isinstance(obj, type):
        state.update(vars(obj))  # a class: its attributes (values compared by identity)
    elif hasattr(obj, '__dict__'):
        state['__dict__'] = dict(obj.__dict__)
    return state


def process_state():
    """Every allow-listed global and class, mmdat's builders, mmengine's statistics table and
    numpy's own dtypes."""
    objects = {f'{m}.{n}': _lookup(m, n) for m, n in ALLOWED}
    try:
        from mmdat.models.utils import restricted_pickle
        objects.update({f'mmdat:{m}.{n}': v
                        for (m, n), v in restricted_pickle.ALLOWED_GLOBALS.items()})
    except ImportError:  # older mmdat: the list above
        pass
    state = {name: _state_of(obj) for name, obj in objects.items()}
    state['HistoryBuffer._statistics_methods'] = dict(HistoryBuffer._statistics_methods)
    state['numpy dtypes'] = [np.dtype(c).__reduce__() + (np.dtype(c).hasobject, )
                             for c in ('f8', 'f4', 'i8', 'u1', 'b1', 'O', 'V8')]
    return state


def assert_same_state(before, after):
    assert before.keys() == after.keys()
    for name in before:
        old, new = before[name], after[name]
        if isinstance(old, dict):
            assert old.keys() == new.keys(), name
            for key in old:
                assert new[key] is old[key] or new[key] == old[key], (name, key)
        else:
            assert old == new, name


@pytest.fixture(scope='module')
def good(tmp_path_factory):
    return hf.good_weights(tmp_path_factory.mktemp('good'))


def assert_later_loads_unchanged(good):
    expected = torch.arange(1.0, 5.0)
    assert torch.equal(load_checkpoint_file(str(good))['state_dict']['w'], expected)
    assert torch.equal(torch.load(good, weights_only=True)['state_dict']['w'], expected)


def refused(path, match):
    with pytest.raises(CheckpointError, match=match) as error:
        load_checkpoint_file(str(path))
    message = str(error.value)
    assert '\n' not in message and str(path) in message
    return message


def test_build_cannot_change_a_function_for_later_loads(tmp_path, good):
    """The attack seen: BUILD on ``_rebuild_tensor_v2`` gave it defaults that negate every
    tensor loaded afterwards, although the file itself was refused."""
    before = process_state()
    refused(hf.negating_defaults(tmp_path), 'refused to set the state of the global '
            'torch._utils._rebuild_tensor_v2')
    assert_same_state(before, process_state())
    assert_later_loads_unchanged(good)


@pytest.mark.parametrize('module, name', ALLOWED)
def test_build_on_any_allowed_global_is_refused(tmp_path, good, module, name):
    before = process_state()
    refused(hf.build_on_global(tmp_path, module, name), 'refused to set the state of')
    assert not hasattr(_lookup(module, name), 'mmdat_marker')
    assert_same_state(before, process_state())
    assert_later_loads_unchanged(good)


def test_forged_object_array_is_refused_before_numpy_sees_it(tmp_path, good):
    """Its dtype state clears numpy's "holds objects" flag: the file's bytes would become object
    pointers (SIGSEGV when used)."""
    before = process_state()
    refused(hf.object_array(tmp_path), "refused numpy dtype 'O8'")
    assert_same_state(before, process_state())
    assert_later_loads_unchanged(good)


@pytest.mark.parametrize('name, dtype_code, shape, data, reason', [
    ('object', hf.dtype('O8', np.dtype('O').__reduce__()[2]), (1, ), [1], "dtype 'O8'"),
    ('structured', hf.dtype('V4', np.dtype([('a', 'f4')]).__reduce__()[2]), (1, ), bytes(4),
     "dtype 'V4'"),
    ('unicode', hf.dtype('U1', np.dtype('U1').__reduce__()[2]), (1, ), bytes(4), "dtype 'U1'"),
    ('flags', hf.dtype('f8', (3, '<', None, None, None, -1, -1, 1)), (1, ), bytes(8),
     'dtype state'),
    ('short_data', hf.dtype('f8', np.dtype('f8').__reduce__()[2]), (4, ), bytes(8),
     'does not match'),
], ids=['object', 'structured', 'unicode', 'flags', 'short_data'])
def test_only_numeric_numpy_arrays_are_read(tmp_path, name, dtype_code, shape, data, reason):
    refused(hf.numpy_array(tmp_path, name, dtype_code, shape, data), f'refused .*{reason}')


def test_numeric_numpy_arrays_and_big_endian_dtypes_load(tmp_path):
    values = np.array([1.5, -2.0], dtype='>f8')
    torch.save({'a': values, 'b': np.float32(3), 'c': np.arange(3, dtype=np.int64),
                'd': np.zeros((2, 2), dtype=bool)}, tmp_path / 'arrays.pth')
    loaded = load_checkpoint_file(str(tmp_path / 'arrays.pth'))
    assert np.array_equal(loaded['a'], values)  # numpy gives it the native byte order
    assert loaded['b'] == np.float32(3) and type(loaded['b']) is np.float32
    assert np.array_equal(loaded['c'], np.arange(3)) and loaded['d'].shape == (2, 2)


@pytest.mark.parametrize('protocol', [2, 4, 5])
def test_every_pickle_protocol_loads(tmp_path, protocol):
    buffer = HistoryBuffer()
    buffer.update(2.0)
    torch.save({'w': torch.ones(2, dtype=torch.bfloat16), 'p': torch.nn.Parameter(torch.ones(1)),
                'a': np.arange(6, dtype=np.int32).reshape(2, 3), 'f': np.asfortranarray(np.eye(2)),
                'buffer': buffer, 's': {1, 2}, 'fs': frozenset({3})}, tmp_path / 'p.pth',
               pickle_protocol=protocol)
    loaded = load_checkpoint_file(str(tmp_path / 'p.pth'))
    assert loaded['w'].dtype == torch.bfloat16 and type(loaded['p']) is torch.nn.Parameter
    assert np.array_equal(loaded['a'], np.arange(6).reshape(2, 3))
    assert np.array_equal(loaded['f'], np.eye(2)) and loaded['buffer'].mean() == 2.0
    assert loaded['s'] == {1, 2} and loaded['fs'] == frozenset({3})


def test_history_buffer_cannot_rewrite_the_statistics_table(tmp_path, good):
    """``HistoryBuffer.__setstate__`` copied ``statistics_methods`` from the file into a table
    the whole process shares; through mmdat's reader and through torch's weights_only reader
    (with mmdat's allow-list) the entry is dropped."""
    before = process_state()
    path = hf.history_buffer(tmp_path)
    for load in (lambda: load_checkpoint_file(str(path)),
                 lambda: torch.load(path, weights_only=True)):
        buffer = load()['message_hub']
        assert type(buffer) is HistoryBuffer and buffer.mean() == 1.0
        assert 'statistics_methods' not in vars(buffer)
        assert_same_state(before, process_state())
    assert_later_loads_unchanged(good)


def test_history_buffer_with_unknown_state_is_refused(tmp_path):
    from mmdat.models.utils.restricted_pickle import Refused, history_buffer_setstate
    buffer = HistoryBuffer.__new__(HistoryBuffer)
    with pytest.raises(Refused, match='_statistics_methods'):
        history_buffer_setstate(buffer, {'_statistics_methods': {}, 'max_length': 1,
                                         '_log_history': np.zeros(1),
                                         '_count_history': np.zeros(1)})
    with pytest.raises(Refused, match='other types'):
        history_buffer_setstate(buffer, {'max_length': 1, '_log_history': [print],
                                         '_count_history': np.zeros(1)})
    assert vars(buffer) == {}


def test_hostile_files_leave_the_process_as_it_was(tmp_path, good, hostile_checkpoints):
    """Every hostile file of these tests, one after the other, then the state compared."""
    before = process_state()
    files = [hf.negating_defaults(tmp_path), hf.object_array(tmp_path), hf.history_buffer(tmp_path),
             hf.deflated_storage(tmp_path, 2**20), hf.legacy_declaring(tmp_path, 2**28),
             *hostile_checkpoints[0].values(),
             *(hf.build_on_global(tmp_path, m, n) for m, n in ALLOWED)]
    for path in files:
        try:
            load_checkpoint_file(str(path))
        except CheckpointError:
            pass
    assert_same_state(before, process_state())
    assert_later_loads_unchanged(good)
    assert not hostile_checkpoints[2].exists()


# --- memory -------------------------------------------------------------------------------------


def test_a_compressed_storage_is_refused(tmp_path):
    """The attack seen: a storage of 2 GiB compressed to a few MB loaded with 2.5 GB of peak
    memory (here 64 MiB in a 64 kB file)."""
    path = hf.deflated_storage(tmp_path, 2**24)
    assert path.stat().st_size < 2**17
    refused(path, r'refused a compressed zip member \(archive/data/0: 67108864 bytes from')


def test_a_storage_must_be_the_size_of_its_record(tmp_path):
    refused(hf.storage_larger_than_record(tmp_path, 2**29),
            "refused storage '0': it declares 2147483648 bytes, the file holds 4")


def test_legacy_storages_must_fit_in_the_file(tmp_path):
    path = hf.legacy_declaring(tmp_path, 2**29)
    message = refused(path, "refused storage '0': its storages declare 2147483648 bytes, more "
                      'than the file')
    assert 'trust' not in message  # trusting would not be the right advice


def test_a_view_cannot_show_more_than_its_storage(tmp_path):
    refused(hf.zero_stride(tmp_path, 10**9), 'more elements than its storage holds')


@pytest.mark.parametrize('make', [lambda folder: hf.many_sets(folder, 400_000),
                                  lambda folder: hf.set_copies(folder, 2000, 2000)],
                         ids=['many_sets', 'set_copies'])
@pytest.mark.slow
def test_objects_are_bounded(tmp_path, make):
    """A small pickle that builds hundreds of MB of objects: refused once they pass the
    allowance (here 8 MiB + 16 bytes per byte of pickle). The allowance bounds the growth of
    the process, so this runs in a fresh one: a process that has freed memory builds into it
    without growing."""
    path = make(tmp_path)
    script = ('import sys, mmdat\n'
              'from mmdat.models.utils import load_checkpoint_file\n'
              'load_checkpoint_file(sys.argv[1])\n')
    result = subprocess.run([sys.executable, '-c', script, str(path)], capture_output=True,
                            text=True, env={**os.environ, 'MMDAT_CHECKPOINT_MEMORY_MB': '8'})
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()[-1]
    assert re.search(r'CheckpointError: .* refused to build more than \d+ MiB of objects besides '
                     r'its tensors \(raise MMDAT_CHECKPOINT_MEMORY_MB', message), message
    assert 'trust' not in message


def test_the_memory_allowance_is_validated(tmp_path, monkeypatch, good):
    monkeypatch.setenv('MMDAT_CHECKPOINT_MEMORY_MB', 'lots')
    with pytest.raises(CheckpointError,
                       match="MMDAT_CHECKPOINT_MEMORY_MB='lots': expected a number"):
        load_checkpoint_file(str(good))
    monkeypatch.setenv('MMDAT_CHECKPOINT_MEMORY_MB', '1')  # enough for a small file
    assert_later_loads_unchanged(good)


PEAK_SCRIPT = """
import resource, sys
import mmdat
from mmdat.models.utils import CheckpointError, load_checkpoint_file
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    load_checkpoint_file(sys.argv[1])
except CheckpointError as error:
    print(error, file=sys.stderr)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


@pytest.mark.slow
def test_peak_memory_of_a_small_file_declaring_a_large_storage(tmp_path):
    """Measured in a fresh process: the peak grows by less than 32 MB (it grew by the storage's
    size before the check)."""
    path = hf.deflated_storage(tmp_path, 2**28)  # 1 GiB in about 1 MB
    result = subprocess.run([sys.executable, '-c', PEAK_SCRIPT, str(path)], capture_output=True,
                            text=True, env={**os.environ, 'PYTHONPATH': str(MMDAT_ROOT)},
                            cwd=tmp_path, timeout=300)
    assert 'refused a compressed zip member' in result.stderr, result.stderr[-2000:]
    assert int(result.stdout.split()[-1]) < 32, result.stdout


def test_reading_a_real_checkpoint_stays_within_the_allowance(tmp_path):
    """An mmengine-style checkpoint with optimizer state and log buffers loads with the default
    allowance."""
    model = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(50)])
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 16)).sum().backward()
    optimizer.step()
    buffer = HistoryBuffer()
    for value in range(10_000):
        buffer.update(float(value))
    checkpoint = {'state_dict': model.state_dict(), 'optimizer': optimizer.state_dict(),
                  'message_hub': {'log_scalars': {'loss': buffer}},
                  'meta': {'seed': 1, 'dataset_meta': {'classes': ('a', 'b')}},
                  'counts': collections.Counter(a=1), 'shape': torch.Size([1, 2]),
                  'device': torch.device('cpu'), 'names': {'x'}, 'frozen': frozenset({1})}
    torch.save(checkpoint, tmp_path / 'real.pth')
    loaded = load_checkpoint_file(str(tmp_path / 'real.pth'))
    assert loaded['message_hub']['log_scalars']['loss'].mean() == buffer.mean()
    assert loaded['optimizer']['state'][0]['step'] == 1
    assert loaded['counts'] == collections.Counter(a=1) and loaded['shape'] == torch.Size([1, 2])
    assert loaded['device'] == torch.device('cpu') and loaded['names'] == {'x'}
    assert isinstance(loaded['state_dict'], collections.OrderedDict)
    assert hasattr(loaded['state_dict'], '_metadata')


def test_torchscript_and_tar_archives_are_refused(tmp_path):
    torch.jit.save(torch.jit.script(torch.nn.Linear(1, 1)), tmp_path / 'scripted.pth')
    refused(tmp_path / 'scripted.pth', 'refused a TorchScript archive')
    import tarfile
    with tarfile.open(tmp_path / 'old.pth', 'w', format=tarfile.PAX_FORMAT) as archive:
        archive.add(tmp_path / 'scripted.pth', arcname='storages')
    refused(tmp_path / 'old.pth', 'refused the tar format of torch < 0.4')


def test_no_module_global_changes_even_on_torch_own_reader(tmp_path):
    """torch's weights_only reader (with mmdat's allow-list) refuses BUILD on a global too."""
    path = hf.negating_defaults(tmp_path)
    before = process_state()
    with pytest.raises(Exception):
        torch.load(path, weights_only=True)
    assert_same_state(before, process_state())
    assert isinstance(_lookup('torch._utils', '_rebuild_tensor_v2'), types.FunctionType)



def test_runner_never_sees_a_config_it_would_run(tmp_path):
    """mmengine's Runner.resume runs meta['config'] with Config.fromstring: through mmengine's
    loader (the runner's route) an untrusted file arrives without it; a trusted one keeps it."""
    from mmengine.runner.checkpoint import CheckpointLoader

    from mmdat.models.utils import trust_checkpoint
    marker = tmp_path / 'CONFIG_RAN'
    path = tmp_path / 'epoch_1.pth'
    torch.save({'meta': {'epoch': 1, 'config': f"import os\nos.system('touch {marker}')\n"},
                'state_dict': {'w': torch.ones(2)}}, path)
    checkpoint = CheckpointLoader.load_checkpoint(str(path), map_location='cpu')
    assert 'config' not in checkpoint['meta'] and checkpoint['meta']['epoch'] == 1
    assert torch.equal(checkpoint['state_dict']['w'], torch.ones(2))
    trust_checkpoint(str(path))
    assert 'config' in CheckpointLoader.load_checkpoint(str(path), map_location='cpu')['meta']
    assert not marker.exists()
