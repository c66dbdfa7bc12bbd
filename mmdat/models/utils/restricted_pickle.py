"""The unpickler that reads untrusted checkpoint files: it builds tensors, plain containers,
numeric numpy arrays and mmengine's log buffers, and nothing else.

Three rules make it safe (see ``docs/weights.md``):

* **Only allowed builders are called.** A global of the file is looked up in
  :data:`ALLOWED_GLOBALS`, which maps it to a function of this module that checks its arguments
  (or to an inert class); anything else is refused before it is imported.
* **Objects are built, never changed.** The pickle instructions that set state (``BUILD``) or add
  items (``APPEND``, ``SETITEM``, ``ADDITEMS``) act only on instances of the types this reader
  creates, each with its own check, never on a global, a function or a class. The process is
  therefore left as it was, even by a file that is refused halfway.
* **Memory is bounded.** Every storage a file declares must be held in the file itself (zip
  members stored, not compressed; the legacy format's storages within the file size), and the
  objects its pickle builds may not grow the process by more than :func:`object_allowance`.
"""
import collections
import os
import pickle
import sys
import types
from _codecs import encode as _codecs_encode
from collections import OrderedDict
from typing import Callable, Dict, Optional

import numpy as np
import torch
from mmengine.logging.history_buffer import HistoryBuffer

#: Environment variable that sets the base of :func:`object_allowance`, in MiB.
MEMORY_ENV = 'MMDAT_CHECKPOINT_MEMORY_MB'
#: Default base of :func:`object_allowance`, in MiB.
DEFAULT_MEMORY_MB = 64
#: Bytes of objects allowed per byte of pickle, on top of the base.
BYTES_PER_PICKLE_BYTE = 16


class OmittedObject:
    """Stands in for a pickled config object (the official DAT files hold a yacs ``CfgNode``).

    It accepts whatever the unpickler hands it and keeps nothing, so reading it runs no code.
    """

    def __init__(self, *args, **kwargs):
        pass


#: Classes of the configs that training scripts pickle next to the weights; they are read as
#: :class:`OmittedObject`.
CONFIG_CLASSES = {('yacs.config', 'CfgNode'), ('argparse', 'Namespace')}


def object_allowance(pickle_size: int) -> int:
    """Bytes by which the objects a pickle of ``pickle_size`` bytes builds may grow the process.

    ``MMDAT_CHECKPOINT_MEMORY_MB`` (default 64) MiB plus 16 bytes per byte of pickle. Tensor
    storages are not counted here: they are bounded by the bytes the file really holds.
    """
    text = os.environ.get(MEMORY_ENV, str(DEFAULT_MEMORY_MB))
    try:
        base_mb = float(text)
    except ValueError:
        base_mb = -1
    if not base_mb >= 0:
        raise ValueError(f'{MEMORY_ENV}={text!r}: expected a number of MiB (>= 0)')
    return int(base_mb * 2**20) + BYTES_PER_PICKLE_BYTE * pickle_size


