"""Choosing and checking the checkpoint that ``tools/train.py --resume`` resumes from."""
import logging
import os
import os.path as osp
import re
import zipfile
from typing import List, Mapping, Optional, Tuple, Union

from mmengine.config import Config
from mmengine.logging import print_log

from mmdat.models.utils import CheckpointError, load_checkpoint_file

#: Names mmengine's CheckpointHook gives checkpoints by default.
DEFAULT_TEMPLATES = ('epoch_{}.pth', 'iter_{}.pth')
_TRUST_HINT = ' (if you trust this file, pass --trust-checkpoint)'


def _damage(path: str) -> Optional[str]:
    """Why ``path`` is not a whole file (missing, empty, a zip failing its CRCs), or ``None``.

    The CRC check finds a truncated or overwritten file without unpickling it.
    """
    if not osp.isfile(path):
        return f'Checkpoint file not found: {path}'
    if osp.getsize(path) == 0:
        return f'{path} is not a readable checkpoint: the file is empty'
    if not zipfile.is_zipfile(path):
        with open(path, 'rb') as file:
            if file.read(4) == b'PK\x03\x04':  # begins as a zip, but its end is missing
                return f'{path} is not a readable checkpoint: damaged (a zip file cut short)'
        return None  # the legacy format has no checksums: unpickling it is the check
    try:
        with zipfile.ZipFile(path) as archive:
            broken = archive.testzip()
            if broken is not None:
                return f'{path} is not a readable checkpoint: damaged (corrupt entry {broken})'
            if not any(name.endswith('/data.pkl') or name == 'data.pkl'
                       for name in archive.namelist()):
                return f'{path} is not a readable checkpoint: a zip without data.pkl'
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
        return f'{path} is not a readable checkpoint: damaged (unreadable zip: {error})'
    return None


def _entries_problem(path: str, checkpoint: Mapping, trusted: bool) -> Optional[str]:
    """Why a readable checkpoint cannot be resumed from, or ``None``."""
    meta = checkpoint.get('meta')
    if not (isinstance(meta, Mapping) and 'epoch' in meta and 'iter' in meta
            and 'message_hub' in checkpoint):
        return (f'{path} holds weights only (no meta with the epoch and iteration, or no message '
                'hub): only a checkpoint saved during training can be resumed; to start from '
                f'these weights, use --cfg-options load_from={path}')
    if 'config' in meta and not trusted:
        # mmengine's Runner.resume reads meta['config'] with Config.fromstring, which runs it
        # as Python. mmengine itself saves the config as meta['cfg'].
        return f'{path} holds a config that resuming would run as Python code{_TRUST_HINT}'
    return None


def checkpoint_problem(path: str, trusted: bool = False) -> Optional[str]:
    """Why training cannot resume from ``path``, or ``None`` if it can.

    The file must be whole (see above), readable by :func:`load_checkpoint_file` (the restricted
    reader unless ``trusted``; storages are not read, so this is cheap), and hold what mmengine's
    ``Runner.resume`` reads: ``meta`` with ``epoch`` and ``iter``, and ``message_hub``.

    Args:
        path (str): A local file or a URL.
        trusted (bool): Read it with an unrestricted unpickler (``--trust-checkpoint``).

    Returns:
        str or None: One line naming the file. Only a file refused because of objects it holds
        gets the advice to pass ``--trust-checkpoint``; a damaged file does not.
    """
    if '://' not in path:
        problem = _damage(path)
        if problem is not None:
            return problem
    try:
        checkpoint = load_checkpoint_file(path, map_location='meta', trusted=trusted)
    except (CheckpointError, FileNotFoundError) as error:
        return str(error)
    return _entries_problem(path, checkpoint, trusted)


def _template_pattern(template: str) -> 're.Pattern':
    return re.compile('^' + re.escape(template).replace(r'\{\}', r'(\d+)') + '$')


def list_checkpoints(folder: str, templates=DEFAULT_TEMPLATES) -> List[Tuple[int, str]]:
    """``(step, path)`` of the files in ``folder`` named after ``templates``, newest step first."""
    if not osp.isdir(folder):
        return []
    patterns = [_template_pattern(t) for t in templates]
    found = []
    for name in os.listdir(folder):
        for pattern in patterns:
            match = pattern.match(name)
            if match:
                found.append((int(match[1]), osp.join(folder, name)))
                break
    return sorted(found, key=lambda item: (item[0], osp.getmtime(item[1])), reverse=True)


