"""A fine-tune that several modules of tests/cli check, run once per session by a real `lorakit finetune`."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _cli import _causal_rows, _write_jsonl, lorakit  # noqa: E402


@pytest.fixture(scope="session")
def causal_run(tmp_path_factory) -> dict:
    """A tiny llama fine-tuned briefly on prompt/completion and text rows, its seven linear projections named in
    both spellings --targets takes (commas, separate words): the model, adapter, rows and the run's stdout."""
    import _hf_models

    root = tmp_path_factory.mktemp("causal")
    model = _hf_models.save_tiny("llama", root / "llama")
    rows = _write_jsonl(root / "train.jsonl", _causal_rows())
    out = root / "adapter"
    r = lorakit(
        "finetune",
        "--model",
        model,
        "--data",
        rows,
        "--task",
        "causal-lm",
        "--out",
        out,
        "--targets",
        "q_proj,k_proj,v_proj,o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
        "--rank",
        "4",
        "--epochs",
        "4",
        "--lr",
        "1e-2",
        "--batch-size",
        "8",
        "--device",
        "cpu",
        "--plain",
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    return {"model": model, "adapter": out, "rows": rows, "stdout": r.stdout}
