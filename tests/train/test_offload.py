"""Activation offloading (TrainConfig.offload_activations): validated, refused on CPU, and the hooks it installs
around the training forward change no number (checked on CPU, where save_on_cpu's pack/unpack still run)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lorakit as lk
from lorakit.train import TrainConfig, Trainer
from lorakit.train.device import saved_activations


def _data() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=16)


def _model() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 1))
    return lk.apply_lora(net, lk.LoraConfig(rank=4, alpha=8, dropout=0.1), targets=["0", "2"])


def test_config_validates_and_round_trips() -> None:
    with pytest.raises(ValueError, match=r"offload_activations='yes' is invalid: expected True or False"):
        TrainConfig(offload_activations="yes")  # type: ignore[arg-type]
    cfg = TrainConfig(offload_activations=True, device="cuda")
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg and cfg.to_dict()["offload_activations"] is True
    assert TrainConfig().offload_activations is False


def test_cpu_device_is_refused_before_anything_is_written(tmp_path) -> None:
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="nothing to offload.*already live in CPU memory"):
        Trainer(_model(), TrainConfig(offload_activations=True, device="cpu"), artifact_dir=out, callbacks=[])
    assert not out.exists()


def _fit(offload: bool, seen: list[object]) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Train 2 epochs on CPU; with `offload`, the config is swapped after the Trainer's CPU check so the
    training path runs with save_on_cpu's hooks installed (unpinned on CPU)."""
    model, losses = _model(), []

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        seen.append(torch._C._autograd._top_saved_tensors_default_hooks(False))  # the hooks the forward ran under
        return nn.functional.mse_loss(out, y)

    trainer = Trainer(model, TrainConfig(epochs=2, lr=1e-2, device="cpu", log_every=1), loss_fn=loss_fn, callbacks=[])
    trainer.config = dataclasses.replace(trainer.config, offload_activations=offload)
    trainer.callbacks = [lambda e: losses.append(e.train_loss) if hasattr(e, "train_loss") else None]
    trainer.fit(_data())
    return losses, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_offloaded_training_gives_the_same_losses_and_adapter() -> None:
    plain_hooks: list[object] = []
    offload_hooks: list[object] = []
    plain, plain_params = _fit(False, plain_hooks)
    offloaded, offload_params = _fit(True, offload_hooks)
    assert all(h is None for h in plain_hooks)
    assert offload_hooks and all(h is not None and "pack_to_cpu" in h[0].__qualname__ for h in offload_hooks)
    assert plain == offloaded and plain
    for name, p in plain_params.items():
        assert torch.equal(p, offload_params[name]), name


def test_saved_activations_round_trip_gives_identical_grads() -> None:
    x = torch.randn(8, 6, requires_grad=True)
    model = _model()
    grads = []
    for offload in (False, True):
        model.zero_grad(set_to_none=True)
        x.grad = None
        torch.manual_seed(1)  # the same dropout masks both times
        with saved_activations(offload, torch.device("cpu")):
            loss = model(x).pow(2).mean()
        loss.backward()
        grads.append([x.grad.clone(), *(p.grad.clone() for p in model.parameters() if p.requires_grad)])
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


def test_finetune_flag_maps_to_the_train_config(tmp_path) -> None:
    from lorakit import cli
    from lorakit.cli.finetune import _job

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"")  # _job checks the files are there, not their contents
    (tmp_path / "d.jsonl").write_text('{"text": "a b"}\n')
    argv = ["finetune", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "d.jsonl"), "--task", "causal-lm"]
    argv += ["--out", str(tmp_path / "o")]
    assert _job(cli.build_parser().parse_args([*argv, "--offload-activations"])).train.offload_activations is True
    assert _job(cli.build_parser().parse_args(argv)).train.offload_activations is False
