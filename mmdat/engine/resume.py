"""Choosing the checkpoint that ``tools/train.py --resume`` resumes from."""
import logging
import os
import os.path as osp
import re
import zipfile
from typing import List, Optional, Tuple

from mmengine.logging import print_log

from mmdat.models.utils import CheckpointError, load_checkpoint_file

#: Names mmengine's CheckpointHook gives checkpoints by default.
DEFAULT_TEMPLATES = ('epoch_{}.pth', 'iter_{}.pth')


def checkpoint_problem(path: str) -> Optional[str]:
    """Why ``path`` is not a complete checkpoint, or ``None`` if it is.

    A zip-format file (what torch and mmengine write) is checked entry by entry against its
    CRCs, which finds a truncated or overwritten file without unpickling it; other files are
    read with :func:`load_checkpoint_file`.
    """
    if not osp.isfile(path):
        return 'no such file'
    if osp.getsize(path) == 0:
        return 'the file is empty'
    if not zipfile.is_zipfile(path):
        try:
            load_checkpoint_file(path)
        except CheckpointError as error:
            return str(error)
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            broken = archive.testzip()
            if broken is not None:
                return f'corrupt entry {broken}'
            if not any(name.endswith('/data.pkl') or name == 'data.pkl'
                       for name in archive.namelist()):
                return 'no data.pkl: not a PyTorch checkpoint'
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
        return f'unreadable zip ({error})'
    return None


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
                           templates=DEFAULT_TEMPLATES) -> Optional[str]:
    """The checkpoint ``--resume`` (without a path) resumes from.

    The complete checkpoint with the highest step (a file that ``last_checkpoint`` names under
    another name is tried first). Incomplete or corrupt newer files are skipped with a warning
    naming them.

    Args:
        work_dir (str): The run's work dir (it holds ``last_checkpoint``).
        checkpoint_dir (str, optional): Where the checkpoints are, if not in ``work_dir``.
        templates (Sequence[str]): Checkpoint names, ``{}`` standing for the step.

    Returns:
        str or None: ``None`` when the work dir has no checkpoint and no ``last_checkpoint``
        (nothing to resume: training starts from the beginning).

    Raises:
        SystemExit: Checkpoints or a pointer exist, but no complete checkpoint (names them).
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
        problem = checkpoint_problem(path)
        if problem is None:
            if problems:
                print_log(f'--resume: skipping {"; ".join(problems)}; resuming from the previous '
                          f'checkpoint {path}', logger='current', level=logging.WARNING)
            if pointed is not None and osp.abspath(pointed) != osp.abspath(path):
                print_log(f'--resume: last_checkpoint names {pointed}, but {path} is the newest '
                          'complete checkpoint', logger='current', level=logging.WARNING)
            return path
        problems.append(f'{path} ({problem})')
    if problems:
        raise SystemExit(f'--resume: no complete checkpoint in {checkpoint_dir}: '
                         + '; '.join(problems))
    if osp.isfile(pointer_file):
        raise SystemExit(f'--resume: {pointer_file} names {pointed or "nothing"}, and no '
                         f'checkpoint is in {checkpoint_dir}')
    return None
