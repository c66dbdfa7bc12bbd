#!/usr/bin/env bash
# GPU check in one call: the real-size GPU tests of the fused deformable kernel and of the tiled
# neighborhood attention, then the GPU benchmark tables (fused vs sdpa vs reference: DAT-T and
# DAT-T++ backbones at 800x1333, batch 2, bf16, inference and training step, with peak memory;
# the deformable op alone against SDPA without bias), all in one Markdown report.
#
# Needs only torch (with CUDA), triton, einops and mmengine; downloads nothing. pytest runs the
# tests; where it is not installed, pass --wheels DIR with its wheels, made beforehand on a
# machine with a network (`pip download pytest -d DIR`): they are installed into a temporary
# folder with `pip --no-index`, nothing else is touched. Without pytest the report says that
# the tests did not run, and the tables are still made.
#
# Each step has a time limit (tests 150 s, backbone table 240 s, op table 60 s), so the whole
# check ends within 8 minutes; a step over its limit is reported as such, with its output so far.
#
# Usage (from anywhere; runs in the repository root):
#   tools/analysis_tools/gpu_check.sh [--out gpu_report.md] [--wheels DIR] [--dry-run]
# --dry-run runs every step on CPU at tiny sizes (64x64, batch 1, one step, in this process),
# to check the script itself where no GPU is at hand; the Triton kernels (what 'fused' runs in
# bfloat16 on a GPU) then run in Triton's CPU interpreter.
set -uo pipefail

out=gpu_report.md
wheels=
dry_run=0
while [ $# -gt 0 ]; do
    case "$1" in
        --out) out=${2:?--out needs a file}; shift 2 ;;
        --wheels) wheels=${2:?--wheels needs a folder}; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
out_dir=$(dirname -- "$out")
if [ ! -d "$out_dir" ]; then
    echo "gpu_check.sh: --out: the folder $out_dir does not exist" >&2; exit 2
fi
out=$(cd -- "$out_dir" && pwd)/$(basename -- "$out")
if [ -n "$wheels" ] && [ ! -d "$wheels" ]; then
    echo "gpu_check.sh: --wheels: $wheels is not a folder" >&2; exit 2
fi
[ -n "$wheels" ] && wheels=$(cd -- "$wheels" && pwd)

cd "$(dirname -- "$0")/../.." || exit 2
python=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1  # never reach for a network
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if [ "$dry_run" = 1 ]; then
    export TRITON_INTERPRET=1  # no CPU kernel takes bfloat16: 'fused' runs the Triton kernel, interpreted
    bench=(--device cpu --sizes 64 --batch 1 --amp bf16 --warmup 0 --repeats 1 --no-isolate --threads 1)
    limits=(300 300 120)
    mode="dry run on CPU at tiny sizes: checks the script, measures nothing"
else
    if ! "$python" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
        echo 'gpu_check.sh: CUDA is not available (use --dry-run to check the script on CPU)' >&2; exit 2
    fi
    # in one process per table (startup and Triton compilation once); CUDA memory is per cell
    bench=(--device cuda --sizes 800x1333 --batch 2 --amp bf16 --warmup 2 --repeats 5 --no-isolate)
    limits=(150 240 60)
    mode="GPU run"
fi
start=$(date +%s)

# step NAME LIMIT COMMAND...: runs it with a time limit, its output in $work/NAME.log
status=()
step() {
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    timeout "$limit" "$@" >"$work/$name.log" 2>&1
    local rc=$?
    if [ $rc = 0 ]; then status+=("$name: ok")
    elif [ $rc = 124 ]; then status+=("$name: TIMED OUT after ${limit}s")
    else status+=("$name: FAILED (exit code $rc)"); fi
    echo "   ${status[-1]}"
}

# pytest, from the given wheels if it is not installed
if ! "$python" -c 'import pytest' 2>/dev/null && [ -n "$wheels" ]; then
    "$python" -m pip install --no-index --find-links "$wheels" --target "$work/site" pytest >"$work/pip.log" 2>&1 \
        && export PYTHONPATH="$PYTHONPATH:$work/site"
fi
if "$python" -c 'import pytest' 2>/dev/null; then
    step tests "${limits[0]}" "$python" -m pytest -v -p no:cacheprovider -k on_gpu \
        tests/test_models/test_layers/test_triton_deformable.py \
        tests/test_models/test_layers/test_neighborhood_attention.py \
        tests/test_models/test_layers/test_mlp.py
else
    status+=("tests: NOT RUN: pytest is not installed (pass --wheels DIR; see the top of this script)")
    echo "   ${status[-1]}"
fi
step backbone "${limits[1]}" "$python" tools/analysis_tools/benchmark.py "${bench[@]}" \
    --archs tiny tiny++ --paths reference sdpa fused --out "$work/backbone.md"
step op "${limits[2]}" "$python" tools/analysis_tools/benchmark.py --op "${bench[@]}" \
    --archs tiny --paths reference sdpa fused sdpa-no-bias --out "$work/op.md"

# The report: what ran and how it ended, then each step's table or output.
section() {  # section NAME TITLE TABLE_FILE
    local name=$1 title=$2 table=${3:-}
    echo
    echo "## $title"
    echo
    if [ -n "$table" ] && [ -s "$table" ]; then
        cat "$table"
    elif [ -s "$work/$name.log" ]; then
        echo '```'
        tail -n 60 "$work/$name.log"
        echo '```'
    else
        echo 'Not run.'
    fi
}
{
    echo "# GPU check ($mode)"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), $(( $(date +%s) - start )) s in all; commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)."
    echo
    echo '```'
    "$python" - <<'EOF' 2>&1
import torch
print('torch', torch.__version__, '| CUDA', torch.version.cuda,
      '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')
try:
    import triton
    print('triton', triton.__version__)
except ImportError:
    print('triton: not installed')
EOF
    echo '```'
    echo
    for line in "${status[@]}"; do echo "- $line"; done
    section tests 'Real-size GPU tests (pytest -k on_gpu)'
    section backbone 'Backbones: DAT-T and DAT-T++, fused vs sdpa vs reference' "$work/backbone.md"
    section op 'The deformable op alone (DAT-T stage 3) against SDPA without bias' "$work/op.md"
} >"$out"
echo "Report written to $out"
case "${status[*]}" in *FAILED*|*TIMED*) exit 1 ;; esac
exit 0