def _resident_bytes() -> Optional[int]:
    """This process's resident memory (Linux); elsewhere its peak, or None where unknown."""
    try:
        with open('/proc/self/statm', 'rb') as statm:
            return int(statm.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == 'darwin' else peak * 1024


class Refused(pickle.UnpicklingError):
    """The file asks for something this reader does not do; the message says what."""

    #: Whether ``--trust-checkpoint`` is the advice (an object that is not weights).
    trust_helps = True


class Unreadable(Refused):
    """The file is damaged or needs more memory than its contents justify."""

    trust_helps = False


class _MemoryGuard:
    """Refuses a load once the process has grown by more than its allowance plus the bytes of
    the storages read so far."""

    def __init__(self, allowance: int):
        self.allowance = allowance
        self.storage_bytes = 0
        self.start = _resident_bytes()

    def check(self):
        if self.start is None:
            return
        grown = _resident_bytes() - self.start - self.storage_bytes
        if grown > self.allowance:
            raise Unreadable(f'refused to build more than {self.allowance / 2**20:.0f} MiB of '
                             f'objects besides its tensors (raise {MEMORY_ENV} if you need more)')


# --- the builders that the file's globals map to -------------------------------------------------


def _ints(values, what: str):
    if not isinstance(values, (tuple, list)) or not all(
            type(v) is int and v >= 0 for v in values):
        raise Refused(f'refused a tensor with {what} {values!r}')
    return tuple(values)


def _check_empty_hooks(hooks):
    if hooks is not None and not (isinstance(hooks, dict) and not hooks):
        raise Refused('refused a tensor with backward hooks')


def _tensor_from_storage(storage, offset, size, stride) -> torch.Tensor:
    """A tensor on ``storage``; its elements must be distinct elements of the storage."""
    if not isinstance(storage, torch.storage.TypedStorage):
        raise Refused(f'refused a tensor on a {type(storage).__name__}, not a storage')
    if type(offset) is not int or offset < 0:
        raise Refused(f'refused a tensor at offset {offset!r}')
    size, stride = _ints(size, 'size'), _ints(stride, 'stride')
    if len(size) != len(stride):
        raise Refused(f'refused a tensor of size {size} and stride {stride}')
    numel = 1
    for length in size:
        numel *= length
    # A view may not show more elements than the storage holds (a zero stride could make a small
    # storage look like a huge tensor, which whoever copies it would allocate).
    if numel > max(storage._size() - offset, 0):
        raise Refused(f'refused a tensor of size {size}: more elements than its storage holds')
    tensor = torch.empty((0, ), dtype=storage.dtype, device=storage._untyped_storage.device)
    return tensor.set_(storage._untyped_storage, offset, size, stride)  # checks the bounds


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _tensor_from_storage(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       metadata=None):
    _check_empty_hooks(backward_hooks)
    if metadata:  # e.g. {'neg': True}, which would show the data negated
        raise Refused(f'refused a tensor with metadata {metadata!r}')
    tensor = _tensor_from_storage(storage, storage_offset, size, stride)
    tensor.requires_grad = bool(requires_grad)
    return tensor


def _rebuild_parameter(data, requires_grad, backward_hooks):
    if type(data) is not torch.Tensor:
        raise Refused(f'refused a parameter of a {type(data).__name__}')
    _check_empty_hooks(backward_hooks)
    return torch.nn.Parameter(data, bool(requires_grad))


def _ordered_dict(items=()):
    if not isinstance(items, (list, tuple)):
        raise Refused(f'refused an OrderedDict made from a {type(items).__name__}')
    return OrderedDict(items)


def _counter(counts=None):
    if not isinstance(counts, (dict, type(None))):
        raise Refused(f'refused a Counter made from a {type(counts).__name__}')
    return collections.Counter(counts or {})


def _set(items=()):
    if not isinstance(items, (list, tuple)):
        raise Refused(f'refused a set made from a {type(items).__name__}')
    return set(items)


def _frozenset(items=()):
    if not isinstance(items, (list, tuple)):
        raise Refused(f'refused a frozenset made from a {type(items).__name__}')
    return frozenset(items)


def _encode(text, encoding='utf-8'):
    """How protocol 2 pickles bytes: ``_codecs.encode(str, 'latin1')``."""
    if type(text) is not str or encoding not in ('latin1', 'latin-1'):
        raise Refused(f'refused _codecs.encode with {encoding!r}')
    return _codecs_encode(text, encoding)


def _size(values=()):
    return torch.Size(_ints(values, 'size'))


def _device(*args):
    if not 1 <= len(args) <= 2 or type(args[0]) is not str or (
            len(args) == 2 and type(args[1]) is not int):
        raise Refused(f'refused torch.device{args!r}')
    return torch.device(*args)


#: numpy dtypes read: booleans and numbers, e.g. ``'f8'`` (``'<'``/``'>'`` come with the state).
_NUMPY_KINDS = 'biufc'


def _numpy_dtype(spec, align=False, copy=True):
    """``numpy.dtype`` for a boolean or number; object, void (structured), string, unicode and
    datetime dtypes are refused."""
    if type(spec) is not str or not (spec == '?' or (spec[:1] in tuple(_NUMPY_KINDS)
                                                     and spec[1:].isdigit())):
        raise Refused(f'refused numpy dtype {spec!r}: only booleans and numbers are read')
    dtype = np.dtype(spec, False, True)  # a copy: BUILD below never touches numpy's own dtypes
    _check_dtype(dtype)
    return dtype


def _check_dtype(dtype):
    if not isinstance(dtype, np.dtype) or dtype.kind not in _NUMPY_KINDS or dtype.hasobject \
            or dtype.fields is not None or dtype.subdtype is not None:
        raise Refused(f'refused numpy dtype {dtype!r}: only booleans and numbers are read')


def _numpy_reconstruct(subtype, shape, code):
    """``numpy.core.multiarray._reconstruct``: numpy pickles an empty array, then its state."""
    if subtype is not np.ndarray or tuple(shape) != (0, ) or code != b'b':
        raise Refused(f'refused numpy _reconstruct{(subtype, shape, code)!r}')
    return np.ndarray((0, ), np.uint8)


def _numpy_scalar(dtype, data=None):
    _check_dtype(dtype)
    if type(data) is not bytes or len(data) != dtype.itemsize:
        raise Refused('refused a numpy scalar whose data does not match its dtype')
    return np.frombuffer(data, dtype)[0]


def _numpy_frombuffer(data, dtype, shape, order):
    """How pickle protocol 5 stores a numpy array: ``numpy.core.numeric._frombuffer``."""
    _check_dtype(dtype)
    shape = _ints(shape, 'shape')
    count = 1
    for length in shape:
        count *= length
    if type(data) not in (bytes, bytearray) or len(data) != count * dtype.itemsize \
            or order not in ('C', 'F'):
        raise Refused('refused a numpy array whose data does not match its shape and dtype')
    return np.frombuffer(data, dtype).reshape(shape, order=order).copy()


_NUMPY_GLOBALS = {}
for _core in ('core', '_core'):  # numpy 2 moved numpy.core to numpy._core; pickles name either
    _NUMPY_GLOBALS[(f'numpy.{_core}.multiarray', '_reconstruct')] = _numpy_reconstruct
    _NUMPY_GLOBALS[(f'numpy.{_core}.multiarray', 'scalar')] = _numpy_scalar
    _NUMPY_GLOBALS[(f'numpy.{_core}.numeric', '_frombuffer')] = _numpy_frombuffer

#: ``(module, name)`` -> what the reader builds for it.
ALLOWED_GLOBALS: Dict[tuple, Callable] = {
    ('collections', 'OrderedDict'): _ordered_dict,
    ('collections', 'Counter'): _counter,  # mmengine's schedulers keep one
    ('builtins', 'set'): _set,
    ('builtins', 'frozenset'): _frozenset,
    ('_codecs', 'encode'): _encode,
    ('torch._utils', '_rebuild_tensor'): _rebuild_tensor,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor_v2,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch', 'Size'): _size,
    ('torch', 'device'): _device,
    ('numpy', 'dtype'): _numpy_dtype,
    ('numpy', 'ndarray'): np.ndarray,  # an argument of _reconstruct, never called
    ('mmengine.logging.history_buffer', 'HistoryBuffer'): HistoryBuffer,
    **_NUMPY_GLOBALS,
    **{config_class: OmittedObject for config_class in CONFIG_CLASSES},
}
#: Classes built with ``cls.__new__(cls)`` (pickle's NEWOBJ), then given their state by BUILD.
_NEW_OBJECT_CLASSES = (HistoryBuffer, OmittedObject)
#: How a file names each builder (for messages).
_GLOBAL_NAMES = {}
for (_module, _name), _value in ALLOWED_GLOBALS.items():
    _GLOBAL_NAMES.setdefault(id(_value), f'{_module}.{_name}')
#: What REDUCE may call: the builders above (not the classes, which would build without checks).
_CALLABLES = tuple(value for value in ALLOWED_GLOBALS.values()
                   if value is not HistoryBuffer and value is not np.ndarray)


def _is_one_of(obj, candidates) -> bool:
    return any(obj is candidate for candidate in candidates)


# --- the state that BUILD may set ----------------------------------------------------------------


def history_buffer_setstate(buffer: HistoryBuffer, state) -> None:
    """Give a ``HistoryBuffer`` its state from a file: its histories and length only.

    mmengine's own ``__setstate__`` copies a ``statistics_methods`` entry of the state into a
    table the whole process shares; here that entry is dropped (the process has mmengine's
    methods already), and any other unknown entry or type is refused.
    """
    if not isinstance(state, dict):
        raise Refused('refused a HistoryBuffer state that is not a dict')
    state = dict(state)
    state.pop('statistics_methods', None)
    if set(state) != {'max_length', '_log_history', '_count_history'}:
        raise Refused(f'refused a HistoryBuffer state with entries {sorted(map(str, state))}')
    histories = state['_log_history'], state['_count_history']
    if type(state['max_length']) is not int or not all(
            type(h) is np.ndarray and h.ndim == 1 and h.dtype.kind in 'biuf' for h in histories) \
            or len(histories[0]) != len(histories[1]):
        raise Refused('refused a HistoryBuffer state of other types than mmengine writes')
    buffer.__dict__.update(state)


def _set_array_state(array: np.ndarray, state) -> None:
    if array.shape != (0, ) or not isinstance(state, tuple) or len(state) != 5:
        raise Refused('refused a numpy array state')
    version, shape, dtype, fortran_order, data = state
    _check_dtype(dtype)
    shape = _ints(shape, 'shape')
    count = 1
    for length in shape:
        count *= length
    if version != 1 or type(fortran_order) is not bool or type(data) is not bytes or \
            len(data) != count * dtype.itemsize:
        raise Refused('refused a numpy array whose data does not match its shape and dtype')
    array.__setstate__(state)


def _set_dtype_state(dtype: np.dtype, state) -> None:
    """Only the byte order may differ from the dtype's own state (the flags, e.g. "holds Python
    objects", fields and sizes are checked before numpy sees them)."""
    own = dtype.__reduce__()[2]
    if not (isinstance(state, tuple) and len(state) == len(own) and state[0] == own[0]
            and state[1] in ('<', '>', '|', '=') and state[2:] == own[2:]):
        raise Refused(f'refused numpy dtype state {state!r}')
    dtype.__setstate__(state)


def _set_ordered_dict_state(mapping: OrderedDict, state) -> None:
    """``state_dict()``'s ``_metadata`` attribute."""
    if isinstance(state, tuple) and len(state) == 2 and state[1] is None:
        state = state[0]
    if not isinstance(state, dict) or not all(type(key) is str for key in state):
        raise Refused('refused an OrderedDict state')
    mapping.__dict__.update(state)


def _build(inst, state) -> None:
    """Pickle's BUILD: only on the instances this reader created, each with its checks."""
    kind = type(inst)
    if kind is OmittedObject:
        return
    if kind is OrderedDict:
        _set_ordered_dict_state(inst, state)
    elif kind is np.ndarray:
        _set_array_state(inst, state)
    elif isinstance(inst, np.dtype):
        _set_dtype_state(inst, state)
    elif kind is HistoryBuffer:
        history_buffer_setstate(inst, state)
    else:
        raise Refused(f'refused to set the state of {_describe(inst)}')


def _describe(obj) -> str:
    if id(obj) in _GLOBAL_NAMES:
        return f'the global {_GLOBAL_NAMES[id(obj)]}'
    if isinstance(obj, (type, types.FunctionType, types.BuiltinFunctionType)):
        return f'{getattr(obj, "__module__", "?")}.{getattr(obj, "__qualname__", "?")}'
    return f'a {type(obj).__name__}'


# --- the unpickler -------------------------------------------------------------------------------


def _set_pairs(mapping, items):
    """``mapping[k] = v`` for the ``k, v, k, v, ...`` of a pickle's SETITEMS."""
    for i in range(0, len(items), 2):
        mapping[items[i]] = items[i + 1]


def _item_target(obj, kinds, what):
    if type(obj) is OmittedObject:
        return None
    if type(obj) not in kinds:
        raise Refused(f'refused to {what} {_describe(obj)}')
    return obj


class RestrictedUnpickler(pickle._Unpickler):
    """Python's own unpickler (the pure-Python one, whose instructions can be replaced) with
    the rules of this module.

    It is constructed as :class:`pickle.Unpickler` is (torch does); :func:`restricted_pickle_module`
    sets the class attributes of one load.

    Attributes:
        storage_check (callable, optional): Called with each persistent id (torch's storages)
            before torch reads the storage; returns the bytes it will allocate (0 for one read
            already) and raises :class:`Refused` for one that the file does not hold.
        guard (_MemoryGuard, optional): The memory guard of the load.
    """

    storage_check: Optional[Callable] = None
    guard: Optional[_MemoryGuard] = None
    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, **kwargs):
        super().__init__(file, **kwargs)
        self._torch_persistent_load = None
        self._instructions = 0

    # torch sets ``unpickler.persistent_load``; the storage is checked before torch reads it
    @property
    def persistent_load(self):
        return self._checked_persistent_load

    @persistent_load.setter
    def persistent_load(self, function):
        self._torch_persistent_load = function

    def _checked_persistent_load(self, pid):
        if self._torch_persistent_load is None:
            raise Refused('refused a persistent id outside a torch checkpoint')
        nbytes = self.storage_check(pid) if self.storage_check is not None else 0
        storage = self._torch_persistent_load(pid)
        if self.guard is not None:
            self.guard.storage_bytes += nbytes
        return storage

    def find_class(self, module, name):
        if self.proto < 3 and self.fix_imports:
            import _compat_pickle
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
        if type(module) is not str or type(name) is not str:
            raise Refused('refused a global that is not named by strings')
        found = ALLOWED_GLOBALS.get((module, name))
        if found is not None:
            return found
        if module == 'torch':
            value = getattr(torch, name, None) if name.isidentifier() else None
            if isinstance(value, torch.dtype):
                return value
            if value is torch.UntypedStorage or (isinstance(value, type) and issubclass(
                    value, torch.storage.TypedStorage)):
                return value  # a storage type, named in torch's persistent ids
        loaded = sys.modules.get(module)  # looked up, never imported: importing runs code
        if loaded is not None and name.isidentifier() and not hasattr(loaded, name):
            # e.g. a pickle cut short inside a name: damage, not an object to trust
            raise Unreadable(f'damaged: it names {module}.{name}, which does not exist')
        raise Refused(f'refused to load {module}.{name}: only tensors, plain containers and '
                      'numeric numpy arrays are read')

    def _call(self, func, args):
        if not _is_one_of(func, _CALLABLES):
            raise Refused(f'refused to call {_describe(func)}')
        if not isinstance(args, tuple):
            raise Refused('refused a call whose arguments are not a tuple')
        return func(*args)

    def _new(self, cls, args, kwargs=None):
        if not _is_one_of(cls, _NEW_OBJECT_CLASSES) or args or kwargs:
            raise Refused(f'refused to create {_describe(cls)}')
        return cls.__new__(cls)

    # Each instruction below replaces Python's own; they follow pickle.py's stack handling.

    def load_reduce(self):
        args = self.stack.pop()
        self.stack[-1] = self._call(self.stack[-1], args)

    def load_newobj(self):
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._new(cls, args))

    def load_newobj_ex(self):
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._new(cls, args, kwargs))

    def load_inst(self):
        module = self.readline()[:-1].decode('ascii')
        name = self.readline()[:-1].decode('ascii')
        self._instantiate(self.find_class(module, name), self.pop_mark())

    def load_obj(self):
        args = self.pop_mark()
        cls = args.pop(0)
        self._instantiate(cls, args)

    def _instantiate(self, klass, args):
        if _is_one_of(klass, _NEW_OBJECT_CLASSES):
            self.append(self._new(klass, tuple(args)))
        else:
            self.append(self._call(klass, tuple(args)))

    def load_build(self):
        state = self.stack.pop()
        _build(self.stack[-1], state)

    def _add_items(self, kinds, what, items, add):
        """Add ``items`` to the object on top of the stack, one of ``kinds`` (an omitted
        config takes and keeps nothing)."""
        target = _item_target(self.stack[-1], kinds, what)
        if target is not None:
            add(target, items)

    def load_append(self):
        self._add_items((list, ), 'append to', [self.stack.pop()], list.extend)

    def load_appends(self):
        self._add_items((list, ), 'append to', self.pop_mark(), list.extend)

    def load_setitem(self):
        value = self.stack.pop()
        key = self.stack.pop()
        self._add_items((dict, OrderedDict), 'set items of', [key, value], _set_pairs)

    def load_setitems(self):
        self._add_items((dict, OrderedDict), 'set items of', self.pop_mark(), _set_pairs)

    def load_additems(self):
        self._add_items((set, ), 'add items to', self.pop_mark(), set.update)

    def load_ext(self):
        raise Refused('refused a copyreg extension code')

    def load_buffer(self):
        raise Refused('refused an out-of-band buffer')


