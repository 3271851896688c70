"""Atomic writes: ordinary permissions, whole adapters under concurrent saves and loads, and after a kill."""

import os
import subprocess
import sys
import threading

import pytest
import torch
from torch import nn

import lorakit as lk


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def test_written_files_get_the_permissions_open_gives(umask, tmp_path):
    """Adapters, layer files, task files, checkpoints, metrics, plots and JSON: mode 0o666 & ~umask, not 0600."""
    from torch.utils.data import DataLoader, TensorDataset

    from lorakit.hf.models import write_task_file
    from lorakit.train import TrainConfig, Trainer

    model = lk.apply_lora(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), lk.LoraConfig(rank=2), ["0", "1"])
    lk.save_adapters(model, tmp_path / "adapter")
    write_task_file(tmp_path / "adapter", "causal-lm")
    lk.lora_layers(model)["0"].save_adapter(tmp_path / "layer")
    mlp = lk.apply_lora(nn.Sequential(nn.Linear(4, 4)), lk.LoraConfig(rank=2), ["0"])
    data = DataLoader(TensorDataset(torch.randn(8, 4), torch.randn(8, 4)), batch_size=4)
    Trainer(
        mlp, TrainConfig(epochs=1, device="cpu"), loss_fn=nn.functional.mse_loss, artifact_dir=tmp_path / "run"
    ).fit(data, data)
    modes = {
        p.relative_to(tmp_path).as_posix(): oct(p.stat().st_mode & 0o777) for p in tmp_path.rglob("*") if p.is_file()
    }
    assert {
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
        "adapter/lorakit_task.json",
        "layer.safetensors",
        "run/checkpoint.safetensors",
        "run/config.json",
        "run/metrics.jsonl",
        "run/loss.png",
        "run/adapter/adapter_model.safetensors",
        "run/best_adapter/adapter_config.json",
    } <= modes.keys()
    assert modes == dict.fromkeys(modes, oct(0o666 & ~umask))


def _base() -> nn.Module:
    """The one base every save and load here shares (no global RNG: savers build theirs in threads)."""
    base = nn.Sequential(nn.Linear(8, 8))
    with torch.no_grad():
        base[0].weight.copy_(torch.arange(64.0).reshape(8, 8) / 64)
        base[0].bias.zero_()
    return base


def _marked(alpha: float) -> nn.Module:
    """A LoRA model whose every adapter weight equals its alpha: a load pairs config and weights right iff they
    agree."""
    model = lk.apply_lora(_base(), lk.LoraConfig(rank=2, alpha=alpha), ["0"])
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.fill_(alpha)
    return model


def _load_whole(directory) -> float:
    """Load the adapter in `directory`; its weights must come from the same save as its config."""
    layer = lk.lora_layers(lk.load_adapters(_base(), directory))["0"]
    values = torch.cat([layer.lora_A.flatten(), layer.lora_B.flatten()]).unique().tolist()
    assert values == [layer.config.alpha], f"weights {values} loaded with the config of alpha {layer.config.alpha}"
    return layer.config.alpha


SAVER = r"""
import sys, torch, lorakit as lk
from torch import nn
directory, alpha, rounds = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
base = nn.Sequential(nn.Linear(8, 8))
with torch.no_grad():
    base[0].weight.copy_(torch.arange(64.0).reshape(8, 8) / 64)
    base[0].bias.zero_()
model = lk.apply_lora(base, lk.LoraConfig(rank=2, alpha=alpha), ["0"])
with torch.no_grad():
    for p in model.parameters():
        if p.requires_grad:
            p.fill_(alpha)
print("ready", flush=True)
sys.stdin.readline()  # start when the parent says so, together with the other saver
for _ in range(rounds):
    lk.save_adapters(model, directory)
"""
ROUNDS = 100