def find_resume_checkpoint(work_dir: str, checkpoint_dir: Optional[str] = None,
                           templates=DEFAULT_TEMPLATES, trusted: bool = False) -> Optional[str]:
    """The checkpoint ``--resume`` (without a path) resumes from.

    The newest checkpoint that training can resume from (see :func:`checkpoint_problem`; a file
    that ``last_checkpoint`` names under another name is tried first). Each newer file that
    cannot be used is skipped with one warning naming it and why.

    Args:
        work_dir (str): The run's work dir (it holds ``last_checkpoint``).
        checkpoint_dir (str, optional): Where the checkpoints are, if not in ``work_dir``.
        templates (Sequence[str]): Checkpoint names, ``{}`` standing for the step.
        trusted (bool): Read the files with an unrestricted unpickler (``--trust-checkpoint``).

    Returns:
        str or None: ``None`` when the work dir has no checkpoint and no ``last_checkpoint``
        (nothing to resume: training starts from the beginning).

    Raises:
        CheckpointError: Checkpoints or a pointer exist, but none can be resumed from (names them).
    """
    checkpoint_dir = checkpoint_dir or work_dir
    candidates = [path for _, path in list_checkpoints(checkpoint_dir, templates)]
    pointer_file = osp.join(work_dir, 'last_checkpoint')
    pointed = None
    if osp.isfile(pointer_file):
        with open(pointer_file) as file:
            pointed = file.read().strip() or None
        if pointed is not None and osp.isfile(pointed) and osp.abspath(pointed) not in map(
                osp.abspath, candidates):
            candidates.insert(0, pointed)  # a name outside the templates
    problems = []
    for path in candidates:
        problem = checkpoint_problem(path, trusted)
        if problem is None:
            if pointed is not None and osp.abspath(pointed) != osp.abspath(path) and not any(
                    osp.abspath(pointed) == osp.abspath(p) for p, _ in problems):
                print_log(f'--resume: last_checkpoint names {pointed}, but {path} is the newest '
                          'checkpoint to resume from', logger='current', level=logging.WARNING)
            return path
        print_log(f'--resume: skipping {problem}', logger='current', level=logging.WARNING)
        problems.append((path, problem))
    if problems:
        raise CheckpointError(f'--resume: no checkpoint in {checkpoint_dir} to resume from: '
                              + '; '.join(problem for _, problem in problems))
    if osp.isfile(pointer_file):
        raise CheckpointError(f'--resume: {pointer_file} names {pointed or "nothing"}, and no '
                              f'checkpoint is in {checkpoint_dir}')
    return None


def _checkpoint_folder(cfg: Config) -> str:
    """Where the checkpoint hook saves: ``out_dir/<work dir name>`` if set, else the work dir."""
    out_dir = ((cfg.get('default_hooks') or {}).get('checkpoint') or {}).get('out_dir')
    if out_dir:
        return osp.join(out_dir, osp.basename(cfg.work_dir.rstrip('/')))
    return cfg.work_dir


def set_up_resume(cfg: Config, resume: Union[str, bool, None],
                  trusted: bool = False) -> Optional[str]:
    """Set ``cfg.resume``/``cfg.load_from`` for ``tools/train.py --resume [PATH]``.

    The checkpoint is checked here (:func:`checkpoint_problem`), before anything is built.

    Args:
        cfg (Config): The config (its ``work_dir`` set).
        resume (str | bool | None): A checkpoint path; ``True`` for the newest checkpoint of the
            work dir to resume from (see :func:`find_resume_checkpoint`); ``None`` for no
            ``--resume`` (a config with ``resume = True`` resumes from its ``load_from``, or
            without one is treated as ``True``).
        trusted (bool): The user trusts the checkpoint (``--trust-checkpoint``).

    Returns:
        str or None: The checkpoint training resumes from (``None``: from the beginning).

    Raises:
        CheckpointError: The checkpoint cannot be resumed from, or the work dir has checkpoints
            but none to resume from.
    """
    if resume is None:
        if cfg.get('resume') is not True:
            return None
        resume = cfg.get('load_from') or True
    if resume is True:
        hook = (cfg.get('default_hooks') or {}).get('checkpoint') or {}
        templates = (hook['filename_tmpl'], ) if hook.get('filename_tmpl') else DEFAULT_TEMPLATES
        path = find_resume_checkpoint(cfg.work_dir, _checkpoint_folder(cfg), templates, trusted)
        if path is None:
            print_log(f'--resume: no checkpoint in {cfg.work_dir} yet; training starts from the '
                      'beginning', logger='current', level=logging.WARNING)
            cfg.resume, cfg.load_from = False, None
            return None
    else:
        path = resume
        problem = checkpoint_problem(path, trusted)
        if problem is not None:
            raise CheckpointError(f'--resume: {problem}')
    print_log(f'Resuming from {path}', logger='current')
    cfg.resume, cfg.load_from = True, path
    return path
