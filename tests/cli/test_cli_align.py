"""`lorakit finetune --task dpo|grpo` as users run it, in real subprocesses on a tiny llama: after an SFT run
(conftest's `causal_run`, whose adapter is the start and the reference), each writes a PEFT adapter that PEFT
loads; with gradient checkpointing on, a SIGKILL mid-run and --resume end in the bytes of the uninterrupted run;
under torchrun (2 CPU ranks, DDP) each task trains from the base with the base as reference."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _cli import ENV, IDS, MASK, Beside, _write_jsonl  # noqa: E402

TESTS = Path(__file__).parents[1]
sys.path.insert(0, str(TESTS))
import _cli_hold  # noqa: E402

pytestmark = pytest.mark.slow  # subprocesses, servers or export runtimes: not in the fast set

QA = [
    ("question : what is two plus two ? answer :", "four", "blue"),
    ("question : what colour is the sky ? answer :", "blue", "four"),
    ("the cat sat on the", "mat", "park"),
    ("the dog ran in the", "park", "mat"),
]
# a reward of the user's own, called as TRL calls reward functions: it varies with every completion's length
REWARD_MODULE = """
def length(prompts, completions, completion_ids, answer, **kwargs):
    return [len(ids) / 8.0 for ids in completion_ids]
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory, causal_run) -> dict:
    """The SFT run's model and adapter, DPO pair rows, GRPO prompt rows and a reward module on PYTHONPATH."""
    root = tmp_path_factory.mktemp("align")
    pairs = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in QA] * 4
    prompts = [{"prompt": p, "answer": c} for p, c, _ in QA] * 2
    (root / "my_rewards.py").write_text(REWARD_MODULE)
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(root), ENV.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    return {
        "model": causal_run["model"],
        "sft": causal_run["adapter"],
        "pairs": _write_jsonl(root / "pairs.jsonl", pairs),
        "prompts": _write_jsonl(root / "prompts.jsonl", prompts),
        "env": env,
    }


def _common(files: dict) -> list[str]:
    return ["--model", files["model"], "--device", "cpu", "--plain", "--checkpoint-every", "2", "--valid-fraction"]


def dpo_args(files: dict) -> list[str]:
    """DPO from the SFT adapter against the SFT adapter frozen, gradient checkpointing on: 12 rows, 6 steps."""
    return [
        "finetune", "--task", "dpo", "--data", files["pairs"], *_common(files), "0.25", "--batch-size", "4",
        "--epochs", "2", "--lr", "5e-2", "--beta", "0.5", "--init-adapter", files["sft"], "--ref-adapter",
        files["sft"], "--gradient-checkpointing",
    ]  # fmt: skip


def grpo_args(files: dict) -> list[str]:
    """GRPO from the SFT adapter, KL to the base at beta 0.04, two rewards weighted: 6 prompts x 4 completions."""
    return [
        "finetune", "--task", "grpo", "--data", files["prompts"], *_common(files), "0.25", "--batch-size", "2",
        "--epochs", "2", "--lr", "5e-2", "--num-generations", "4", "--max-completion-length", "6", "--beta", "0.04",
        "--reward", "contains", "--reward", "my_rewards:length", "--reward-weights", "1.0", "0.5",
        "--init-adapter", files["sft"], "--gradient-checkpointing",
    ]  # fmt: skip


def lorakit(files: dict, *args, timeout: int = 300) -> subprocess.CompletedProcess:
    r = subprocess.run(
        [sys.executable, "-m", "lorakit", *map(str, args)],
        capture_output=True,
        text=True,
        env=files["env"],
        timeout=timeout,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK).logits


def check_peft_loads(model: Path, adapter: Path) -> None:
    """PEFT loads the adapter and computes lorakit's logits with it."""
    import peft

    from lorakit.hf import models as hf

    ours, _, _ = hf.load_with_adapter(model, adapter)
    theirs = peft.PeftModel.from_pretrained(hf.load_model(model, "causal-lm"), adapter)
    assert (_logits(theirs) - _logits(ours)).abs().max().item() < 1e-5
    assert json.loads((adapter / "lorakit_task.json").read_text())["task"] == "causal-lm"


