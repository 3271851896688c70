"""LoRA on a small MLP, end to end — the flow of `lorakit example` as one script to copy.

Pre-train on task A, add LoRA (r=4, alpha=8) to fc1 and fc2, fine-tune on a shifted task B with the
trainer (live dashboard in a terminal, plain logs in a pipe), save the adapter, reload it into a fresh
base, merge. Run: python examples/mlp_lora.py [artifact_dir]
"""

import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lorakit as lk
from lorakit.files import safetensors as safetensors_io
from lorakit.train import TrainConfig, Trainer

out = Path(sys.argv[1] if len(sys.argv) > 1 else "artifacts/mlp_lora")
torch.manual_seed(0)
torch.set_num_threads(1)  # a model this small runs fastest on one thread


class SimpleMlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(32, 64), nn.Linear(64, 64), nn.Linear(64, 1)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def task(w, n, seed):
    """x ~ N(0, I); y = sum(tanh(x Wᵀ)) (a fixed random teacher), as (train, valid) loaders."""
    x = torch.randn(n, 32, generator=torch.Generator().manual_seed(seed))
    y = torch.tanh(x @ w.T).sum(1, keepdim=True) / 2
    split = n * 4 // 5
    return (DataLoader(TensorDataset(x[:split], y[:split]), batch_size=64, shuffle=True),
            DataLoader(TensorDataset(x[split:], y[split:]), batch_size=512))


w_a = torch.randn(16, 32) / 32**0.5
w_b = w_a + 0.6 * torch.randn(16, 2) @ torch.randn(2, 32) / 32**0.5  # task B: a rank-2 shift of task A
train_a, valid_a = task(w_a, 8192, seed=1)
train_b, valid_b = task(w_b, 2560, seed=2)
mse = nn.functional.mse_loss

# 1. pre-train the base on task A and save it
model = SimpleMlp()
Trainer(model, TrainConfig(epochs=10, lr=3e-3, schedule="cosine", device="cpu"), loss_fn=mse, callbacks=[]).fit(train_a)
out.mkdir(parents=True, exist_ok=True)
safetensors_io.write(out / "base.safetensors", model.state_dict())

# 2. LoRA on fc1 and fc2; fc3 stays frozen
before = Trainer(model, TrainConfig(device="cpu"), loss_fn=mse, callbacks=[]).evaluate(valid_b)["loss"]
lk.apply_lora(model, lk.LoraConfig(rank=4, alpha=8.0), targets=["fc1", "fc2"])
print(lk.summary(model))

# 3. fine-tune on task B (dashboard on a terminal; artifacts: config.json, metrics.jsonl, loss.png, adapters)
result = Trainer(model, TrainConfig(epochs=10, lr=1e-2, schedule="cosine", warmup_steps=20, device="cpu"),
                 loss_fn=mse, artifact_dir=out / "train").fit(train_b, valid_b)
print(f"task B loss: base {before:.4f} -> LoRA {result.valid_loss:.4f}")

# 4. save the adapter: a few KB next to the full model
lk.save_adapters(model, out / "adapter")
for f in sorted((out / "adapter").iterdir()):
    print(f"{f.name}: {f.stat().st_size:,} bytes (full model: {(out / 'base.safetensors').stat().st_size:,})")

# 5. a fresh base from the saved weights + the adapter gives the same outputs
model.cpu().eval()
x = valid_b.dataset.tensors[0]
fresh = SimpleMlp()
fresh.load_state_dict(safetensors_io.read(out / "base.safetensors")[0])
lk.load_adapters(fresh, out / "adapter").eval()
with torch.no_grad():
    assert torch.equal(fresh(x), model(x)), "reloaded adapter gives different outputs"
    # 6. merge back into plain Linear layers: same function, no LoRA overhead
    diff = (lk.merge(fresh)(x) - model(x)).abs().max().item()
print(f"reload: identical outputs; merge: max |diff| {diff:.2e}")
assert diff <= 1e-5, f"merged model differs by {diff}"
