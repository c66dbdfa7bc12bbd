"""A CheckpointHook that never leaves a run without a complete checkpoint.

mmengine's ``CheckpointHook`` deletes the oldest kept checkpoint before it writes the new one, and
writes files and the ``last_checkpoint`` pointer in place: a run killed during a save can be left
with a truncated newest file, a pointer to nothing, and no older checkpoint.
"""
import contextlib
import glob
import logging
import os
import os.path as osp
from typing import List, Optional

from mmengine.dist import is_main_process
from mmengine.fileio import LocalBackend, register_backend
from mmengine.hooks import CheckpointHook
from mmengine.logging import print_log
from mmengine.registry import HOOKS

#: The file backend name under which :class:`AtomicLocalBackend` is registered.
ATOMIC_BACKEND = 'mmdat_atomic_local'
_TMP_SUFFIX = '.mmdat-tmp'


def _temporary_name(path: str) -> str:
    """A hidden name next to ``path``, unique to this process."""
    directory, name = osp.split(path)
    return osp.join(directory, f'.{name}.{os.getpid()}{_TMP_SUFFIX}')


def write_atomically(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` is either the old file or the whole new one.

    The data goes to a temporary file in the same folder, is flushed to disk, and the file is
    renamed over ``path`` (``os.replace`` is atomic on POSIX and Windows).
    """
    path = str(path)
    directory = osp.dirname(osp.abspath(path))
    os.makedirs(directory, exist_ok=True)
    temporary = _temporary_name(path)
    try:
        with open(temporary, 'wb') as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        if osp.exists(temporary):
            os.remove(temporary)
        raise
    if hasattr(os, 'O_DIRECTORY'):  # make the rename itself durable (POSIX)
        handle = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)


@register_backend(ATOMIC_BACKEND, force=True)  # force: mmdat may be imported again (reload)
class AtomicLocalBackend(LocalBackend):
    """Local files, written with :func:`write_atomically`; removals can be held back.

    :class:`AtomicCheckpointHook` gives it to mmengine's ``Runner.save_checkpoint``.
    """

    def __init__(self):
        super().__init__()
        self._held: Optional[List[str]] = None

    def put(self, obj: bytes, filepath) -> None:
        write_atomically(filepath, obj)

    def put_text(self, obj: str, filepath, encoding: str = 'utf-8') -> None:
        write_atomically(filepath, obj.encode(encoding))

    def remove(self, filepath) -> None:
        if self._held is None:
            super().remove(filepath)
        else:
            self._held.append(filepath)

    @contextlib.contextmanager
    def removals_held(self):
        """Remove files only when the block has run to its end (so not if a save failed)."""
        if self._held is not None:  # nested: the outer block removes
            yield
            return
        self._held = []
        try:
            yield
            held = self._held
        finally:
            self._held = None
        for path in held:
            if self.isfile(path):
                super().remove(path)


@HOOKS.register_module()
class AtomicCheckpointHook(CheckpointHook):
    """mmengine's ``CheckpointHook`` (same arguments) made safe against a crash during a save.

    For checkpoints saved to a local folder:

    - each file is written to a temporary name and renamed when complete;
    - ``last_checkpoint`` is written the same way, after the checkpoint it names;
    - checkpoints beyond ``max_keep_ckpts`` (and a superseded best checkpoint) are removed only
      after the new file is complete;
    - temporary files left by a killed run are removed when training starts.

    So the work dir always holds a complete checkpoint once one was saved, and ``last_checkpoint``
    names a complete file. Checkpoints saved elsewhere (``out_dir`` a URL, or ``backend_args``
    given) are saved as mmengine saves them, with a warning.

    Registered in mmengine's root ``HOOKS``, so mmdet and mmseg configs find it as
    ``default_hooks.checkpoint.type='AtomicCheckpointHook'`` (with ``custom_imports`` of
    ``mmdat``); ``tools/train.py`` uses it in place of a plain ``CheckpointHook``.
    """
    _atomic = False  # set in before_train

    def before_train(self, runner) -> None:
        out_dir = self.out_dir or runner.work_dir
        self._atomic = (self.file_client_args is None and self.backend_args is None
                        and '://' not in str(out_dir))
        if self._atomic:
            self.backend_args = dict(backend=ATOMIC_BACKEND)
        else:
            print_log(f'AtomicCheckpointHook: checkpoints go to {out_dir} through a storage '
                      'backend; they are saved as mmengine saves them (not atomically)',
                      logger='current', level=logging.WARNING)
        super().before_train(runner)
        if self._atomic and is_main_process():
            for leftover in glob.glob(osp.join(glob.escape(str(self.out_dir)), f'.*{_TMP_SUFFIX}')):
                os.remove(leftover)

    def _save_checkpoint_with_step(self, runner, step, meta) -> None:
        if not self._atomic:
            super()._save_checkpoint_with_step(runner, step, meta)
            return
        # The same bookkeeping as CheckpointHook (the saved message hub lists the kept
        # checkpoints, the new one included), but the superseded file is removed last.
        superseded = None
        if self.max_keep_ckpts > 0 and not (self.keep_ckpt_ids and self.keep_ckpt_ids[-1] == step):
            if len(self.keep_ckpt_ids) == self.max_keep_ckpts:
                superseded = self.keep_ckpt_ids.popleft()
            self.keep_ckpt_ids.append(step)
            runner.message_hub.update_info('keep_ckpt_ids', list(self.keep_ckpt_ids))
        filename = self.filename_tmpl.format(step)
        self.last_ckpt = self.file_backend.join_path(self.out_dir, filename)
        runner.message_hub.update_info('last_ckpt', self.last_ckpt)
        runner.save_checkpoint(self.out_dir, filename, save_optimizer=self.save_optimizer,
                               save_param_scheduler=self.save_param_scheduler, meta=meta,
                               by_epoch=self.by_epoch, backend_args=self.backend_args,
                               **self.args)
        if not is_main_process():
            return
        write_atomically(osp.join(runner.work_dir, 'last_checkpoint'), self.last_ckpt.encode())
        if superseded is not None:
            path = self.file_backend.join_path(self.out_dir, self.filename_tmpl.format(superseded))
            if self.file_backend.isdir(path):  # DeepSpeed saves folders
                self.file_backend.rmtree(path)
            elif self.file_backend.isfile(path):
                self.file_backend.remove(path)

    def _save_best_checkpoint(self, runner, metrics) -> None:
        if not self._atomic:
            super()._save_best_checkpoint(runner, metrics)
            return
        # CheckpointHook removes the previous best file before it saves the new one.
        with self.file_backend.removals_held():
            super()._save_best_checkpoint(runner, metrics)
