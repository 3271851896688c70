"""End to end against what users run: `lorakit finetune` vs transformers `Trainer` + PEFT; writes RESULTS-e2e.md.

    .venv/bin/python benchmarks/e2e.py                         # the base variant, 4 sides, 3 repetitions each
    .venv/bin/python benchmarks/e2e.py --variants all          # base, vocab32k and long into one page
    .venv/bin/python benchmarks/e2e.py --quick --out /tmp/e2e.md   # a tiny model, the eager sides (the test)
    .venv/bin/python benchmarks/e2e.py --device cuda --threads 8 --precision bf16

Sides (--sides picks; each in its own fresh subprocess, repetitions interleave in a rotating order):
lk = `lorakit finetune` with its defaults (--loss/--fuse/--compile auto: whatever they resolve to), lk-compile =
the same with --compile on, lk-offload = the same with --offload-activations (CUDA only), hf = Trainer + PEFT
(the usual recipe), hf-compile = the same with TrainingArguments(torch_compile=True).
Variants: base (vocab 4096, max length 256, batch 4), vocab32k (vocab 32000), long (max length 1024, batch 1,
rows of ~1024 tokens, fewer steps) — e2e_variants.py.

Every side gets the same saved model directory (a Llama-style model from a transformers config, random seeded
weights, and a WordLevel tokenizer saved with it), the same JSONL rows (lengths from 3/4 to 5/4 of max length:
about half are truncated and the rest padded to their batch's longest, on both sides), the same LoRA config
(r8, alpha16, dropout 0, q/k/v/o/gate/up/down), batch size, max length, steps, lr (linear schedule, no warmup),
AdamW (weight decay 0), gradient clipping at 1.0, logging every --log-every steps, no evaluation while training,
no checkpoint while training. Peak RSS is each side's process's ru_maxrss from wait4.

Loop time: the wall time from the end of optimizer step --log-every to the end of step --steps (the first
--log-every steps are warm-up and not counted: they hold the compiles). lorakit: the `elapsed_s` of the step rows
in OUT/run/metrics.jsonl. Trainer: a TrainerCallback's `on_step_end` perf_counter. Tokens: the real
(attention-mask) tokens of the counted steps; lorakit's rows carry them as throughput x interval, the Trainer
side counts them in its collator (num_workers 0, one collate per step).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from e2e_report import report  # noqa: E402
from e2e_variants import SIDES, VARIANTS, variant  # noqa: E402
from harness import TARGETS  # noqa: E402
from run import add_model_args  # noqa: E402

HERE = Path(__file__).resolve().parent
FLOORS = {  # what each kind of side imports before it has a model: the resident floor under its peak
    "lk": "import lorakit.cli, lorakit.cli.finetune, lorakit.hf.finetune, lorakit.train",
    "hf": "import datasets, peft, transformers; from transformers import Trainer, AutoModelForCausalLM",
}
SIZE_KEYS = ("hidden", "intermediate", "layers", "heads", "vocab", "rank", "batch", "max_length", "rows", "steps")
SIDE_KEYS = (*SIZE_KEYS, "log_every", "lr", "threads", "device", "precision")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p)  # the benchmark model's size and rank, as every suite takes them
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--rows", type=int, default=400, help="training rows (lengths drawn from max-length/4 to 1.25x)")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--log-every", type=int, default=4, help="both sides log every N steps; the first N are warm-up")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions per side")
    p.add_argument("--threads", type=int, default=1, help="OMP/torch threads of each side's process")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast on both sides")
    p.add_argument("--variant", choices=tuple(VARIANTS), default="base", help="one variant (e2e_variants.py)")
    p.add_argument("--variants", help="'all', or a comma list of variants, run one after another into one page")
    p.add_argument(
        "--sides", help=f"comma list of sides out of {','.join(SIDES)} (default: lk,lk-compile,hf,hf-compile)"
    )
    p.add_argument("--quick", action="store_true", help="a tiny model, few steps, one repetition (for tests)")
    p.add_argument("--out", type=Path, default=HERE / "RESULTS-e2e.md")
    p.add_argument("--hf-side", type=Path, help=argparse.SUPPRESS)  # internal: run the Trainer side on this dir
    p.add_argument("--hf-compile", action="store_true", help=argparse.SUPPRESS)  # internal: ... with torch_compile
    a = p.parse_args(argv)
    a.given = {k for k in SIDE_KEYS if getattr(a, k) != p.get_default(k)}  # what a variant must not override
    a.command = "".join(f" {x}" for x in (sys.argv[1:] if argv is None else argv) if not x.startswith("--hf-"))
    names = a.variants.split(",") if a.variants and a.variants != "all" else None
    a.variant_names = list(VARIANTS) if a.variants == "all" else names or [a.variant]
    unknown = [v for v in a.variant_names if v not in VARIANTS]
    sides = a.sides.split(",") if a.sides else ["lk", "hf"] if a.quick else ["lk", "lk-compile", "hf", "hf-compile"]
    unknown += [s for s in sides if s not in SIDES]
    if unknown:
        p.error(f"unknown variant(s)/side(s) {unknown}: variants {list(VARIANTS)}, sides {list(SIDES)}")
    a.side_keys = sides
    return a


# -- the shared setup: model directory and data ---------------------------------------------------------------


def prepare(a: argparse.Namespace, root: Path) -> tuple[Path, Path, Path]:
    """Save the model + tokenizer to root/model, the rows to root/train.jsonl and 2 rows to root/valid.jsonl."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    words = [f"w{i}" for i in range(a.vocab - len(specials))]
    vocab = {t: i for i, t in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    cfg = LlamaConfig(
        hidden_size=a.hidden,
        intermediate_size=a.intermediate,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.heads,
        vocab_size=a.vocab,
        max_position_embeddings=max(2048, a.max_length),
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    torch.manual_seed(0)
    model_dir = root / "model"
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    fast.save_pretrained(model_dir)
    rng = random.Random(0)

    def row() -> str:  # varied lengths: about half the rows are truncated, the others padded in their batch
        n = rng.randint(max(2, a.max_length * 3 // 4), a.max_length * 5 // 4)
        return json.dumps({"text": " ".join(rng.choice(words) for _ in range(n))})

    train, valid = root / "train.jsonl", root / "valid.jsonl"
    train.write_text("\n".join(row() for _ in range(a.rows)) + "\n")
    valid.write_text("\n".join(row() for _ in range(2)) + "\n")
    return model_dir, train, valid


def side_env(a: argparse.Namespace) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads), TOKENIZERS_PARALLELISM="0")
    src = str(HERE.parent / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


# A small parent between this process and each side: Linux keeps, in a process's peak RSS (ru_maxrss), the
# high-water mark of the memory image it had before exec, and a child forked or vforked from this process
# (which holds torch and the model) would start with ours. Spawned from this small interpreter, it starts near 0.
SPAWN = """import json, os, subprocess, sys
with open(sys.argv[2], "w") as log:
    p = subprocess.Popen(sys.argv[3:], stdout=log, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(p.pid, 0)
with open(sys.argv[1], "w") as f:
    json.dump({"rc": os.waitstatus_to_exitcode(status), "maxrss": usage.ru_maxrss * 1024}, f)
"""


def run_process(cmd: list[str], env: dict[str, str], log: Path) -> tuple[float, int]:
    """Run `cmd` to its end; (wall seconds, peak RSS bytes of that process: ru_maxrss from wait4)."""
    t = time.perf_counter()
    facts = log.with_suffix(".rusage.json")
    subprocess.run([sys.executable, "-S", "-c", SPAWN, str(facts), str(log), *cmd], env=env, check=True)
    wall = time.perf_counter() - t
    r = json.loads(facts.read_text())
    if r["rc"] != 0:
        raise RuntimeError(f"{cmd[:4]} failed ({r['rc']}):\n{log.read_text()[-3000:]}")
    return wall, r["maxrss"]


# -- lorakit: the real CLI ----------------------------------------------------------------------------------


def lorakit_cmd(a: argparse.Namespace, root: Path, out: Path, extra: list[str]) -> list[str]:
    """`python -m lorakit finetune ...` as a user types it, with the side's extra flags."""
    lora = ["--targets", *TARGETS, "--rank", str(a.rank), "--alpha", str(2 * a.rank), "--dropout", "0"]
    train = ["--lr", str(a.lr), "--batch-size", str(a.batch), "--max-length", str(a.max_length)]
    train += ["--schedule", "linear", "--weight-decay", "0", "--device", a.device, "--precision", a.precision]
    data = ["--data", str(root / "train.jsonl"), "--valid", str(root / "valid.jsonl"), "--task", "causal-lm"]
    run = ["--seed", "0", "--log-every", str(a.log_every), "--plain", "--max-steps", str(a.steps)]
    return [sys.executable, "-m", "lorakit", "finetune", "--model", str(root / "model"), *data, "--out", str(out)] + [
        *lora,
        *train,
        *run,
        *extra,
    ]


def run_lorakit(a: argparse.Namespace, root: Path, tag: str, extra: list[str]) -> dict:
    out = root / tag
    wall, rss = run_process(lorakit_cmd(a, root, out, extra), side_env(a), root / f"{tag}.log")
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in rows if r["kind"] == "step"]
    assert steps[0]["throughput_unit"] == "tokens", steps[0]
    counted = [(prev, r) for prev, r in zip(steps, steps[1:], strict=False) if r["step"] > a.log_every]
    warm = next(r for r in steps if r["step"] == a.log_every)["elapsed_s"]
    tokens = sum(round(r["throughput"] * (r["elapsed_s"] - prev["elapsed_s"])) for prev, r in counted)
    r = {"loop_s": steps[-1]["elapsed_s"] - warm, "warmup_s": warm, "tokens": tokens, "rss": rss, "wall_s": wall}
    # compiled runs report their compile time and recompiles in metrics.jsonl (a field of the step rows or a
    # "compile" row: lorakit.train.compile); the last value seen is the run's total
    for key in ("compile_s", "recompiles"):
        seen = [row[key] for row in rows if row.get(key) is not None]
        if seen:
            r[key] = seen[-1]
    config = json.loads((out / "run" / "config.json").read_text()) if (out / "run" / "config.json").is_file() else {}
    r["compiled"] = bool(config.get("train", {}).get("compile"))
    return {**r, "steps": steps[-1]["step"]}


def run_hf(a: argparse.Namespace, root: Path, tag: str, compiled: bool, argv: list[str]) -> dict:
    """The Trainer side in a fresh process (this file with --hf-side): its timings, peak RSS and wall time."""
    log = root / f"{tag}.log"
    cmd = [sys.executable, __file__, *argv, "--hf-side", str(root), *(["--hf-compile"] if compiled else [])]
    wall, rss = run_process(cmd, side_env(a), log)
    line = next(x for x in reversed(log.read_text().splitlines()) if x.startswith('{"loop_s"'))
    return {**json.loads(line), "rss": rss, "wall_s": wall}


def run_side(a: argparse.Namespace, root: Path, key: str, rep: int) -> dict:
    kind, extra = SIDES[key]
    side_argv = [f"--{k.replace('_', '-')}={getattr(a, k)}" for k in SIDE_KEYS]  # this variant's settings
    if kind == "hf":
        return run_hf(a, root, f"{key}-{rep}", extra == ["compile"], side_argv)
    return run_lorakit(a, root, f"{key}-{rep}", extra)


# -- one variant, then the page --------------------------------------------------------------------------------


def run_variant(a: argparse.Namespace) -> dict:
    """Every side of variant `a` (its settings resolved), `a.reps` interleaved repetitions; their results."""
    t0 = time.perf_counter()
    results: dict[str, list[dict]] = {k: [] for k in a.side_keys}
    side_s = dict.fromkeys(a.side_keys, 0.0)
    with tempfile.TemporaryDirectory(prefix="lorakit-e2e-") as tmp:
        root = Path(tmp)
        prepare(a, root)
        for rep in range(a.reps):
            k = rep % len(a.side_keys)
            for key in a.side_keys[k:] + a.side_keys[:k]:  # a rotating order: no side always first
                t = time.perf_counter()
                r = run_side(a, root, key, rep)
                side_s[key] += time.perf_counter() - t
                results[key].append(r)
                print(f"{a.name} rep {rep} {key}: {r}", file=sys.stderr)
        floors = {
            k: run_process([sys.executable, "-c", code], side_env(a), root / f"floor-{k}.log")[1]
            for k, code in FLOORS.items()
        }
    return {"a": a, "results": results, "floors": floors, "seconds": time.perf_counter() - t0, "side_s": side_s}


def main(argv: list[str] | None = None) -> Path:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    if a.hf_side:
        from e2e_hf import hf_side

        hf_side(a, a.hf_side, a.hf_compile)
        return a.hf_side
    load_start, t0 = harness.loadavg(), time.perf_counter()
    runs = []
    for name in a.variant_names:
        runs.append(run_variant(variant(a, name)))
        print(f"variant {name}: {runs[-1]['seconds']:.0f} s", file=sys.stderr)
    text = report(a, runs, load_start, harness.loadavg(), time.perf_counter() - t0)
    a.out.write_text(text)
    print(text)
    return a.out


if __name__ == "__main__":
    main()
