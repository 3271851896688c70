"""A long run on a tiny model holds its memory flat: no per-step growth (RSS sampled in a fresh process)."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # subprocesses, servers or export runtimes: not in the fast set

RUN = r"""
import json, sys, torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
import lorakit as lk
from lorakit.train import StepLogged, TrainConfig, Trainer

torch.set_num_threads(1)
torch.manual_seed(0)
model = lk.apply_lora(
    nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1)), lk.LoraConfig(rank=4, dropout=0.1), ["0", "2"]
)
x = torch.randn(512, 16)
data = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8, shuffle=True)
samples = []

def rss_kib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

def on_event(event):
    if isinstance(event, StepLogged):
        samples.append((event.step, rss_kib()))

# draw one plot first: matplotlib's one-time import and font cache (~35 MiB) are not per-step growth
from lorakit.train.artifacts import ArtifactDir
ArtifactDir(sys.argv[1] + "/warmup").plot([{"kind": "step", "step": 1, "loss": 1.0}])

cfg = TrainConfig(epochs=60, lr=1e-3, device="cpu", log_every=100, checkpoint_every=500)
Trainer(model, cfg, loss_fn=nn.functional.mse_loss, callbacks=[on_event], artifact_dir=sys.argv[1]).fit(data, data)
print(json.dumps(samples))
"""


def test_thousands_of_steps_do_not_grow_memory(tmp_path):
    out = subprocess.run([sys.executable, "-c", RUN, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    samples = json.loads(out.stdout.strip().splitlines()[-1])
    assert samples[-1][0] >= 3000  # 60 epochs x 64 steps
    warm = [kib for step, kib in samples if step >= 500]
    growth_mib = (max(warm) - warm[0]) / 1024
    assert growth_mib < 8, f"RSS grew {growth_mib:.1f} MiB between step 500 and step {samples[-1][0]}: {samples}"
