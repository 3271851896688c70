#!/usr/bin/env bash
# The benchmark suite on CUDA, in under 8 minutes on one data-centre GPU; writes benchmarks/RESULTS-gpu.md
# (and scale-gpu-*.png). Run it only where a GPU is lent:  bash benchmarks/gpu.sh
# Parts: run.py (lorakit vs PEFT vs the cost floor), adapters.py (multi-adapter serving), e2e.py (lorakit finetune,
# default and --compile on, vs Trainer + PEFT, default and torch_compile=True; bf16 autocast, SDPA attention
# (transformers' default); variants base, vocab32k and long; 2 repetitions a side), e2e-offload (the long variant,
# lorakit with and without --offload-activations), scale.py (curves) and serve.py (the engine and a `lorakit serve
# --device cuda` subprocess; llama-server off: its build here is CPU-only). The CPU-only suites (distributed: gloo,
# checkpointing, variants) stay in all.sh. After the e2e parts the ratio tables are printed to stdout.
# GPU_SH_DRY=1 prints each command instead of running it (tests/test_benchmarks.py checks every flag parses).
# GPU_SH_PARTS="e2e e2e-offload" runs only those parts (and writes the page from them).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
DEV="${DEVICE:-cuda}"
PARTS="${GPU_SH_PARTS:-run adapters e2e e2e-offload scale serve}"
step() {  # step NAME SCRIPT ARGS...: run one suite into its own part of the page
  local name="$1"; shift
  [[ " $PARTS " == *" $name "* ]] || return 0
  if [[ -n "${GPU_SH_DRY:-}" ]]; then echo "$PY $*"; return; fi
  local t0=$SECONDS
  echo "== $name" >&2
  "$PY" "$@" >"benchmarks/.gpu-$name.log" 2>&1 || { tail -40 "benchmarks/.gpu-$name.log" >&2; exit 1; }
  echo "   $name: $((SECONDS - t0)) s" >&2
}
step run benchmarks/run.py --device "$DEV" --threads 8 --rounds 15 --out benchmarks/.gpu-run.md
step adapters benchmarks/adapters.py --device "$DEV" --threads 8 --out benchmarks/.gpu-adapters.md
E2E=(--device "$DEV" --threads 8 --precision bf16 --reps 2 --steps 40 --log-every 10)
step e2e benchmarks/e2e.py "${E2E[@]}" --variants all --out benchmarks/.gpu-e2e.md
step e2e-offload benchmarks/e2e.py "${E2E[@]}" --variant long --sides lk,lk-offload --out benchmarks/.gpu-e2e-offload.md
step scale benchmarks/scale.py --device "$DEV" --threads 8 --rounds 5 --plots scale-gpu --out benchmarks/.gpu-scale.md
step serve benchmarks/serve.py --device "$DEV" --threads 8 --rounds 2 --llama-server off --out benchmarks/.gpu-serve.md
[[ -n "${GPU_SH_DRY:-}" ]] && exit 0
for part in e2e e2e-offload; do  # the ratio tables (targets, and each variant's same-repetition ratios)
  [[ -f "benchmarks/.gpu-$part.md" ]] && grep -E '^(## |\| (target|[a-z0-9]+: |lorakit|Trainer|ratio))' "benchmarks/.gpu-$part.md"
done
{
  echo "# The suite on CUDA"
  echo
  echo "Command: \`bash benchmarks/gpu.sh\` (each part below keeps its own heading, command and machine line)."
  for part in run adapters e2e e2e-offload scale serve; do
    [[ -f "benchmarks/.gpu-$part.md" ]] || continue
    echo
    sed 's/^#/##/' "benchmarks/.gpu-$part.md"  # each part's headings one level down
  done
} > benchmarks/RESULTS-gpu.md.tmp
mv benchmarks/RESULTS-gpu.md.tmp benchmarks/RESULTS-gpu.md
rm -f benchmarks/.gpu-*.md benchmarks/.gpu-*.log
echo "wrote benchmarks/RESULTS-gpu.md"
