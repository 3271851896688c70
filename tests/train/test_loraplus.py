"""LoRA+: lora_B trains with ratio × the learning rate of everything else."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lorakit as lk
from lorakit.train import TrainConfig, Trainer
from lorakit.train.trainer import param_groups


def model():
    torch.manual_seed(0)
    m = lk.apply_lora(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1)), lk.LoraConfig(rank=2), ["0", "2"])
    with torch.no_grad():  # B = 0 would get a zero gradient for A on the first step
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.fill_(0.1)
    return m


def one_step(ratio):
    m = model()
    before = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    data = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=16)
    Trainer(
        m,
        TrainConfig(epochs=1, lr=1e-3, device="cpu", max_grad_norm=None, loraplus_ratio=ratio),
        loss_fn=nn.functional.mse_loss,
        callbacks=[],
    ).fit(data)
    return {n: (p.detach() - before[n]).abs().max().item() for n, p in m.named_parameters() if p.requires_grad}


def test_b_steps_ratio_times_further_than_a():
    plain, plus = one_step(None), one_step(16.0)
    for n in plain:  # AdamW's first step moves each entry by about lr, whatever the gradient's size
        want = 16.0 if "lora_B" in n else 1.0
        assert plus[n] == pytest.approx(want * plain[n], rel=1e-3), n


def test_groups_and_validation():
    m = model()
    params = {n: p for n, p in m.named_parameters() if p.requires_grad}
    groups = param_groups(params, 4.0)
    assert [g["lr_scale"] for g in groups] == [1.0, 4.0] and len(groups[1]["params"]) == 2
    assert len(param_groups(params, None)) == 1
    with pytest.raises(ValueError, match="loraplus_ratio"):
        TrainConfig(loraplus_ratio=0)
    assert TrainConfig.from_dict(TrainConfig(loraplus_ratio=16).to_dict()).loraplus_ratio == 16
