#!/usr/bin/env bash
# One-command set-up of the mmdat development environment: `bash tools/setup_env.sh`.
#
# Creates .venv in the repository root (if absent) and installs torch, mmcv 2.1.0 (with its
# compiled ops), mmengine, mmdet, mmsegmentation, the test requirements and mmdat itself
# (editable). Safe to run again: steps that are already satisfied are skipped.
#
# The torch in the venv (installed before, e.g. a CUDA build, or by step 3) is never replaced:
# every later pip step runs with a constraints file that pins it, and the Triton it brought, to
# the installed versions. A requirement that cannot live with that torch stops pip with a
# conflict instead of downgrading torch.
#
# Environment:
#   PYTHON          base interpreter for the venv (default: python3)
#   PIP_FIND_LINKS  read by pip itself; point it at a folder holding a prebuilt mmcv 2.1.0
#                   wheel matching your torch to skip the ~20 min source build
#   MAX_JOBS        parallel compile jobs for the mmcv source build (default: all cores)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PYTHON="${PYTHON:-python3}"
VENV="$ROOT/.venv"
VPY="$VENV/bin/python"
TORCH_VERSION=2.13.0  # installed only when the venv has no torch at all
MMCV_VERSION=2.1.0    # mmdet 3.3 / mmseg 1.2 assert mmcv<2.2.0

step() { printf '\n==> %s\n' "$*"; }
note() { printf '    %s\n' "$*"; }
pip_install() { "$VPY" -m pip install "$@"; }
py_ok() { "$VPY" -c "$1" >/dev/null 2>&1; }

# --- 1. virtual environment -------------------------------------------------------------
step "[1/6] Virtual environment: $VENV"
if [[ -x "$VPY" ]]; then
    note "exists, reusing it ($("$VPY" -V 2>&1))"
else
    if ! command -v "$PYTHON" >/dev/null 2>&1; then
        echo "error: '$PYTHON' not found; set PYTHON to a Python >= 3.8 interpreter" >&2
        exit 1
    fi
    venv_args=()
    if "$PYTHON" -c 'import torch' >/dev/null 2>&1; then
        note "$PYTHON already has torch $("$PYTHON" -c 'import torch; print(torch.__version__)'):" \
             "creating the venv with --system-site-packages to keep it"
        venv_args+=(--system-site-packages)
    fi
    "$PYTHON" -m venv ${venv_args[@]+"${venv_args[@]}"} "$VENV"
    note "created with $("$VPY" -V 2>&1)"
fi

# --- 2. pip -----------------------------------------------------------------------------
step "[2/6] pip (>=21.3 for editable installs, <25)"
if py_ok 'import sys, pip; v = tuple(int(x) for x in pip.__version__.split(".")[:2]); sys.exit(not (21, 3) <= v < (25, 0))'; then
    note "pip $("$VPY" -c 'import pip; print(pip.__version__)') is fine"
else
    pip_install "pip>=21.3,<25"
fi

# --- 3. torch ---------------------------------------------------------------------------
step "[3/6] torch"
if torch_version=$("$VPY" -c 'import torch; print(torch.__version__)' 2>/dev/null); then
    note "found torch $torch_version, keeping it"
else
    note "no torch in the venv: installing torch==$TORCH_VERSION" \
         "(to use another build, e.g. CUDA, install it into .venv first)"
    pip_install "torch==$TORCH_VERSION"
fi
# Pin what is installed now, local versions (`+cpu`, `+cu121`) included, so that no later step
# can replace torch or swap its build.
CONSTRAINTS="$VENV/mmdat-constraints.txt"
"$VPY" - >"$CONSTRAINTS" <<'PY'
from importlib import metadata
# triton only where it is installed (torch's CUDA builds bring it); where torch brought none,
# requirements/tests.txt adds it.
for name in ('torch', 'triton'):
    try:
        print(f'{name}=={metadata.version(name)}')
    except metadata.PackageNotFoundError:
        pass
PY
note "pinned for every later pip step ($CONSTRAINTS): $(tr '\n' ' ' <"$CONSTRAINTS")"

# --- 4. mmcv with compiled ops ----------------------------------------------------------
MMCV_CHECK="import mmcv, mmcv.ops; assert mmcv.__version__.startswith('${MMCV_VERSION%.*}.'); print(mmcv.__version__)"
step "[4/6] mmcv==$MMCV_VERSION (with ops)"
if mmcv_version=$("$VPY" -c "$MMCV_CHECK" 2>/dev/null); then
    note "mmcv $mmcv_version with working ops found, keeping it"
else
    # mmcv's setup.py imports torch and pkg_resources: build it without build isolation,
    # with torch installed and setuptools<70.
    if ! py_ok 'import sys, setuptools, wheel; sys.exit(int(setuptools.__version__.split(".")[0]) >= 70)'; then
        note "installing setuptools<70 and wheel to build mmcv (pip may report that torch"
        note "wants a newer setuptools: step 5 brings that back once mmcv is installed)"
        pip_install -c "$CONSTRAINTS" "setuptools<70" wheel
    fi
    mmcv_args=(-c "$CONSTRAINTS" --no-build-isolation "mmcv==$MMCV_VERSION")
    if "$VPY" -m pip show mmcv >/dev/null 2>&1; then
        # Installed but unusable (another version, or ops built for another torch):
        # replace it without touching its dependencies (torch above all).
        note "the installed mmcv is not $MMCV_VERSION with working ops: reinstalling it"
        mmcv_args=(--force-reinstall --no-deps --no-cache-dir "${mmcv_args[@]}")
    fi
    note "Without a prebuilt mmcv $MMCV_VERSION wheel for this Python and torch on"
    note "PIP_FIND_LINKS (now: '${PIP_FIND_LINKS:-}'), pip builds mmcv from source:"
    note "about 20 minutes on 2 cores, with no output while it compiles."
    MMCV_WITH_OPS=1 MAX_JOBS="${MAX_JOBS:-$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN)}" \
        "$VPY" -m pip install "${mmcv_args[@]}"
    if ! "$VPY" -c "$MMCV_CHECK" >/dev/null; then
        echo "error: mmcv installed but 'import mmcv.ops' fails (see above). A prebuilt wheel" >&2
        echo "       from PIP_FIND_LINKS must match this exact torch build; unset PIP_FIND_LINKS" >&2
        echo "       and run this script again to build mmcv from source." >&2
        exit 1
    fi
fi

# --- 5. requirements and mmdat itself ---------------------------------------------------
step "[5/6] requirements/*.txt and mmdat (editable)"
pip_install -c "$CONSTRAINTS" \
    -r requirements/mminstall.txt -r requirements/runtime.txt -r requirements/tests.txt
pip_install -c "$CONSTRAINTS" --no-build-isolation -e .

# --- 6. check ---------------------------------------------------------------------------
step "[6/6] Check"
# Run from outside the repository so that the installed (editable) mmdat is imported.
(cd / && "$VPY" -c '
import sys
import mmdat, mmdet, mmseg, mmcv.ops
import mmcv, mmengine, numpy, torch
print(f"    python    {sys.version.split()[0]}")
for mod in (torch, mmcv, mmengine, mmdet, mmseg, numpy, mmdat):
    print(f"    {mod.__name__:<10}{mod.__version__}")
print(f"    CUDA available: {torch.cuda.is_available()}")
')

step "Done. Activate the environment with:  source .venv/bin/activate"
note "Run the tests with:  .venv/bin/python -m pytest tests -n 2 --dist worksteal"
