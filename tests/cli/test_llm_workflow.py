"""The LLM workflow end to end through the real CLI (issue 13's "done when"): a tiny Llama with a chat template,
fine-tuned on `messages` rows (packed, evaluated every few steps with the forgetting monitor and TensorBoard),
then `eval --json` (the adapter's loss below the base's, and equal to what finetune reported), `predict`
(completions as JSON lines), `merge`; and the README's chat workflow block run exactly as written."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))
import _hf_models  # noqa: E402

pytestmark = pytest.mark.slow  # subprocesses, servers or export runtimes: not in the fast set

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
PAIRS = [
    ("what is two plus two ?", "four"),
    ("what colour is the sky ?", "blue"),
    ("good morning", "hello world"),
    ("hello world", "good morning"),
    ("one two three", "four five"),
    ("the cat sat on the", "mat"),
]


def chats(n: int) -> list[dict]:
    """`n` chat rows cycling through PAIRS, every third with a system message, every fifth two turns long."""
    rows = []
    for i in range(n):
        q, a = PAIRS[i % len(PAIRS)]
        messages = [{"role": "system", "content": "you are a helpful bot"}] if i % 3 == 0 else []
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        if i % 5 == 0:
            q2, a2 = PAIRS[(i + 1) % len(PAIRS)]
            messages += [{"role": "user", "content": q2}, {"role": "assistant", "content": a2}]
        rows.append({"messages": messages})
    return rows


def write_workspace(root: Path) -> None:
    """What the README's chat workflow needs in its working directory: a model, chat data, reference text."""
    _hf_models.save_tiny("llama", root / "models" / "tiny-chat", chat_template=_hf_models.CHATML)
    for name, rows in (("chat.jsonl", chats(48)), ("chat-valid.jsonl", chats(12))):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (root / "reference.txt").write_text(" ".join(_hf_models.SENTENCES) + "\n", encoding="utf-8")


def lorakit(cwd: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "lorakit", *args],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.returncode == 0, f"lorakit {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return proc


def test_chat_finetune_eval_predict_merge(tmp_path):
    write_workspace(tmp_path)
    model = "models/tiny-chat"
    lorakit(
        tmp_path,
        "finetune",
        "--model",
        model,
        "--data",
        "chat.jsonl",
        "--valid",
        "chat-valid.jsonl",
        "--task",
        "causal-lm",
        "--out",
        "adapters/chat",
        "--pack",
        "--epochs",
        "8",
        "--lr",
        "2e-2",
        "--targets",
        "all-linear",
        "lm_head",
        "--batch-size",
        "2",
        "--max-length",
        "64",
        "--eval-every",
        "3",
        "--reference",
        "reference.txt",
        "--log",
        "tensorboard",
        "--plain",
    )
    report = json.loads((tmp_path / "adapters/chat/run/finetune_report.json").read_text())
    assert report["packing"]["rows_after"] < report["packing"]["rows_before"]
    rows = [json.loads(line) for line in (tmp_path / "adapters/chat/run/metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r.get("kind") == "eval"]
    epochs = [r for r in rows if r.get("kind") == "epoch"]
    assert evals and all(r["kl_ref"] >= 0 for r in evals + epochs), rows[:3]
    assert epochs[-1]["kl_ref"] > epochs[0]["kl_ref"] > 0  # the adapter moves away from the base as it trains
    assert any((tmp_path / "adapters/chat/run/tensorboard").iterdir())

    out = lorakit(
        tmp_path, "eval", "--model", model, "--adapter", "chat=adapters/chat", "--data", "chat-valid.jsonl", "--json"
    ).stdout
    scores = json.loads(out)
    assert scores["adapters"]["chat"]["loss"] < scores["base"]["loss"] - 0.5, scores
    # eval scores what finetune validated: the same rows, the same per-token mean
    assert scores["adapters"]["chat"]["loss"] == pytest.approx(report["after"]["loss"], abs=1e-4)

    prompts = "".join(
        json.dumps({"messages": [{"role": "user", "content": q}], "id": i}) + "\n" for i, (q, _) in enumerate(PAIRS)
    )
    tuned, base = (
        [
            json.loads(line)
            for line in lorakit(
                tmp_path, "predict", "--model", model, *adapter, "--max-new-tokens", "6", stdin=prompts
            ).stdout.splitlines()
        ]
        for adapter in (["--adapter", "adapters/chat"], [])
    )
    assert [r["id"] for r in tuned] == list(range(len(PAIRS))), tuned  # one line per row, in order
    assert all(isinstance(r["completion"], str) for r in tuned + base)
    assert [r["completion"] for r in tuned] != [r["completion"] for r in base], (tuned, base)

    lorakit(tmp_path, "merge", "--model", model, "--adapter", "adapters/chat", "--out", "models/tiny-chat-merged")
    assert (tmp_path / "models/tiny-chat-merged/config.json").is_file()


def readme_block(title: str) -> str:
    """The first ```bash block after the README heading `title`."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(title)
    match = re.search(r"```bash\n(.*?)```", text[start:], re.S)
    assert match, f"no bash block after {title!r}"
    return match.group(1)


def test_readme_chat_workflow_runs_as_written(tmp_path):
    write_workspace(tmp_path)
    block = readme_block("### Chat data, end to end")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    lorakit_bin = shutil.which("lorakit", path=str(Path(sys.executable).parent))
    assert lorakit_bin, "the lorakit console script is not installed beside this python"
    (bin_dir / "lorakit").symlink_to(lorakit_bin)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, f"the README block failed:\n{block}\n{proc.stderr[-3000:]}"
    assert '"completion"' in proc.stdout
    assert (tmp_path / "models/tiny-chat-merged/config.json").is_file()
    # the workflow ends with an export and, as a comment, the line it prints: that is the line printed
    last_command, printed = block.strip().splitlines()[-2:]
    assert last_command.startswith("lorakit export ") and printed.startswith("# ")
    assert proc.stdout.strip().splitlines()[-1] == printed[2:]
    assert json.loads((tmp_path / "chat-onnx/proof.json").read_text())["passed"]
