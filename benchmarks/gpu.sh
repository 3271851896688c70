#!/usr/bin/env bash
# The benchmark suite on CUDA, in under 8 minutes on one data-centre GPU; writes benchmarks/RESULTS-gpu.md
# (and scale-gpu-*.png). Run it only where a GPU is lent:  bash benchmarks/gpu.sh
# Parts: run.py (lorakit vs PEFT vs the cost floor), adapters.py (multi-adapter serving), e2e.py (lorakit finetune
# vs Trainer + PEFT, 2 repetitions a side), scale.py (curves) and serve.py (the engine and a `lorakit serve
# --device cuda` subprocess; llama-server off: its build here is CPU-only). The CPU-only suites (distributed: gloo,
# checkpointing, variants) stay in all.sh.
# GPU_SH_DRY=1 prints each command instead of running it (tests/test_benchmarks.py checks every flag parses).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
DEV="${DEVICE:-cuda}"
step() {  # step NAME SCRIPT ARGS...: run one suite into its own part of the page
  local name="$1"; shift
  if [[ -n "${GPU_SH_DRY:-}" ]]; then echo "$PY $*"; return; fi
  local t0=$SECONDS
  echo "== $name" >&2
  "$PY" "$@" >"benchmarks/.gpu-$name.log" 2>&1 || { tail -40 "benchmarks/.gpu-$name.log" >&2; exit 1; }
  echo "   $name: $((SECONDS - t0)) s" >&2
}
step run benchmarks/run.py --device "$DEV" --threads 8 --rounds 15 --out benchmarks/.gpu-run.md
step adapters benchmarks/adapters.py --device "$DEV" --threads 8 --out benchmarks/.gpu-adapters.md
step e2e benchmarks/e2e.py --device "$DEV" --threads 8 --reps 2 --steps 60 --log-every 10 --out benchmarks/.gpu-e2e.md
step scale benchmarks/scale.py --device "$DEV" --threads 8 --rounds 5 --plots scale-gpu --out benchmarks/.gpu-scale.md
step serve benchmarks/serve.py --device "$DEV" --threads 8 --rounds 2 --llama-server off --out benchmarks/.gpu-serve.md
[[ -n "${GPU_SH_DRY:-}" ]] && exit 0
{
  echo "# The suite on CUDA"
  echo
  echo "Command: \`bash benchmarks/gpu.sh\` (each part below keeps its own heading, command and machine line)."
  for part in run adapters e2e scale serve; do
    echo
    sed 's/^#/##/' "benchmarks/.gpu-$part.md"  # each part's headings one level down
  done
} > benchmarks/RESULTS-gpu.md.tmp
mv benchmarks/RESULTS-gpu.md.tmp benchmarks/RESULTS-gpu.md
rm -f benchmarks/.gpu-*.md benchmarks/.gpu-*.log
echo "wrote benchmarks/RESULTS-gpu.md"