def _with_memory_check(instruction, every_time: bool):
    """Run ``instruction``, then check the memory: after every instruction that calls a builder
    (it may allocate in proportion to what exists already), after every 256th of the others
    (each allocates at most a few hundred bytes plus what it reads)."""

    def run(self):
        instruction(self)
        self._instructions += 1
        if self.guard is not None and (every_time or not self._instructions & 255):
            self.guard.check()

    return run


_REPLACED = {
    pickle.REDUCE: 'load_reduce', pickle.NEWOBJ: 'load_newobj', pickle.NEWOBJ_EX: 'load_newobj_ex',
    pickle.INST: 'load_inst', pickle.OBJ: 'load_obj', pickle.BUILD: 'load_build',
    pickle.APPEND: 'load_append', pickle.APPENDS: 'load_appends', pickle.SETITEM: 'load_setitem',
    pickle.SETITEMS: 'load_setitems', pickle.ADDITEMS: 'load_additems', pickle.EXT1: 'load_ext',
    pickle.EXT2: 'load_ext', pickle.EXT4: 'load_ext', pickle.NEXT_BUFFER: 'load_buffer',
    pickle.READONLY_BUFFER: 'load_buffer',
}
_BUILDERS = {pickle.REDUCE, pickle.NEWOBJ, pickle.NEWOBJ_EX, pickle.INST, pickle.OBJ, pickle.BUILD,
             pickle.BINPERSID, pickle.PERSID, pickle.FRAME}
