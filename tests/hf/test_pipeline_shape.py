"""hf/'s data is one pipeline: its stage files import one way (a stage never imports a later one), and a
finetune job's data, followed from `finetune.prepare` to the first batch, enters each data file once."""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))
import _hf_models  # noqa: E402

pytest.importorskip("transformers")

import lorakit  # noqa: E402
from lorakit.hf import finetune  # noqa: E402
from lorakit.train import TrainConfig  # noqa: E402

HF = Path(lorakit.__file__).parent / "hf"
# the data stages in the order data.prepare runs them; data.py is the pipeline that calls them
STAGES = (
    "rows",
    "prepared",
    "templates",
    "sources",
    "preference_rows",
    "examples",
    "chat",
    "preference_encoding",
    "encoding",
    "ondisk",
    "batches",
    "preference_batches",
    "packing",
    "data",
)
# shared names a stage may read (models.TASKS), not a stage of the data; messages.py checks the message lists of
# chat rows and of preference rows, a helper that both parse stages call for each such row
LEAVES = ("models", "messages")
# what data.prepare calls in turn (each may call the stages it imports), then packing at the first batch
PIPELINE = ("data", "templates", "sources", "examples", "encoding", "packing")
# the job checks its paths and loads the tokenizer before its data, and the model after it, resolving its speed
# settings against the model (speed.py and what it asks: causal_loss.py, fuse.py)
MODEL_FILES = ("models.py", "task_fit.py", "finetune_checks.py", "speed.py", "causal_loss.py", "fuse.py")
# called by a stage row by row (LEAVES); fuse.py's modules are the model's own forward once fused (a stage that
# runs the model, as packing does, runs them as it runs transformers' modeling code)
LEAF_FILES = ("messages.py", "fuse.py")


def _hf_imports(path: Path) -> set[str]:
    """The hf/ modules that the file at `path` imports, anywhere in its body (`from . import x`, `from .x import`)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found.update([node.module] if node.module else [a.name for a in node.names])
    return found


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_imports_only_the_stages_before_it(stage):
    allowed = set(STAGES[: STAGES.index(stage)]) | set(LEAVES)
    later = _hf_imports(HF / f"{stage}.py") - allowed
    assert not later, f"hf/{stage}.py imports {sorted(later)}: a stage imports only the stages before it"


def _entries(run) -> list[str]:
    """The hf/ files entered while `run()` runs, in order: a Python call (or a generator resumed) in an hf/ file
    from code in another file; consecutive entries of one file collapse into one; leaf helpers are not counted."""
    seen: list[str] = []
    root = str(HF)

    def profile(frame, event, arg):
        if event != "call" or not frame.f_code.co_filename.startswith(root):
            return
        name = Path(frame.f_code.co_filename).name
        if name in LEAF_FILES:
            return
        caller = frame.f_back.f_code.co_filename if frame.f_back is not None else ""
        if caller != frame.f_code.co_filename and (not seen or seen[-1] != name):
            seen.append(name)

    sys.setprofile(profile)
    try:
        run()
    finally:
        sys.setprofile(None)
    return seen


def test_a_finetune_job_enters_each_data_file_once(tmp_path):
    model = _hf_models.save_tiny("llama", tmp_path / "model", chat_template="")  # chat vocabulary, no template
    template = tmp_path / "chatml.jinja"
    template.write_text(_hf_models.CHATML, encoding="utf-8")
    chat = {"messages": [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "good morning"}]}
    rows = [
        {"text": "the cat sat on the mat"},
        {"prompt": "question : what colour is the sky ?", "completion": "blue"},
        chat,
        {"instruction": "we like green tea", "output": "one two three"},
    ] * 3
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (tmp_path / "valid.jsonl").write_text(json.dumps(chat) + "\n", encoding="utf-8")
    job = finetune.FinetuneJob(
        model=model,
        data=tmp_path / "train.jsonl",
        valid=tmp_path / "valid.jsonl",
        task="causal-lm",
        out=tmp_path / "out",
        chat_template=template,
        pack=True,
        batch_size=2,
        max_length=32,
        train=TrainConfig(epochs=1),
    )

    def first_batch():
        setup = finetune.prepare(job)
        next(iter(setup.train_loader))

    path = _entries(first_batch)
    print("call path:", " -> ".join(p.removesuffix(".py") for p in path))
    data_path = [p for p in path if p not in MODEL_FILES]
    again = sorted({p for p in data_path if data_path.count(p) > 1})
    assert not again, f"entered more than once: {again}; call path {' -> '.join(path)}"
    order = [p.removesuffix(".py") for p in data_path if p.removesuffix(".py") in PIPELINE]
    assert order == list(PIPELINE), f"the pipeline ran {order}; expected {list(PIPELINE)}"
