"""Checkpoint files made to attack a reader (not a test module: the tests import it).

Each writer puts one file into a folder and returns its path. The pickles are assembled from
pickle instructions, because the attacks are sequences that no ``pickle.dumps`` writes.
"""
import collections
import http.server
import pickle
import struct
import threading
import zipfile

import numpy as np
import torch

PROTO = b'\x80\x02'
MARK, STOP, TUPLE, TUPLE1, TUPLE2, TUPLE3 = b'(', b'.', b't', b'\x85', b'\x86', b'\x87'
REDUCE, BUILD, BINPERSID, NEWOBJ = b'R', b'b', b'Q', b'\x81'
EMPTY_DICT, EMPTY_TUPLE, EMPTY_SET, SETITEM, LIST = b'}', b')', b'\x8f', b's', b'l'

#: The module numpy names in its own pickles (numpy 2 moved numpy.core to numpy._core).
NUMPY_MULTIARRAY = np.ndarray((0, )).__reduce__()[0].__module__

#: What every tensor loaded after :func:`negating_defaults` would have set.
NEGATING_METADATA = {'neg': True}


def glob(module: str, name: str) -> bytes:
    return b'c' + module.encode() + b'\n' + name.encode() + b'\n'


def const(value) -> bytes:
    """The instructions that push ``value`` (a plain Python value)."""
    return pickle.dumps(value, protocol=2)[2:-1]


def dtype(spec: str, state: tuple) -> bytes:
    """A numpy dtype built from ``spec`` and then given ``state``."""
    return glob('numpy', 'dtype') + const((spec, False, True)) + REDUCE + const(state) + BUILD


def array(dtype_code: bytes, shape: tuple, data) -> bytes:
    """A numpy array as numpy pickles one: ``_reconstruct``, then its state."""
    return (glob(NUMPY_MULTIARRAY, '_reconstruct') + glob('numpy', 'ndarray')
            + const((0, )) + const(b'b') + TUPLE3 + REDUCE + MARK + const(1) + const(shape)
            + dtype_code + const(False) + const(data) + TUPLE + BUILD)


def tensor(key: str, numel: int, size: tuple) -> bytes:
    """A float tensor on storage ``key`` that declares ``numel`` elements."""
    storage = MARK + const('storage') + glob('torch', 'FloatStorage') + const(key) + const('cpu') \
        + const(numel) + TUPLE + BINPERSID
    return (glob('torch._utils', '_rebuild_tensor_v2') + MARK + storage + const(0) + const(size)
            + const(tuple([1] * len(size))) + const(False)
            + glob('collections', 'OrderedDict') + EMPTY_TUPLE + REDUCE + TUPLE + REDUCE)


def checkpoint(entries: bytes) -> bytes:
    """A pickle of a dict; ``entries`` pushes key, value pairs."""
    return PROTO + EMPTY_DICT + MARK + entries + b'u' + STOP


def write_zip(path, data_pkl: bytes, storages=None, deflated=()):
    """A zip checkpoint as torch writes it, with this ``data.pkl``; storages in ``deflated`` are
    compressed (torch stores them uncompressed, but reads either)."""
    storages = storages or {}
    with zipfile.ZipFile(path, 'w') as archive:
        archive.writestr('archive/data.pkl', data_pkl)
        archive.writestr('archive/byteorder', b'little')
        for key, data in storages.items():
            compress = zipfile.ZIP_DEFLATED if key in deflated else zipfile.ZIP_STORED
            archive.writestr(f'archive/data/{key}', data, compress_type=compress)
        archive.writestr('archive/version', b'3\n')
    return path


def negating_defaults(folder):
    """A raw pickle whose BUILD gives ``torch._utils._rebuild_tensor_v2`` new defaults, so that
    every tensor loaded afterwards in the process reads negated (the file is then refused)."""
    path = folder / 'negating_defaults.pth'
    path.write_bytes(PROTO + glob('torch._utils', '_rebuild_tensor_v2')
                     + const((None, {'__defaults__': (NEGATING_METADATA, )})) + BUILD + STOP)
    return path


def build_on_global(folder, module: str, name: str):
    """A raw pickle whose BUILD sets an attribute ``mmdat_marker`` on a global."""
    path = folder / f'build_on_{module}.{name}.pth'
    path.write_bytes(PROTO + glob(module, name) + const((None, {'mmdat_marker': 1})) + BUILD
                     + STOP)
    return path


def object_array(folder):
    """An object array whose dtype state clears numpy's "holds Python objects" flag, so that
    the bytes of the file would be read as object pointers (a crash when the array is used)."""
    path = folder / 'object_array.pth'
    forged = dtype('O8', (3, '|', None, None, None, -1, -1, 0))
    return write_zip(path, checkpoint(const('meta') + EMPTY_DICT + const('seed')
                                      + array(forged, (2, ), b'\x10' * 16) + SETITEM))


def numpy_array(folder, name: str, dtype_code: bytes, shape: tuple, data):
    path = folder / f'{name}.pth'
    return write_zip(path, checkpoint(const('x') + array(dtype_code, shape, data)))


