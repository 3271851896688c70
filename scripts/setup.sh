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

# llama-cpp-python (the runtime of the GGUF export's proof) builds llama.cpp from source: ~8 minutes on 2 cores.
# It is built for any x86-64 with AVX2 (GGML_NATIVE=OFF), not for this machine's CPU, and kept in a wheel cache
# of its own: pip's shared cache does not key wheels by CPU, and a build using this CPU's AVX-512 would die with
# SIGILL on one without. A second set-up on any machine sharing that cache then takes seconds.
llama_cpp() {
  "$venv/bin/python" -c 'import llama_cpp' 2>/dev/null && return 0
  echo "setup: building llama-cpp-python (portable, ~8 minutes the first time; cached in $LLAMA_CACHE)" >&2
  CMAKE_ARGS="-DGGML_NATIVE=OFF ${CMAKE_ARGS:-}" PIP_CACHE_DIR="$LLAMA_CACHE" "${pip[@]}" "llama-cpp-python==0.3.36"
}
LLAMA_CACHE="${LORAKIT_LLAMA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lorakit/llama-cpp-portable}"

# PEFT 0.18.1, the last PEFT writing the pre-0.19 layout of expert (target_parameters) adapters, for the tests that
# load one (tests/_peft018.py): beside site-packages, never on the venv's import path; a test's child Python puts it
# first on its PYTHONPATH. --no-deps: it runs on the venv's own torch and transformers.
peft018() {
  [ -f "$venv/peft018/peft/__init__.py" ] || "${pip[@]}" --no-deps --target "$venv/peft018" "peft==0.18.1"
}

case "$extras" in
  dev) "${pip[@]}" -e ".[dev]" && llama_cpp && peft018 ;;
  *.whl) "${pip[@]}" "$extras" ;;
  *) "${pip[@]}" -e . ;;
esac
