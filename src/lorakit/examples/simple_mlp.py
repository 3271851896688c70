"""The example's model and data: SimpleMlp (32 → 64 → 64 → 1) and two related synthetic regression tasks.

Both tasks are a fixed random "teacher" network y = v · tanh(W x) (W: 16×32) on x ~ N(0, I).
Task B is task A with the teacher's W shifted by a rank-2 matrix — a change of the kind LoRA's
low-rank update is meant to capture. Targets are scaled to unit variance, so an MSE of 1.0 is
what predicting the mean scores.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

IN, HIDDEN, TEACHER = 32, 64, 16


class SimpleMlp(nn.Module):
    """fc1 32→64, ReLU, fc2 64→64, ReLU, fc3 64→1 (Burn's LoRA example model)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(IN, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, HIDDEN)
        self.fc3 = nn.Linear(HIDDEN, 1)

    def forward(self, x: Tensor) -> Tensor:
        """(B, 32) -> (B, 1)."""
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def make_task(task: str, n: int, seed: int, split: int) -> tuple[Tensor, Tensor]:
    """`n` samples (x: (n, 32), y: (n, 1)) of task "A" or "B"; `split` picks disjoint input draws.

    Examples:
        >>> x, y = make_task("B", 8, seed=0, split=1)
        >>> tuple(x.shape), tuple(y.shape)
        ((8, 32), (8, 1))
    """
    if task not in ("A", "B"):
        raise ValueError(f"task {task!r} is unknown: expected 'A' or 'B'")
    g = torch.Generator().manual_seed(seed)  # the teacher depends on the seed only
    w = torch.randn(TEACHER, IN, generator=g) / IN**0.5
    v = torch.randn(TEACHER, generator=g) / TEACHER**0.5
    u, s = torch.randn(TEACHER, 2, generator=g), torch.randn(2, IN, generator=g)
    if task == "B":
        w = w + 0.6 * (u @ s) / IN**0.5  # the shift: rank 2
    # the variance of y over a large fixed sample, so both splits use one scale
    probe = torch.randn(4096, IN, generator=torch.Generator().manual_seed(seed + 10_000))
    scale = (torch.tanh(probe @ w.T) @ v).std()
    x = torch.randn(n, IN, generator=torch.Generator().manual_seed(seed * 1000 + split + 1))
    y = (torch.tanh(x @ w.T) @ v) / scale  # (n,)
    return x, y[:, None]


def loaders(
    task: str, n_train: int, n_valid: int, batch_size: int, seed: int
) -> tuple[DataLoader[tuple[Tensor, ...]], DataLoader[tuple[Tensor, ...]]]:
    """Seeded train (shuffled with its own generator) and valid loaders for one task."""
    x, y = make_task(task, n_train, seed, split=0 if task == "A" else 2)
    vx, vy = make_task(task, n_valid, seed, split=1 if task == "A" else 3)
    train = DataLoader(
        TensorDataset(x, y), batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    return train, DataLoader(TensorDataset(vx, vy), batch_size=512)