@pytest.mark.slow
@pytest.mark.parametrize("how", ["threads", "processes"])
def test_concurrent_saves_never_pair_one_adapters_weights_with_anothers_config(how, tmp_path):
    """Two savers write different adapters into one directory while a reader loads it, over and over."""
    lk.save_adapters(_marked(1.0), tmp_path)
    seen = set()
    if how == "threads":
        start, errors = threading.Barrier(3), []

        def save(alpha):
            model = _marked(alpha)
            start.wait()
            try:
                for _ in range(ROUNDS):
                    lk.save_adapters(model, tmp_path)
            except BaseException as e:  # noqa: BLE001 - reported by the main thread
                errors.append(e)

        savers = [threading.Thread(target=save, args=(a,)) for a in (2.0, 3.0)]
        for t in savers:
            t.start()
        start.wait()
        while any(t.is_alive() for t in savers):
            seen.add(_load_whole(tmp_path))
        for t in savers:
            t.join()
        assert not errors, errors
    else:
        savers = [
            subprocess.Popen(
                [sys.executable, "-c", SAVER, str(tmp_path), str(a), str(ROUNDS)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for a in (2.0, 3.0)
        ]
        try:
            assert [p.stdout.readline() for p in savers] == ["ready\n"] * 2
            for p in savers:
                p.stdin.write("go\n")
                p.stdin.flush()
            while any(p.poll() is None for p in savers):
                seen.add(_load_whole(tmp_path))
        finally:
            for p in savers:
                p.kill() if p.poll() is None else None
                p.wait()
        assert [p.returncode for p in savers] == [0, 0]
    seen.add(_load_whole(tmp_path))
    assert seen <= {1.0, 2.0, 3.0} and seen & {2.0, 3.0}


KILLED = r"""
import os, sys, torch, lorakit as lk
from torch import nn
directory, point = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
model = lk.apply_lora(nn.Sequential(nn.Linear(256, 256)), lk.LoraConfig(rank=64), ["0"])


def save(version):
    with torch.no_grad():
        lk.lora_layers(model)["0"].lora_B.fill_(float(version))
    lk.save_adapters(model, directory)


def stop_here():
    print("stopped", flush=True)
    sys.stdin.readline()  # the parent SIGKILLs this process now


real_fsync, real_replace = os.fsync, os.replace


def fsync(fd):  # the weights are written, not yet renamed into place
    if point.endswith("before-rename") and "adapter_model.safetensors" in os.readlink(f"/proc/self/fd/{fd}"):
        stop_here()
    real_fsync(fd)


def replace(src, dst):  # the weights are in place, the config not yet
    real_replace(src, dst)
    if point == "after-rename" and str(dst).endswith("adapter_model.safetensors"):
        stop_here()


if not point.startswith("first-save"):
    save(1)
os.fsync, os.replace = fsync, replace
save(2)
print("finished without stopping", flush=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    "point,version", [("first-save-before-rename", None), ("before-rename", 1.0), ("after-rename", "torn")]
)
def test_writer_killed_mid_save_leaves_the_old_adapter_or_the_new_one(point, version, tmp_path):
    """SIGKILL a saving process at a known point of its save: on disk is the old adapter or the new one, whole.

    The child stops itself (in a patched os.fsync / os.replace) and says so on stdout; then it is killed.
    A writer that wrote the target in place would leave the new bytes where the old adapter is expected.
    Killed between the renames, the directory holds the new weights beside the old lorakit.json (written
    last): a load refuses that torn adapter by its recorded hashes rather than pairing them.
    """
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED, str(tmp_path), point],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line == "stopped\n", (line, proc.stderr.read()[-3000:] if proc.poll() is not None else "")
    finally:
        proc.kill()
        proc.wait()
    names = sorted(p.name for p in tmp_path.iterdir())
    temps = [n for n in names if n.startswith(".adapter_model.safetensors.") and n.endswith(".tmp")]
    assert len(temps) == (0 if point == "after-rename" else 1), names
    if version is None:  # killed during the very first save: no adapter at all, not a broken one
        assert names == temps
        return
    assert set(names) - set(temps) == {"adapter_config.json", "adapter_model.safetensors", "lorakit.json"}
    torch.manual_seed(0)  # the child's base
    if version == "torn":
        with pytest.raises(lk.LoraFileChanged, match="changed since it was saved"):
            lk.load_adapters(nn.Sequential(nn.Linear(256, 256)), tmp_path)
        return
    model = lk.load_adapters(nn.Sequential(nn.Linear(256, 256)), tmp_path)
    assert torch.all(lk.lora_layers(model)["0"].lora_B == version)
