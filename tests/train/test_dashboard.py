"""The dashboard and plain logs, fed by a real run: sizes that fit 80×24 and wide screens, no control codes."""

from __future__ import annotations

import io
import re

import pytest
import torch
from rich.console import Console
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lorakit as lk
from lorakit.train import PlainLog, TrainConfig, Trainer
from lorakit.train.dashboard import Dashboard
from lorakit.ui.chart import line_chart

ANSI = re.compile(r"\x1b|\r|\x07")


def _run(callbacks: list) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 4, generator=g)
    data = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=16)
    torch.manual_seed(0)
    model = lk.apply_lora(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1)), lk.LoraConfig(rank=2), ["0"])
    Trainer(
        model,
        TrainConfig(epochs=3, lr=1e-2, device="cpu", log_every=2),
        loss_fn=nn.functional.mse_loss,
        callbacks=callbacks,
        metrics={"mae": lambda o, y: (o - y).abs().mean()},
    ).fit(data, data)


@pytest.mark.parametrize("width, height, rss", [(80, 24, None), (200, 50, None), (60, 20, None), (60, 20, 12345.0)])
def test_dashboard_fits_the_terminal(width: int, height: int, rss, monkeypatch) -> None:
    if rss is not None:  # a process past 1,000 MiB (the test suite's own, late in a run) once lost the label at 60
        from lorakit.train import dashboard

        monkeypatch.setattr(dashboard, "peak_memory_mib", lambda device: (rss, "rss"))
    screen = Console(file=io.StringIO(), width=width, height=height, force_terminal=True, color_system="truecolor")
    dash = Dashboard(console=screen, title="test run")
    _run([dash])
    assert dash.live is None  # stopped at the end
    frame = Console(file=io.StringIO(), width=width, height=height, record=True)
    frame.print(dash.render())
    lines = frame.export_text().rstrip("\n").splitlines()
    assert len(lines) <= height - 2, "\n".join(lines)
    assert all(len(line) == min(width, 120) for line in lines), "\n".join(lines)
    text = "\n".join(lines)
    for needle in (
        "test run · done",
        "epoch 3/3",
        "step 48/48",
        "ETA done",
        "train loss",
        "valid loss",
        "lr",
        "samples/s",
        "params",
        "(",
        "peak RSS",
        "elapsed",
        "── train",
        "── valid",
    ):
        assert needle in text, needle
    # MiB below 1,000 MiB, GiB from there (a long test run's own process gets there)
    assert re.search(r"peak RSS +(12\.1 GiB)" if rss else r"peak RSS +\d[\d.]* [MG]iB", text), text
    assert re.search(r"[\u2801-\u28ff]", text), "no chart dots"


def test_plain_log_is_greppable_lines_without_control_codes() -> None:
    out = io.StringIO()
    _run([PlainLog(out)])
    lines = out.getvalue().splitlines()
    assert not ANSI.search(out.getvalue())
    assert lines[0].startswith("start device=cpu precision=fp32 epochs=3 steps=48 ")
    assert [line.split()[0] for line in lines].count("step") == 24
    assert [line.split()[0] for line in lines].count("epoch") == 3
    assert lines[-1].startswith("done steps=48 ")
    for line in lines:
        assert all("=" in field for field in line.split()[1:]), line
    assert "valid_mae=" in [line for line in lines if line.startswith("epoch ")][-1]


def test_chart_draws_each_series_and_axis_labels() -> None:
    train = [(i, 2.0 / (i + 1)) for i in range(50)]
    chart = line_chart([("train", train, "cyan"), ("valid", [(10, 0.5), (49, 0.1)], "magenta")], 60, 10)
    lines = chart.plain.splitlines()
    assert len(lines) == 10 and all(len(line) <= 60 for line in lines)
    assert lines[0].strip().startswith("2 ┤") and lines[7].lstrip().startswith("0.04 ┤")
    assert lines[-1].split() == ["0", "49"]
    styles = {span.style for span in chart.spans}
    assert {"cyan", "magenta"} <= styles


