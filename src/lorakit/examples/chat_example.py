"""`lorakit example chat`: the LLM counterpart of `lorakit example`, on a chat model built here (no download).

    1. build a tiny Llama chat model and its tokenizer; pre-train all its weights on the base skill ("next 381")
    2. fine-tune a LoRA adapter on "reverse 381" and 3. another on "sort 381" (the finetune job, its dashboard)
    4. exact-match accuracy on held-out prompts, base vs each adapter (a table)
    5. serve both adapters from one `lorakit serve` process, their requests sent together (one mixed batch),
       answered through the `openai` client: each answer must be the one generated in process
    6. export the "reverse" adapter merged into the base as GGUF (`lorakit export`, proven in llama.cpp) and answer
       through llama.cpp: skipped, with a note, when llama-cpp-python is not installed

Every check that fails makes the run exit non-zero. Artifacts (model, data, adapters, GGUF) go to `out`.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import LoraConfig
from ..errors import LoraError
from ..files.atomic import write_json
from ..hf import finetune, predict
from ..hf import models as hf
from ..train import TrainConfig
from ..train.trainer import Callback
from ..ui.progress import Progress
from ..ui.tables import table, to_text
from . import chat_model, chat_tasks
from .chat_gguf import gguf_step
from .chat_serving import serve_step
from .chat_tasks import ADAPTER_TASKS, BASE_TASK, MAX_NEW_TOKENS, say

MARKER = "example-chat.json"  # written first: an `out` holding it is this example's, safe to clear on a rerun
PARTS = ("base", "data", "adapters", "gguf")
MIN_ACCURACY = 0.5  # what each adapter must reach on its own task's held-out prompts (the base: 0)
# the packages each step imports, and the pip names that install them
NEEDED = {"transformers": "transformers", "tokenizers": "tokenizers", "fastapi": "fastapi", "uvicorn": "uvicorn"}
NEEDED |= {"prometheus_client": "prometheus-client", "openai": "openai"}


@dataclass(frozen=True)
class ChatExampleOptions:
    """The example's knobs (the CLI's flags)."""

    out: Path = Path("artifacts/example-chat")
    seed: int = 0
    pretrain_steps: int = 150
    finetune_steps: int = 300


@dataclass
class Scores:
    """Held-out completions and exact-match accuracy, per model ("base" or an adapter) and per task."""

    completions: dict[str, dict[str, list[str]]]
    accuracy: dict[str, dict[str, float]]


def missing_packages() -> list[str]:
    """The pip names of the packages this example needs that are not installed."""
    return [pip for module, pip in NEEDED.items() if importlib.util.find_spec(module) is None]


def run(opts: ChatExampleOptions) -> int:
    """The whole example; returns the process exit status (0: every check passed, 2: it cannot start)."""
    missing = missing_packages()
    if missing:
        print(
            f"lorakit example chat needs {', '.join(missing)}: {sys.executable} -m pip install {' '.join(missing)}",
            file=sys.stderr,
        )
        return 2
    out = Path(opts.out)
    try:
        _claim(out)
    except LoraError as e:
        print(f"lorakit example chat: {e}", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    torch.set_num_threads(1)  # ops this small only pay for thread hand-offs, more so on a busy machine
    ok = _steps(opts, out)
    say(
        f"{'all checks passed' if ok else 'SOME CHECKS FAILED'} in {time.perf_counter() - t_start:.1f}s; "
        f"artifacts: {out}"
    )
    return 0 if ok else 1


def _claim(out: Path) -> None:
    """Make `out` this example's: new, empty, or an earlier run of it (whose parts are removed); else refuse."""
    if out.exists() and not out.is_dir():
        raise LoraError(f"--out {out} is a file; expected a new or empty directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise LoraError(f"--out {out} holds files that are not this example's; choose a new or empty --out")
    for part in PARTS:
        shutil.rmtree(out / part, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / MARKER, {"example": "lorakit example chat", "parts": list(PARTS)})


def _steps(opts: ChatExampleOptions, out: Path) -> bool:
    """Steps 1 to 6; True when every check passed."""
    split = chat_tasks.split(opts.seed)
    base = _base(opts, out, split)
    adapters = {task: _finetune(task, opts, out, base, split) for task in ADAPTER_TASKS}
    scores = _score(base, adapters, split.held_out)
    ok = _report(scores)
    ok = serve_step(base, adapters, split.held_out, scores.completions) and ok
    task = ADAPTER_TASKS[0]
    return gguf_step(base, task, adapters[task], split.held_out, scores.completions[task][task], out) and ok


def _reporter(title: str) -> Callback:
    """The live dashboard on a terminal, plain log lines when stdout is piped."""
    from ..train.dashboard import Dashboard
    from ..train.reporting import PlainLog

    return Dashboard(title=title) if sys.stdout.isatty() else PlainLog()


def _base(opts: ChatExampleOptions, out: Path, split: chat_tasks.Split) -> Path:
    """Step 1: the base chat model, built and pre-trained on its skill, saved to out/base."""
    base = out / "base"
    say(f"[1/6] build a tiny Llama chat model (hidden {chat_model.HIDDEN}, {chat_model.LAYERS} layers) and its")
    say(
        f"      tokenizer; pre-train all its weights on its skill, '{chat_tasks.prompt(BASE_TASK, '381')}' → "
        f"'{chat_tasks.answer(BASE_TASK, '381')}', {opts.pretrain_steps} steps"
    )
    chat_model.build_chat_model(base, chat_tasks.corpus(), seed=opts.seed)
    rows = chat_tasks.write_rows(out / "data" / f"{BASE_TASK}.jsonl", BASE_TASK, split.train)
    config = TrainConfig(
        max_steps=opts.pretrain_steps,
        lr=3e-3,
        schedule="cosine",
        warmup_steps=10,
        device="cpu",
        seed=opts.seed,
        log_every=50,
    )
    t = time.perf_counter()
    loss = chat_model.pretrain(base, rows, config, [_reporter("lorakit example chat · the base model")], Progress())
    say(f"      base model: {base} (valid loss {loss:.3f}, {time.perf_counter() - t:.1f}s)")
    return base


def _finetune(task: str, opts: ChatExampleOptions, out: Path, base: Path, split: chat_tasks.Split) -> Path:
    """Steps 2 and 3: a LoRA adapter of `base` fine-tuned on `task` (the finetune job), saved to out/adapters/TASK."""
    step = 2 + ADAPTER_TASKS.index(task)
    data = out / "data"
    job = finetune.FinetuneJob(
        model=base,
        data=chat_tasks.write_rows(data / f"{task}-train.jsonl", task, split.train),
        valid=chat_tasks.write_rows(data / f"{task}-valid.jsonl", task, split.valid),
        task="causal-lm",
        out=out / "adapters" / task,
        lora=LoraConfig(rank=8, alpha=16.0),
        targets=("all-linear",),
        batch_size=32,
        max_length=32,
        train=TrainConfig(
            max_steps=opts.finetune_steps,
            lr=1e-2,
            schedule="cosine",
            warmup_steps=20,
            device="cpu",
            seed=opts.seed,
            log_every=50,
        ),
    )
    say(
        f"[{step}/6] LoRA fine-tune '{task}' ('{chat_tasks.prompt(task, '381')}' → '{chat_tasks.answer(task, '381')}'):"
        f" rank {job.lora.rank}, alpha {job.lora.alpha:g}, all linear layers, {opts.finetune_steps} steps"
    )
    setup = finetune.prepare(job, progress=Progress())
    report = finetune.run(setup, callbacks=[_reporter(f"lorakit example chat · adapter '{task}'")])
    say(
        f"      adapter: {job.out} (valid loss {report['before']['loss']:.3f} → {report['after']['loss']:.3f}, "
        f"{report['trainable_params']:,} of {report['total_params']:,} parameters trained, {report['elapsed_s']:.1f}s)"
    )
    return Path(job.out)


def _complete(model_dir: Path, adapter: Path | None, held_out: Sequence[str]) -> dict[str, list[str]]:
    """Greedy completions of every task's held-out prompts by the base, or the base with `adapter`."""
    if adapter is None:
        model, tok = hf.load(model_dir, "causal-lm")
    else:
        model, tok, _ = hf.load_with_adapter(model_dir, adapter, task="causal-lm")
    done = {}
    for task in (BASE_TASK, *ADAPTER_TASKS):
        requests = [
            predict.Request(i, predict.render_chat(tok, chat_tasks.messages(task, x)), chat=True)
            for i, x in enumerate(held_out)
        ]
        done[task] = predict.complete(model, tok, requests, max_new_tokens=MAX_NEW_TOKENS, batch_size=50)
    return done


def _score(base: Path, adapters: dict[str, Path], held_out: Sequence[str]) -> Scores:
    """Step 4's numbers: every model's completions of every task's held-out prompts, and their accuracy."""
    models: dict[str, Path | None] = {"base": None, **adapters}
    completions = {name: _complete(base, adapter, held_out) for name, adapter in models.items()}
    accuracy = {
        name: {task: chat_tasks.exact_match(done[task], task, held_out) for task in done}
        for name, done in completions.items()
    }
    return Scores(completions, accuracy)


def _report(scores: Scores) -> bool:
    """Step 4: the accuracy table; True when each adapter reaches MIN_ACCURACY on its task and beats the base."""
    tasks = (BASE_TASK, *ADAPTER_TASKS)
    n = len(next(iter(scores.completions["base"].values())))
    say(f"[4/6] exact-match accuracy on {n} held-out prompts per task (greedy; never trained on):")
    grid = table("model", *tasks, right=tasks)
    for name, acc in scores.accuracy.items():
        grid.add_row(name if name == "base" else f"+ {name}", *(f"{100 * acc[t]:.0f}%" for t in tasks))
    for line in to_text(grid).splitlines():
        say(f"      {line}")
    ok = True
    for task in ADAPTER_TASKS:
        got, base = scores.accuracy[task][task], scores.accuracy["base"][task]
        good = got >= MIN_ACCURACY and got > base
        ok = ok and good
        say(
            f"      '{task}': base {100 * base:.0f}% → adapter {100 * got:.0f}% "
            + ("ok" if good else f"FAILED: expected at least {100 * MIN_ACCURACY:.0f}% and above the base")
        )
    return ok
