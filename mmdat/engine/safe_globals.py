"""Let ``torch.load(weights_only=True)`` read the checkpoints mmengine's runner writes, safely.

Since torch 2.6 ``torch.load`` defaults to ``weights_only=True``, which refuses the few non-tensor
objects mmengine stores to resume a run: its ``HistoryBuffer`` of logged scalars and the numpy
arrays, dtypes and scalars inside them. We allow-list exactly those types, instead of turning
``weights_only`` off, so that such a load still runs no code from the file. (mmdat's own reader,
:func:`mmdat.models.utils.load_checkpoint_file`, does not need this: it has its own, stricter
rules.)

``HistoryBuffer`` needs two changes for that:

* mmengine's ``__setstate__`` copies a ``statistics_methods`` entry of the file into a table that
  the whole process shares (torch lets ``BUILD`` call ``__setstate__`` of allow-listed types), so
  one file could break the logging of every later run in the process. It is replaced by
  :func:`~mmdat.models.utils.restricted_pickle.history_buffer_setstate`, which drops that entry
  and refuses unknown ones.
* mmengine's ``__getstate__`` pickles that table of functions, which can only be rebuilt through
  ``getattr``, a global too powerful to allow; buffers pickled after
  :func:`allow_mmengine_checkpoints` leave it out (the loading process has it already).
  Checkpoints written without mmdat imported keep it and are still refused: load those only if
  you trust them.
"""
import numpy as np
import torch
from mmengine.logging.history_buffer import HistoryBuffer

from mmdat.models.utils.restricted_pickle import history_buffer_setstate

# numpy 2 moved ``numpy.core`` to ``numpy._core``.
_multiarray = np._core.multiarray if hasattr(np, '_core') else np.core.multiarray


def _numpy_dtype_classes():
    """The concrete dtype classes (numpy >= 1.25) of booleans, integers and floats."""
    classes = []
    for name in ('Bool', 'Int8', 'Int16', 'Int32', 'Int64', 'UInt8', 'UInt16', 'UInt32', 'UInt64',
                 'Float16', 'Float32', 'Float64', 'LongLong', 'ULongLong'):
        cls = getattr(getattr(np, 'dtypes', None), f'{name}DType', None)
        if cls is not None:
            classes.append(cls)
    return classes


#: What an mmengine checkpoint needs beyond tensors and containers.
MMENGINE_CHECKPOINT_GLOBALS = [
    HistoryBuffer, np.ndarray, np.dtype, _multiarray._reconstruct, _multiarray.scalar,
    *_numpy_dtype_classes()
]


def _history_buffer_state(buffer: HistoryBuffer) -> dict:
    """``HistoryBuffer`` state without the class-wide table of functions."""
    state = dict(buffer.__dict__)
    state.pop('statistics_methods', None)
    return state


def allow_mmengine_checkpoints() -> None:
    """Make mmengine checkpoints loadable with ``weights_only=True``.

    Adds :data:`MMENGINE_CHECKPOINT_GLOBALS` to torch's allow-list, stops ``HistoryBuffer`` from
    pickling functions and from writing the process-wide table when it is unpickled.
    """
    HistoryBuffer.__getstate__ = _history_buffer_state
    HistoryBuffer.__setstate__ = history_buffer_setstate
    add_safe_globals = getattr(torch.serialization, 'add_safe_globals', None)
    if add_safe_globals is not None:  # torch < 2.4 loads everything unrestricted anyway
        add_safe_globals(MMENGINE_CHECKPOINT_GLOBALS)