def _llm_run(callbacks: list) -> None:
    """A tiny Llama with a valid loader, a reference text and eval_every=4: 2 epochs of 6 steps."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    try:
        from test_forgetting import _adapted, _reference, _train_batches
    finally:
        sys.path.pop(0)
    from lorakit.train import ReferenceKL

    model, _ = _adapted()
    cfg = TrainConfig(epochs=2, lr=1e-2, device="cpu", eval_every=4, log_every=2)
    Trainer(model, cfg, callbacks=callbacks, reference=ReferenceKL(_reference())).fit(
        _train_batches(), _train_batches(2)
    )


def test_dashboard_shows_the_latest_evaluation_with_its_kl_and_step() -> None:
    from lorakit.train import Evaluated

    screen = Console(file=io.StringIO(), width=80, height=24, force_terminal=True, color_system="truecolor")
    dash = Dashboard(console=screen, title="llm")
    frames: list[str] = []

    def snap(event: object) -> None:  # after the dashboard took the event
        if isinstance(event, Evaluated):
            frame = Console(file=io.StringIO(), width=80, height=24, record=True)
            frame.print(dash.render())
            frames.append(frame.export_text())

    _llm_run([dash, snap])
    assert len(frames) == 2  # steps 4 and 8; 12 is the last epoch's own evaluation
    assert "eval @ step 4" in frames[0] and "kl_ref" in frames[0] and "(best " in frames[0]
    frame = Console(file=io.StringIO(), width=80, height=24, record=True)
    frame.print(dash.render())
    lines = frame.export_text().rstrip("\n").splitlines()
    assert len(lines) <= 22 and all(len(line) == 80 for line in lines), "\n".join(lines)
    text = "\n".join(lines)
    assert "eval @ step 12" in text and "kl_ref" in text and "llm · done" in text
    kl = float(re.search(r"kl_ref\s+([0-9.e-]+)", text).group(1))
    assert kl > 0


def test_plain_log_writes_eval_lines_with_kl_ref() -> None:
    out = io.StringIO()
    _llm_run([PlainLog(out)])
    lines = out.getvalue().splitlines()
    evals = [line for line in lines if line.startswith("eval ")]
    assert [line.split()[2] for line in evals] == ["step=4/12", "step=8/12"]
    for line in evals:
        assert all("=" in field for field in line.split()[1:]), line
        assert " valid_loss=" in line and " kl_ref=" in line and " best_valid_loss=" in line
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert len(epochs) == 2 and all(" kl_ref=" in line for line in epochs)


DPO_NAMES = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen")


@pytest.mark.parametrize("width, height", [(80, 24), (120, 40), (60, 20)])
def test_dashboard_shows_every_metric_named_as_trl_names_them(width: int, height: int) -> None:
    """DPO's six statistics (names with '/') and their validation values, packed under the numbers, on as many lines
    as the terminal has beyond a 4-row chart: all of them at 80×24, none cut mid-name."""
    from lorakit.train import Evaluated, RunStarted, StepLogged

    names = (*DPO_NAMES, "logps/rejected")
    values = {n: -0.125 * (i + 1) for i, n in enumerate(names)}
    dash = Dashboard(console=Console(file=io.StringIO(), width=width, height=height), title="dpo")
    dash.start = RunStarted(2, 6, 12, 1, 0, 1000, 100000, "cpu", "fp32", None)
    dash(StepLogged(1, 4, 4, 6, 0.69, 1e-3, None, 100.0, 1.0, metrics=values, unit="tokens"))
    dash(Evaluated(1, 4, 0.6, 0.6, True, 1.0, metrics={n: v / 2 for n, v in values.items()}))
    frame = Console(file=io.StringIO(), width=width, height=height, record=True)
    frame.print(dash.render())
    lines = frame.export_text().rstrip("\n").splitlines()
    assert len(lines) <= height - 2 and all(len(line) == min(width, 120) for line in lines), "\n".join(lines)
    text = "\n".join(lines)
    shown = re.findall(r"(valid_)?([a-z_]+/[a-z_]+) (-?[0-9.]+)", text)
    assert all(float(v) == (values[n] / 2 if valid else values[n]) for valid, n, v in shown), shown
    if width >= 80:
        assert {n for valid, n, _ in shown if not valid} == set(names), text
    assert re.search(r"[\u2801-\u28ff]", text), "no chart dots"
