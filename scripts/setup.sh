#!/usr/bin/env bash
# Set up .venv with the CPU build of torch and lorakit (editable). `bash scripts/setup.sh dev` adds test deps.
# Users with GPUs: TORCH_SPEC="torch==2.13.0" with your index, or install torch first and set TORCH_SPEC="".
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
spec="${TORCH_SPEC-torch==2.13.0}"
[ -z "$spec" ] || .venv/bin/python -m pip install -q --disable-pip-version-check "$spec"
if [ "$extras" = dev ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]"
else
  .venv/bin/python -m pip install -q --disable-pip-version-check -e .
fi
