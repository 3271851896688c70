#!/usr/bin/env bash
# Every benchmark suite, one after the other (about 35 minutes on 2 CPU cores); each writes its own page:
#   RESULTS.md (lorakit vs PEFT vs the cost floor), RESULTS-adapters.md, RESULTS-variants.md, RESULTS-distributed.md,
#   RESULTS-checkpointing.md (gradient checkpointing and packing, about 2 minutes),
#   RESULTS-serve.md (lorakit serve against llama.cpp's llama-server, about 13 minutes; llama-server is built once,
#   8+ minutes, by scripts/build_llama_server.sh),
#   RESULTS-e2e.md (lorakit finetune vs Trainer + PEFT), RESULTS-scale.md (+ scale-*.png), RESULTS-export.md,
#   RESULTS-moe.md (LoRA on MoE experts vs PEFT target_parameters, about 8 minutes), RESULTS-moe-mixed.md,
#   RESULTS-preference.md (DPO and GRPO against TRL + PEFT, about 5 minutes),
#   round 3's pages: RESULTS-step.md (the fast path against the uncompiled frozen bound, 1 minute),
#   RESULTS-e2e-variants.md (32k vocabulary and 1024-token rows, 7 minutes), RESULTS-chunked-ce.md, RESULTS-fused.md,
#   RESULTS-compiled.md, RESULTS-cpu-choices.md
# (RESULTS-qlora.md and RESULTS-fingerprint.md are written by hand from variants.py --profile and fingerprint.py.)
# Extra arguments go to run.py (e.g. --device cuda).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
machine() { "$PY" -c "import sys; sys.path.insert(0, 'benchmarks'); import harness; print(harness.machine('cpu', 1))"; }
"$PY" benchmarks/run.py "$@"
"$PY" benchmarks/run.py --cases step --out benchmarks/RESULTS-step.md "$@"
"$PY" benchmarks/adapters.py
{
  echo "# LoRA variants: DoRA and QLoRA against plain LoRA"
  echo
  echo "Command: \`python benchmarks/variants.py --threads 1\`"
  echo
  echo "Machine: $(machine)."
  echo
  # torchao writes its native-library warnings to stdout: kept out of the page
  "$PY" benchmarks/variants.py --threads 1 2>benchmarks/variants.log | grep -v -E '^(Failed to load|W[0-9]{4} )'
} > benchmarks/RESULTS-variants.md.tmp  # a failing suite stops here (set -e), its stderr kept in the .log
mv benchmarks/RESULTS-variants.md.tmp benchmarks/RESULTS-variants.md
{
  echo "# Distributed training on CPU: 1 process against 2 ranks (torchrun, gloo)"
  echo
  echo "Command: \`python benchmarks/distributed.py\`"
  echo
  echo "Machine: $(machine)."
  echo
  "$PY" benchmarks/distributed.py 2>benchmarks/distributed.log
} > benchmarks/RESULTS-distributed.md.tmp
mv benchmarks/RESULTS-distributed.md.tmp benchmarks/RESULTS-distributed.md
"$PY" benchmarks/checkpointing.py 2>benchmarks/checkpointing.log
"$PY" benchmarks/chunked_ce.py 2>benchmarks/chunked_ce.log
"$PY" benchmarks/serve.py 2>benchmarks/serve.log
# end to end against Trainer + PEFT (about 7 + 7 minutes), scale curves (about 3 minutes), every export (1 minute)
"$PY" benchmarks/e2e.py --variants base --reps 2 2>benchmarks/e2e.log
"$PY" benchmarks/e2e.py --variants vocab32k,long --reps 2 --sides lk,hf --out benchmarks/RESULTS-e2e-variants.md \
  2>benchmarks/e2e-variants.log
"$PY" benchmarks/fused.py --clock cpu 2>benchmarks/fused.log
"$PY" benchmarks/compiled.py 2>benchmarks/compiled.log
"$PY" benchmarks/cpu_choices.py --rounds 3 --threads 1 2>benchmarks/cpu_choices.log
"$PY" benchmarks/scale.py 2>benchmarks/scale.log
"$PY" benchmarks/export.py 2>benchmarks/export.log
"$PY" benchmarks/moe.py 2>benchmarks/moe.log
"$PY" benchmarks/moe_mixed.py 2>benchmarks/moe_mixed.log
"$PY" benchmarks/preference.py 2>benchmarks/preference.log
echo "wrote benchmarks/RESULTS*.md"