def killed_then_resumed(files: dict, args: list, out: Path) -> subprocess.CompletedProcess:
    """Run `args` into `out`, SIGKILLed right after its checkpoint at step 2 is announced; then --resume it."""
    held = _cli_hold.signal_at("checkpoint step=2 ", [*args, "--out", out], signal.SIGKILL, files["env"])
    assert held.returncode == -signal.SIGKILL and held.rest == "", "".join(held.seen[-20:]) + held.err
    assert not (out / "adapter_model.safetensors").exists()
    resumed = lorakit(files, "finetune", "--out", out, "--resume")
    assert "resumed_at_step=2 " in resumed.stdout
    return resumed


@pytest.mark.parametrize("task", ["dpo", "grpo"])
def test_a_run_from_the_sft_adapter_resumes_after_sigkill_to_the_same_bytes(files, tmp_path, task) -> None:
    args = dpo_args(files) if task == "dpo" else grpo_args(files)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    # the uninterrupted run beside the killed one and its resumption (one thread a process: OMP_NUM_THREADS=1)
    with Beside([*args, "--out", whole], files["env"], tmp_path / "whole-log") as running:
        killed_then_resumed(files, args, killed)
        r = running.result()
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    stdout = r.stdout
    assert "gradient_checkpointing=on" in stdout
    ref = f"reference: adapter {files['sft']}, frozen" if task == "dpo" else "reference: base with the adapter disabled"
    assert ref in stdout, stdout
    names = (
        ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"]
        if task == "dpo"
        else ["reward", "reward_std", "rewards/contains/mean", "rewards/length/std", "kl", "completions/mean_length"]
    )
    epoch = [line for line in stdout.splitlines() if line.startswith("epoch ")][-1]  # the plain log's epoch line
    assert all(f" train_{n}=" in epoch and f" valid_{n}=" in epoch for n in names), epoch
    after = next(line for line in stdout.splitlines() if line.startswith("after "))
    assert all(f" valid_{n}=" in after for n in names), after
    report = json.loads((whole / "run" / "finetune_report.json").read_text())
    assert report["task"] == task and report["steps"] == 6
    assert report["align"]["beta"] == (0.5 if task == "dpo" else 0.04)
    assert report["init_adapter"] == str(files["sft"])
    rows = [json.loads(line) for line in (whole / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(f"valid_{n}" in rows[-1] for n in names), rows[-1]  # the last epoch's row, TRL's names
    sft = (files["sft"] / "adapter_model.safetensors").read_bytes()
    assert (whole / "adapter_model.safetensors").read_bytes() != sft  # it trained from the SFT adapter
    check_peft_loads(files["model"], whole)
    assert (killed / "adapter_model.safetensors").read_bytes() == (whole / "adapter_model.safetensors").read_bytes()


@pytest.mark.parametrize("task", ["dpo", "grpo"])
def test_torchrun_two_ranks_train_each_task_from_the_base(files, tmp_path, task) -> None:
    data, extra = (
        (files["pairs"], ["--beta", "0.2"])
        if task == "dpo"
        else (files["prompts"], ["--num-generations", "2", "--max-completion-length", "4", "--reward", "contains"])
    )
    out = tmp_path / "ddp"
    args = [
        "finetune", "--task", task, "--data", data, "--model", files["model"], "--out", out, "--device", "cpu",
        "--plain", "--rank", "2", "--targets", "q_proj,v_proj", "--batch-size", "2", "--max-steps", "2", *extra,
    ]  # fmt: skip
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "lorakit"]
    r = subprocess.run([*command, *map(str, args)], capture_output=True, text=True, env=files["env"], timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "reference: base with the adapter disabled" in r.stdout or task == "grpo"
    assert json.loads((out / "run" / "finetune_report.json").read_text())["steps"] == 2
    check_peft_loads(files["model"], out)
