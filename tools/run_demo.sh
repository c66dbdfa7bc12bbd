#!/usr/bin/env bash
# The embedded demo in one command: sets up .venv if needed (tools/setup_env.sh), then generates
# the shapes dataset, trains and evaluates a DAT detector and segmenter, and draws predictions.
# Arguments are passed to tools/run_demo.py (e.g. --work-dir DIR, --skip-seg).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! .venv/bin/python -c 'import mmdat, mmdet, mmseg, mmcv.ops' 2>/dev/null; then
    echo '==> Setting up the environment first (tools/setup_env.sh)'
    bash tools/setup_env.sh
fi
exec .venv/bin/python tools/run_demo.py "$@"
