"""Distributed training under real torchrun (2 CPU processes, gloo): DDP and FSDP2 match one process with the
doubled batch, both ranks end with the same adapter, and a SIGKILLed 2-rank run resumes to the same bytes."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lorakit.files import safetensors as safetensors_io
from lorakit.train.distributed import Group, Launch

pytestmark = pytest.mark.slow  # subprocesses, servers or export runtimes: not in the fast set

SCRIPT = Path(__file__).with_name("dist_run.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
ADAPTER = "adapter/adapter_model.safetensors"
VOLATILE = {"elapsed_s", "throughput"}


def _torchrun(out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(SCRIPT),
        str(out),
        *extra,
    ]


def _run2(out: Path, *extra: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(_torchrun(out, *extra), capture_output=True, text=True, env=ENV, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return safetensors_io.read(path)[0]


def _rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]


def _dist_run():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import dist_run
    finally:
        sys.path.pop(0)
    return dist_run


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("one")
    _dist_run().main([str(out), "--one-process", "--batch-size", "16"])  # in this process: no torchrun
    return out


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_of_batch_b_match_one_process_of_batch_2b(one_process: Path, tmp_path: Path, mode: str) -> None:
    out = tmp_path / mode
    log = _run2(out, "--batch-size", "8", *(["--fsdp"] if mode == "fsdp" else [])).stdout
    assert log.count("\ndone steps=24 ") + log.startswith("done") == 1, "only rank 0 reports"
    want = _tensors(one_process / ADAPTER)
    got = _tensors(out / ADAPTER)
    assert sorted(got) == sorted(want)
    for name in want:  # the gradients are the same means, summed in another order: fp32 rounding apart
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)
    rank0, rank1 = _tensors(out / "rank0.safetensors"), _tensors(out / "rank1.safetensors")
    assert all(torch.equal(rank0[n], rank1[n]) for n in rank0), "the ranks' adapters differ"
    ours, theirs = _rows(out), _rows(one_process)  # metrics are summed over ranks: the same run's numbers
    assert [r["step"] for r in ours] == [r["step"] for r in theirs]
    for a, b in zip(ours, theirs, strict=False):
        for key in ("loss", "train_loss", "valid_loss", "mae"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (key, a["step"])
    assert json.loads((out / "config.json").read_text())["world_size"] == 2


def test_a_killed_two_rank_run_resumes_to_the_same_bytes(tmp_path: Path) -> None:
    whole = tmp_path / "whole"
    _run2(whole, "--dropout", "0.1")  # dropout: every rank's own RNG stream must come back too
    killed = tmp_path / "killed"
    # both ranks hold still after step 7, two steps past the checkpoint at 5, mid-epoch, and say so; then
    # torchrun and each rank (in a session of its own) are killed there
    proc = subprocess.Popen(
        _torchrun(killed, "--dropout", "0.1", "--hold-at-step", "7"),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=ENV,
        start_new_session=True,
    )
    seen, held = [], {}
    for line in proc.stdout:
        seen.append(line)
        if match := re.search(r"held rank=(\d+) pid=(\d+)$", line):  # the line a rank writes in one write(2)
            held[match[1]] = int(match[2])
            if len(held) == 2:
                break
    with contextlib.suppress(ProcessLookupError):  # (gone already if the run failed before holding)
        os.killpg(proc.pid, signal.SIGKILL)
        for pid in held.values():
            os.kill(pid, signal.SIGKILL)
    seen += proc.stdout.readlines()
    proc.wait(timeout=60)
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL and len(held) == 2, "".join(seen)
    steps = [line for line in seen if line.startswith("step ")]
    assert "step=7/" in steps[-1]  # nothing past the step it held at
    assert any(line.startswith("checkpoint step=5 ") for line in seen)
    assert not (killed / "adapter").exists()

    resumed = _run2(killed, "--dropout", "0.1", "--resume").stdout
    assert "resumed_at_step=5" in resumed, resumed[:2000]
    for name in (ADAPTER, "best_adapter/adapter_model.safetensors", "rank0.safetensors", "rank1.safetensors"):
        assert (killed / name).read_bytes() == (whole / name).read_bytes(), name
    assert _rows(killed) == _rows(whole)

    from torch import nn  # the 2-rank checkpoint refuses one process, naming both counts

    from lorakit.train import Trainer

    tiny = _dist_run()
    model, train, valid = tiny.build(16, 0.1, one_process=True)
    trainer = Trainer(model, tiny.config(False), loss_fn=nn.functional.mse_loss, callbacks=[], artifact_dir=whole)
    with pytest.raises(ValueError, match=r"made by 2 process\(es\) and this run has 1"):
        trainer.fit(train, valid, resume=True)


@pytest.mark.parametrize(
    "env, message",
    [
        ({"WORLD_SIZE": "2", "RANK": "0"}, "only WORLD_SIZE, RANK is set"),
        ({"WORLD_SIZE": "two", "RANK": "0", "LOCAL_RANK": "0"}, "WORLD_SIZE='two' is invalid"),
        ({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0"}, "WORLD_SIZE=2, RANK=2, LOCAL_RANK=0 are inconsistent"),
    ],
)
def test_a_bad_launch_environment_is_named(env: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Launch.from_env(env)


def test_shard_loader_gives_each_rank_its_slice() -> None:
    data = TensorDataset(torch.arange(10.0))
    loader = DataLoader(data, batch_size=2, shuffle=True)
    shards = [Group(2, r).shard_loader(loader, seed=3) for r in range(2)]
    for s in shards:
        s.sampler.set_epoch(1)
    seen = [torch.cat([b[0] for b in s]) for s in shards]
    assert sorted(torch.cat(seen).tolist()) == list(map(float, range(10)))
    assert all(isinstance(s.sampler, DistributedSampler) and s.batch_size == 2 for s in shards)
    assert Group().shard_loader(loader, seed=3) is loader
    with pytest.raises(TypeError, match="must be a torch DataLoader.*got list"):
        Group(2, 0).shard_loader([(torch.zeros(1), torch.zeros(1))], seed=0)
