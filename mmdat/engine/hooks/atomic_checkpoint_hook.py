"""A CheckpointHook that never leaves a run without a complete checkpoint.

mmengine's ``CheckpointHook`` deletes the oldest kept checkpoint before it writes the new one, and
writes files and the ``last_checkpoint`` pointer in place: a run killed during a save can be left
with a truncated newest file, a pointer to nothing, and no older checkpoint.
"""
import contextlib
import logging
import os
import os.path as osp
import shutil
from typing import List, Optional

from mmengine.dist import is_main_process
from mmengine.fileio import LocalBackend, register_backend
from mmengine.hooks import CheckpointHook
from mmengine.logging import print_log
from mmengine.registry import HOOKS

from ..resume import list_checkpoints
from ..work_dir import WorkDirLock, remove_abandoned_temporaries, temporary_name

#: The file backend name under which :class:`AtomicLocalBackend` is registered.
ATOMIC_BACKEND = 'mmdat_atomic_local'


def write_atomically(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` is either the old file or the whole new one.

    The data goes to a temporary file in the same folder (named after this process, see
    :func:`mmdat.engine.work_dir.temporary_name`), is flushed to disk, and the file is renamed
    over ``path`` (``os.replace`` is atomic on POSIX and Windows).

    Raises:
        OSError: As the file system reports it (e.g. a full disk), naming ``path`` rather than
            the temporary file.
    """
    path = str(path)
    directory = osp.dirname(osp.abspath(path))
    os.makedirs(directory, exist_ok=True)
    temporary = temporary_name(path)
    try:
        with open(temporary, 'wb') as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        if osp.exists(temporary):
            os.remove(temporary)
        if isinstance(error, OSError) and error.errno is not None and error.filename in (
                None, temporary):
            raise type(error)(error.errno, error.strerror, path) from error
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
      after the new file and ``last_checkpoint`` are complete, and found by listing the folder:
      files that a run killed during an earlier save left are removed too;
    - a run holds its work dir and checkpoint folder (:class:`~mmdat.engine.work_dir.WorkDirLock`):
      a second run there stops with :class:`~mmdat.engine.work_dir.WorkDirInUseError` naming the
      first;
    - temporary files whose writing process has ended are removed when training starts (never
      those of a live process).

    So the work dir always holds a complete checkpoint once one was saved, ``last_checkpoint``
    names a complete file, and at most ``max_keep_ckpts`` checkpoints stay, whenever the run is
    killed. Checkpoints saved elsewhere (``out_dir`` a URL, or ``backend_args``
    given) are saved as mmengine saves them, with a warning.

    Registered in mmengine's root ``HOOKS``, so mmdet and mmseg configs find it as
    ``default_hooks.checkpoint.type='AtomicCheckpointHook'`` (with ``custom_imports`` of
    ``mmdat``); ``tools/train.py`` uses it in place of a plain ``CheckpointHook``.
    """
    _atomic = False  # set in before_train
    _locks: List[WorkDirLock] = []  # the folders this run holds (main process)

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
        held = self._atomic and is_main_process()
        if held:  # before CheckpointHook's own before_train, which may remove checkpoints
            self._hold(str(runner.work_dir))
        super().before_train(runner)  # sets self.out_dir: out_dir/<work dir name> or the work dir
        if held:
            self._hold(str(self.out_dir))
            for folder in dict.fromkeys([str(runner.work_dir), str(self.out_dir)]):
                for path in remove_abandoned_temporaries(folder):
                    print_log(f'Removed {path}, left by a run that ended during a save',
                              logger='current', level=logging.INFO)

    def _hold(self, folder: str) -> None:
        if any(osp.realpath(lock.folder) == osp.realpath(folder) for lock in self._locks):
            return
        lock = WorkDirLock(folder)
        lock.acquire()
        self._locks = self._locks + [lock]

    def after_run(self, runner) -> None:
        for lock in self._locks:
            lock.release()
        self._locks = []

    def _save_checkpoint_with_step(self, runner, step, meta) -> None:
        if not self._atomic:
            super()._save_checkpoint_with_step(runner, step, meta)
            return
        # The same bookkeeping as CheckpointHook (the saved message hub lists the kept
        # checkpoints, the new one included), but old files are removed last.
        if self.max_keep_ckpts > 0 and not (self.keep_ckpt_ids and self.keep_ckpt_ids[-1] == step):
            if len(self.keep_ckpt_ids) == self.max_keep_ckpts:
                self.keep_ckpt_ids.popleft()
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
        self._remove_old_checkpoints(step)

    def _remove_old_checkpoints(self, step: int) -> None:
        """Remove the checkpoints in the folder older than ``step`` that are not kept.

        The folder is listed rather than trusting the kept steps alone: a run killed between
        its rename and this removal left a file that no later run would otherwise remove.
        Files of later steps (from an earlier, longer run) are left to be overwritten.
        """
        if self.max_keep_ckpts <= 0:
            return
        kept = set(self.keep_ckpt_ids)
        for old_step, path in list_checkpoints(str(self.out_dir), (self.filename_tmpl, )):
            if old_step < step and old_step not in kept:
                if osp.isdir(path):  # DeepSpeed saves folders
                    shutil.rmtree(path)
                else:
                    os.remove(path)

    def _save_best_checkpoint(self, runner, metrics) -> None:
        if not self._atomic:
            super()._save_best_checkpoint(runner, metrics)
            return
        # CheckpointHook removes the previous best file before it saves the new one.
        with self.file_backend.removals_held():
            super()._save_best_checkpoint(runner, metrics)
