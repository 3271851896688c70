"""Step 6 of `lorakit example chat`: one adapter merged into the base and exported as llama.cpp GGUF by
`lorakit export` (which proves the file in llama.cpp), then asked the held-out prompts through llama.cpp itself.

llama.cpp comes from llama-cpp-python, a source build of several minutes: without it the step says so and is
skipped (the run does not fail for it). Each llama.cpp answer must be the one the adapter gave in process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from . import chat_tasks
from .chat_tasks import MAX_NEW_TOKENS, say

ASKED = 8  # held-out prompts asked through llama.cpp
EXPORT_TIMEOUT_S = 300


def gguf_step(
    base: Path, task: str, adapter: Path, held_out: Sequence[str], expected: Sequence[str], out: Path
) -> bool:
    """Step 6; True when it was skipped (no llama.cpp), or the export is proven and llama.cpp answers as expected."""
    missing = [
        pip
        for module, pip in (("gguf", "gguf"), ("llama_cpp", "llama-cpp-python"))
        if importlib.util.find_spec(module) is None
    ]
    if missing:
        say(
            f"[6/6] GGUF export and llama.cpp: skipped, {' and '.join(missing)} not installed "
            f"({sys.executable} -m pip install {' '.join(missing)}, or `bash scripts/setup.sh dev`)"
        )
        return True
    target = out / "gguf"
    say(f"[6/6] export '{task}' merged into the base as GGUF (`lorakit export`, proven in llama.cpp); ask llama.cpp")
    if not _export(base, adapter, target, held_out[0], task):
        return False
    gguf_file = next(target.glob("*.gguf"))
    got = _llama_answers(gguf_file, base, task, held_out[:ASKED])
    same = [g.strip() == w.strip() for g, w in zip(got, expected[:ASKED], strict=True)]
    right = chat_tasks.exact_match(got, task, held_out[:ASKED])
    say(
        f"      llama.cpp ({gguf_file.name}): e.g. {chat_tasks.prompt(task, held_out[0])!r} → {got[0]!r}; "
        f"{sum(same)}/{len(same)} answers as in process, {100 * right:.0f}% right " + ("ok" if all(same) else "FAILED")
    )
    return all(same)


def _export(base: Path, adapter: Path, target: Path, x: str, task: str) -> bool:
    """`lorakit export --format gguf` in a subprocess, its proof on a chat prompt of the task; True when proven."""
    from ..hf import models as hf
    from ..hf import predict

    tok = hf.load_tokenizer(base)
    text = predict.render_chat(tok, chat_tasks.messages(task, x)) + chat_tasks.answer(task, x)
    cmd = [sys.executable, "-m", "lorakit", "export", "--model", str(base), "--adapter", str(adapter)]
    cmd += ["--format", "gguf", "--dtype", "f32", "--out", str(target), "--text", text]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=EXPORT_TIMEOUT_S)
    for line in proc.stdout.splitlines():
        if line.startswith(("proof:", "exported")):
            say(f"      {line}")
    proof = target / "proof.json"
    passed = proc.returncode == 0 and proof.is_file() and bool(json.loads(proof.read_text()).get("passed"))
    if not passed:
        say(f"      FAILED: lorakit export exited {proc.returncode}: {(proc.stdout + proc.stderr)[-1500:]}")
    return passed


def _llama_answers(gguf_file: Path, base: Path, task: str, strings: Sequence[str]) -> list[str]:
    """llama.cpp's greedy answers to the task's prompts, the chat template rendered as in process."""
    import llama_cpp

    from ..hf import models as hf
    from ..hf import predict

    tok = hf.load_tokenizer(base)
    llm = llama_cpp.Llama(model_path=str(gguf_file), n_ctx=64, n_threads=1, verbose=False)
    answers = []
    for x in strings:
        ids = tok(predict.render_chat(tok, chat_tasks.messages(task, x)), add_special_tokens=False)["input_ids"]
        reply = llm.create_completion(list(ids), max_tokens=MAX_NEW_TOKENS, temperature=0.0)
        answers.append(str(reply["choices"][0]["text"]))  # type: ignore[index]
    return answers
