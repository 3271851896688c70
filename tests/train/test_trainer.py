"""The trainer on small real models: convergence, what it optimizes, metrics.jsonl, metrics, accumulation."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lorakit as lk
from lorakit.train import (
    EpochEnded,
    Metric,
    RunEnded,
    RunStarted,
    StepLogged,
    TrainConfig,
    Trainer,
    accuracy,
    perplexity,
)
from lorakit.train.batch import BatchOut


def _regression(n: int = 256, seed: int = 0) -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = x @ torch.randn(6, 1, generator=g) + 0.5
    split = n * 3 // 4
    return (
        DataLoader(
            TensorDataset(x[:split], y[:split]),
            batch_size=16,
            shuffle=True,
            generator=torch.Generator().manual_seed(seed),
        ),
        DataLoader(TensorDataset(x[split:], y[split:]), batch_size=64),
    )


def _lora_mlp() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 1))
    return lk.apply_lora(model, lk.LoraConfig(rank=4, alpha=8), targets=["0", "2"])


def test_converges_and_trains_only_the_adapter(tmp_path) -> None:
    model = _lora_mlp()
    train, valid = _regression()
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    events = []
    trainer = Trainer(
        model,
        TrainConfig(epochs=15, lr=2e-2, schedule="cosine", warmup_steps=5, device="cpu"),
        loss_fn=nn.functional.mse_loss,
        callbacks=[events.append],
        artifact_dir=tmp_path,
    )
    start = trainer.evaluate(valid)["loss"]
    result = trainer.fit(train, valid)
    assert result.valid_loss < start / 20, (start, result.valid_loss)
    assert result.steps == 15 * 12
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, base_before[n]), f"frozen {n} changed"
    kinds = [type(e) for e in events]
    assert kinds[0] is RunStarted and kinds[-1] is RunEnded and kinds.count(EpochEnded) == 15
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "best_adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    best = lk.load_adapters(nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 1)), tmp_path / "best_adapter")
    assert lk.lora_layers(best).keys() == {"0", "2"}


def test_metrics_jsonl_schema(tmp_path) -> None:
    model = _lora_mlp()
    train, valid = _regression()
    cfg = TrainConfig(epochs=2, lr=1e-2, device="cpu", log_every=4)
    Trainer(
        model,
        cfg,
        loss_fn=nn.functional.mse_loss,
        callbacks=[],
        artifact_dir=tmp_path,
        metrics={"mae": lambda out, y: (out - y).abs().mean()},
    ).fit(train, valid)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["kind"] == "step"]
    epochs = [r for r in rows if r["kind"] == "epoch"]
    assert [r["step"] for r in steps] == [4, 8, 12, 16, 20, 24]
    assert [(r["epoch"], r["step"]) for r in epochs] == [(1, 12), (2, 24)]
    step_keys = {
        "kind",
        "epoch",
        "step",
        "batch",
        "loss",
        "lr",
        "grad_norm",
        "throughput",
        "throughput_unit",
        "elapsed_s",
        "mae",
    }
    epoch_keys = {
        "kind",
        "epoch",
        "step",
        "train_loss",
        "valid_loss",
        "best_valid_loss",
        "is_best",
        "lr",
        "elapsed_s",
        "train_mae",
        "valid_mae",
    }
    assert all(set(r) == step_keys for r in steps)
    assert all(set(r) == epoch_keys for r in epochs)
    for r in rows:
        for k, v in r.items():
            if k not in ("kind", "throughput_unit", "is_best"):
                assert isinstance(v, (int, float)) and math.isfinite(v), (k, v)
    assert epochs[1]["best_valid_loss"] == min(r["valid_loss"] for r in epochs)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["train"] == cfg.to_dict() and config["total_steps"] == 24 and config["metrics"] == ["mae"]


def test_classification_metrics_accuracy_and_perplexity() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(384, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()  # 3 classes
    data = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
    lk.apply_lora(model, lk.LoraConfig(rank=8, alpha=16), modules_to_save=["2"], targets=["0"])
    steps: list[StepLogged] = []
    trainer = Trainer(
        model,
        TrainConfig(epochs=8, lr=2e-2, device="cpu", log_every=6),
        loss_fn=nn.functional.cross_entropy,
        metrics=[accuracy(), perplexity()],
        callbacks=[lambda e: steps.append(e) if isinstance(e, StepLogged) else None],
    )
    trainer.fit(data)
    final = trainer.evaluate(data)
    assert final["accuracy"] > 0.9
    assert final["perplexity"] == pytest.approx(math.exp(final["loss"]))
    assert set(steps[-1].metrics) == {"accuracy", "perplexity"}


def test_grad_accumulation_matches_a_larger_batch() -> None:
    def run(batch_size: int, accum: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(3)
        x = torch.randn(64, 6, generator=g)
        data = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=batch_size)
        model = _lora_mlp()
        Trainer(
            model,
            TrainConfig(epochs=2, lr=1e-2, grad_accum=accum, device="cpu", max_grad_norm=None),
            loss_fn=nn.functional.mse_loss,
            callbacks=[],
        ).fit(data)
        return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    big, small = run(32, 1), run(8, 4)
    for name in big:
        torch.testing.assert_close(small[name], big[name], rtol=1e-5, atol=1e-6)


def test_a_short_last_accumulation_group_is_the_mean_of_its_batches() -> None:
    """5 batches with grad_accum=4: steps of 4 batches and of 1, each the mean gradient of its own batches
    (a naive loop); the last batch once weighed 1/4."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(40, 6, generator=g)
    data = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)  # 5 batches, in order
    model = _lora_mlp()
    Trainer(
        model,
        TrainConfig(epochs=2, lr=1e-2, grad_accum=4, device="cpu", max_grad_norm=None),
        loss_fn=nn.functional.mse_loss,
        callbacks=[],
    ).fit(data)

    naive = _lora_mlp()
    params = {n: p for n, p in naive.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(params.values(), lr=1e-2, weight_decay=0.0)  # TrainConfig's defaults
    batches = list(data)
    for _ in range(2):
        for group in (batches[:4], batches[4:]):
            for xb, yb in group:
                (nn.functional.mse_loss(naive(xb), yb) / len(group)).backward()
            opt.step()
            opt.zero_grad()
    trained = dict(model.named_parameters())
    for name, want in params.items():
        torch.testing.assert_close(trained[name].detach(), want.detach(), rtol=1e-5, atol=1e-6)


def test_bf16_autocast_on_cpu_trains() -> None:
    model = _lora_mlp()
    train, valid = _regression()
    trainer = Trainer(
        model,
        TrainConfig(epochs=3, lr=2e-2, precision="bf16", device="cpu"),
        loss_fn=nn.functional.mse_loss,
        callbacks=[],
    )
    start = trainer.evaluate(valid)["loss"]
    assert trainer.fit(train, valid).valid_loss < start


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"epochs": 0}, "TrainConfig.epochs=0"),
        ({"lr": -1.0}, "TrainConfig.lr=-1.0"),
        ({"schedule": "step"}, "TrainConfig.schedule='step'"),
        ({"precision": "fp16"}, "TrainConfig.precision='fp16'"),
        ({"device": "tpu"}, "TrainConfig.device='tpu'"),
        ({"betas": (0.9, 1.5)}, "TrainConfig.betas=(0.9, 1.5)"),
        ({"grad_accum": 1.5}, "TrainConfig.grad_accum=1.5"),
    ],
)
def test_config_errors_name_the_value(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TrainConfig(**kwargs)


def test_user_errors_are_clear() -> None:
    model = nn.Linear(3, 1).requires_grad_(False)
    data = DataLoader(TensorDataset(torch.randn(8, 3), torch.randn(8, 1)), batch_size=4)
    with pytest.raises(ValueError, match="no trainable parameters"):
        Trainer(model, TrainConfig(device="cpu"), loss_fn=nn.functional.mse_loss, callbacks=[]).fit(data)
    with pytest.raises(ValueError, match="need Trainer\\(loss_fn=...\\)"):
        Trainer(nn.Linear(3, 1), TrainConfig(device="cpu"), callbacks=[]).fit(data)
    with pytest.raises(ValueError, match="metric name 'my metric'"):
        Metric("my metric", fn=lambda o, t: 0.0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda'"):
            Trainer(nn.Linear(3, 1), TrainConfig(device="cuda"), callbacks=[])
    nan_data = DataLoader(TensorDataset(torch.full((8, 3), math.nan), torch.randn(8, 1)), batch_size=4)
    with pytest.raises(FloatingPointError, match="loss is nan at epoch 1, batch 1"):
        Trainer(nn.Linear(3, 1), TrainConfig(device="cpu"), loss_fn=nn.functional.mse_loss, callbacks=[]).fit(nan_data)


class _Dict(nn.Module):
    """A mapping-batch model whose output is a dict: neither a Tensor nor an object with .logits."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 1)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        return {"out": self.lin(x)}


def test_loss_fn_on_a_mapping_batch_names_what_it_lacks() -> None:
    # found by mypy: loss_fn(None, labels) failed inside the user's loss function
    cfg = TrainConfig(device="cpu")
    trainer = Trainer(_Dict(), cfg, loss_fn=nn.functional.mse_loss, callbacks=[])
    with pytest.raises(ValueError, match=r"needs batch\['labels'\] and a model output .* output=dict"):
        trainer.evaluate([{"x": torch.randn(4, 3), "labels": torch.randn(4, 1)}])
    unlabelled = Trainer(nn.Linear(3, 1), cfg, loss_fn=nn.functional.mse_loss, callbacks=[])
    with pytest.raises(ValueError, match="got labels=NoneType, output=Tensor"):
        unlabelled.evaluate([{"input": torch.randn(4, 3)}])


def test_the_trainers_adamw_is_the_fused_kernel_and_steps_as_the_loop_does() -> None:
    """`schedule.adamw` (what Trainer.fit builds) is torch's fused AdamW on CPU, and a few steps of it move the
    parameters as the per-tensor loop does (to rounding: the kernels order their arithmetic differently)."""
    from lorakit.train.schedule import adamw

    g = torch.Generator().manual_seed(0)
    start = [torch.randn(8, 16, generator=g), torch.randn(16, 8, generator=g), torch.randn(3, generator=g)]
    fused_p = [nn.Parameter(t.clone()) for t in start]
    loop_p = [nn.Parameter(t.clone()) for t in start]
    fused = adamw([{"params": fused_p, "lr_scale": 1.0}], 1e-2, (0.9, 0.999), 0.01)
    loop = torch.optim.AdamW(loop_p, lr=1e-2, betas=(0.9, 0.999), weight_decay=0.01, foreach=False)
    assert fused.defaults["fused"] is True
    for _ in range(3):
        grads = [torch.randn(t.shape, generator=g) for t in start]
        for p, q, gr in zip(fused_p, loop_p, grads, strict=True):
            p.grad, q.grad = gr.clone(), gr.clone()
        fused.step()
        loop.step()
    for p, q, t in zip(fused_p, loop_p, start, strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)
        assert not torch.equal(p.detach(), t)  # it moved


class _MSEObjective:
    """An objective that scores (x, y) mapping batches as mse_loss would, with a (batch, 2) table of statistics."""

    def __call__(self, net: nn.Module, batch: dict) -> BatchOut:
        err = net(batch["x"]) - batch["y"]
        stats = torch.stack([err.detach().abs().squeeze(1), err.detach().squeeze(1)], dim=1)
        return BatchOut((err**2).mean(), stats, stats, len(err), len(err), "samples")


def test_an_objective_trains_as_the_loss_it_computes_and_its_statistics_are_metrics(tmp_path) -> None:
    """Trainer(objective=...) steps exactly as loss_fn does for the same loss; metrics named with '/' (TRL's
    rewards/chosen style) read the objective's statistics, in training logs and evaluations alike."""
    x, y = torch.randn(32, 3, generator=torch.Generator().manual_seed(0)), torch.randn(32, 1)
    pairs = DataLoader(TensorDataset(x, y), batch_size=8)
    maps = DataLoader([{"x": a, "y": b} for a, b in zip(x, y, strict=True)], batch_size=8)
    nets = []
    for kw, data in (({"loss_fn": nn.functional.mse_loss}, pairs), ({"objective": _MSEObjective()}, maps)):
        torch.manual_seed(1)
        net = lk.apply_lora(nn.Sequential(nn.Linear(3, 1)), lk.LoraConfig(rank=2), ["0"])
        Trainer(net, TrainConfig(epochs=2, device="cpu", lr=0.05), callbacks=[], **kw).fit(data)
        nets.append(net)
    for a, b in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        assert torch.equal(a, b)
    mae = Metric("errors/abs", fn=lambda out, _: out[:, 0].mean())
    trainer = Trainer(nets[1], TrainConfig(device="cpu"), objective=_MSEObjective(), metrics=[mae], callbacks=[])
    means = trainer.evaluate(maps)
    expected = (nets[1](x) - y).abs().mean().item()
    assert means["errors/abs"] == pytest.approx(expected, rel=1e-5)