for _code, _function in pickle._Unpickler.dispatch.items():
    _opcode = bytes([_code])
    if _opcode in _REPLACED:
        _function = getattr(RestrictedUnpickler, _REPLACED[_opcode])
    RestrictedUnpickler.dispatch[_code] = _with_memory_check(_function, _opcode in _BUILDERS)


def restricted_pickle_module(storage_check: Optional[Callable] = None,
                             guard: Optional[_MemoryGuard] = None) -> types.SimpleNamespace:
    """A ``pickle_module`` for :func:`torch.load` (torch's legacy reader also unpickles its
    header with ``pickle_module.load``, so both entry points are restricted)."""
    unpickler = type('Unpickler', (RestrictedUnpickler, ),
                     dict(storage_check=staticmethod(storage_check) if storage_check else None,
                          guard=guard))

    def load(file, **kwargs):
        return unpickler(file, **kwargs).load()

    return types.SimpleNamespace(Unpickler=unpickler, load=load, __name__='mmdat_restricted_pickle')


__all__ = ['ALLOWED_GLOBALS', 'CONFIG_CLASSES', 'MEMORY_ENV', 'OmittedObject', 'Refused',
           'RestrictedUnpickler', 'Unreadable', 'history_buffer_setstate', 'object_allowance',
           'restricted_pickle_module']