def history_buffer(folder):
    """mmengine's log buffer whose state names ``statistics_methods``, which mmengine copies
    into a table that the whole process shares."""
    path = folder / 'history_buffer.pth'
    histories = array(dtype('f8', np.dtype('f8').__reduce__()[2]), (1, ), struct.pack('<d', 1.0))
    state = (EMPTY_DICT + MARK + const('max_length') + const(10) + const('_log_history')
             + histories + const('_count_history') + histories + const('statistics_methods')
             + EMPTY_DICT + const('mean') + glob('torch', 'float32') + SETITEM + b'u')
    buffer = glob('mmengine.logging.history_buffer', 'HistoryBuffer') + EMPTY_TUPLE + NEWOBJ \
        + state + BUILD
    return write_zip(path, checkpoint(const('message_hub') + buffer))


def deflated_storage(folder, numel: int):
    """A small file whose one storage of ``numel`` floats is a compressed zip member."""
    path = folder / 'deflated_storage.pth'
    data = checkpoint(const('w') + tensor('0', numel, (numel, )))
    return write_zip(path, data, {'0': bytes(4 * numel)}, deflated={'0'})


def storage_larger_than_record(folder, numel: int):
    """A storage that declares ``numel`` floats with a record of 4."""
    path = folder / 'storage_larger_than_record.pth'
    return write_zip(path, checkpoint(const('w') + tensor('0', numel, (1, ))), {'0': bytes(4)})


def legacy_declaring(folder, numel: int):
    """The legacy (non-zip) format with a storage that declares ``numel`` floats and holds 4."""
    path = folder / 'legacy_declaring.pth'
    header = b''.join(pickle.dumps(value, protocol=2) for value in (
        0x1950a86a20f9469cfc6c, 1001,
        dict(protocol_version=1001, little_endian=True, type_sizes=dict(short=2, int=4, long=4))))
    storage = MARK + const('storage') + glob('torch', 'FloatStorage') + const('0') + const('cpu') \
        + const(numel) + const(None) + TUPLE + BINPERSID
    body = checkpoint(const('w') + glob('torch._utils', '_rebuild_tensor_v2') + MARK + storage
                      + const(0) + const((1, )) + const((1, )) + const(False)
                      + glob('collections', 'OrderedDict') + EMPTY_TUPLE + REDUCE + TUPLE + REDUCE)
    path.write_bytes(header + body + pickle.dumps(['0'], protocol=2) + struct.pack('<q', 1)
                     + bytes(4))
    return path


def many_sets(folder, count: int):
    """A raw pickle of ``count`` empty sets (over 200 bytes of memory per byte of file)."""
    path = folder / 'many_sets.pth'
    path.write_bytes(PROTO + MARK + EMPTY_SET * count + LIST + STOP)
    return path


def set_copies(folder, items: int, copies: int):
    """A pickle that builds one list of ``items`` numbers and then ``copies`` sets made from it,
    each a few bytes of pickle."""
    path = folder / 'set_copies.pth'
    make_set = b'h\xc8' + b'h\xc9' + TUPLE1 + REDUCE  # BINGET set, BINGET list, call
    path.write_bytes(PROTO + glob('builtins', 'set') + b'q\xc8' + b'0' + const(list(range(items)))
                     + b'q\xc9' + b'0' + MARK + make_set * copies + LIST + STOP)
    return path


def zero_stride(folder, numel: int):
    """A tensor of ``numel`` elements, all views of one stored float."""
    path = folder / 'zero_stride.pth'
    storage = MARK + const('storage') + glob('torch', 'FloatStorage') + const('0') + const('cpu') \
        + const(1) + TUPLE + BINPERSID
    data = checkpoint(const('w') + glob('torch._utils', '_rebuild_tensor_v2') + MARK + storage
                      + const(0) + const((numel, )) + const((0, )) + const(False)
                      + glob('collections', 'OrderedDict') + EMPTY_TUPLE + REDUCE + TUPLE + REDUCE)
    return write_zip(path, data, {'0': bytes(4)})


def good_weights(folder):
    """A plain checkpoint whose weights a later load must read unchanged."""
    path = folder / 'good_weights.pth'
    torch.save({'state_dict': collections.OrderedDict(w=torch.arange(1.0, 5.0))}, path)
    return path


class _Handler(http.server.BaseHTTPRequestHandler):

    def do_GET(self):
        self.server.requests.append(self.path)
        data = self.server.files.get(self.path)
        if data is None:
            self.send_error(404, 'Not Found')
            return
        self.send_response(200)
        # '/truncated/...' announces more bytes than it sends
        self.send_header('Content-Length', str(len(data) * (2 if 'truncated' in self.path else 1)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


class LoopbackServer:
    """A web server on 127.0.0.1 in a thread, as a context manager: ``files`` maps paths to
    bytes, ``requests`` lists the paths asked for, ``url`` is its address."""

    def __enter__(self):
        self.httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _Handler)
        self.files = self.httpd.files = {}
        self.requests = self.httpd.requests = []
        self.url = f'http://127.0.0.1:{self.httpd.server_address[1]}'
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)
