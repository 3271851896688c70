#!/usr/bin/env bash
# Set up .venv with the CPU build of torch and lorakit (editable). `bash scripts/setup.sh dev` adds test deps.
# Users with GPUs: TORCH_SPEC="torch==2.13.0" with your index, or install torch first and set TORCH_SPEC="".
# CI's wheel check: `VENV=/tmp/x bash scripts/setup.sh dist/lorakit-*.whl` installs a built wheel instead.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
PY="${PYTHON:-python3}"
venv="${VENV:-.venv}"
[ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
spec="${TORCH_SPEC-torch==2.13.0}"
[ -z "$spec" ] || "${pip[@]}" "$spec"
case "$extras" in
  dev) "${pip[@]}" -e ".[dev]" ;;
  *.whl) "${pip[@]}" "$extras" ;;
  *) "${pip[@]}" -e . ;;
esac
