"""Compiled blocks (lorakit.train.compile, TrainConfig.compile): the LoRA op stays in the graph, and a compiled
run trains, resumes and evaluates as an eager one does.

A tiny Llama (hidden 32, 2 layers), LoRA on every projection with dropout 0.1, token batches of varying lengths
padded to a multiple (hf/batches.collate). aot_eager traces exactly what inductor is given (dynamo + AOT
autograd) without generating code, so it is the backend here except in the slow tests that pin inductor itself.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parents[1]))
transformers = pytest.importorskip("transformers")

import _tiny_models  # noqa: E402

import lorakit as lk  # noqa: E402
from lorakit.hf.batches import collate  # noqa: E402
from lorakit.train import TrainConfig, Trainer  # noqa: E402
from lorakit.train.compile import block_names, compile_blocks  # noqa: E402
from lorakit.train.events import CheckpointSaved, StepLogged  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PAD = 8


@pytest.fixture(scope="module", autouse=True)
def fresh_dynamo():
    """Dynamo's caches are per process: start and leave this module with none (its recompile counts are exact)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def lora_llama(gradient_checkpointing: bool = False) -> nn.Module:
    """The tiny Llama, LoRA r4 dropout 0.1 on every projection, B nonzero (so A learns from step one), train mode."""
    model = _tiny_models.llama()
    lk.apply_lora(model, lk.LoraConfig(rank=4, alpha=8.0, dropout=0.1), TARGETS)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lk.lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def loader(n: int = 24, lengths: tuple[int, ...] = (5, 9, 13, 17, 21, 30), batch_size: int = 4) -> DataLoader:
    """Token rows of varying lengths, shuffled, padded per batch to a multiple of PAD."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        ids = torch.randint(3, 100, (lengths[i % len(lengths)],), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": ids})
    shuffle = torch.Generator().manual_seed(2)
    pad = functools.partial(collate, pad_id=0, pad_multiple=PAD)
    return DataLoader(rows, batch_size=batch_size, shuffle=True, generator=shuffle, collate_fn=pad)  # type: ignore[arg-type]


def fit(model: nn.Module, compile: bool, steps: int, out: Path | None = None, **kw) -> list[float]:
    """Train `steps` optimizer steps; the loss of every step."""
    losses: list[float] = []
    callbacks = [lambda e: losses.append(e.loss) if isinstance(e, StepLogged) else None, *kw.pop("callbacks", [])]
    resume = kw.pop("resume", False)
    lr = kw.pop("lr", 1e-2)
    cfg = TrainConfig(max_steps=steps, lr=lr, device="cpu", seed=3, log_every=1, compile=compile, **kw)
    trainer = Trainer(model, cfg, callbacks=callbacks, artifact_dir=out)
    trainer.fit(loader(), resume=resume)
    assert not compile or trainer.compiled is not None
    return losses


def test_the_lora_op_leaves_no_graph_break_in_a_decoder_layer():
    model = lora_llama()
    x = torch.randn(2, 8, 32, requires_grad=True)
    positions = torch.arange(8)[None].expand(2, 8)
    emb = model.model.rotary_emb(x, positions)
    explained = torch._dynamo.explain(model.model.layers[0])(x, position_embeddings=emb, position_ids=positions)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_the_repeated_block_is_found_or_the_whole_model_is_compiled():
    assert block_names(lora_llama()) == ("LlamaDecoderLayer", ("model.layers.0", "model.layers.1"))
    listed = nn.Sequential(nn.Linear(2, 2), nn.ModuleList([nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2)]))
    assert block_names(listed) == ("Linear", ("1.0", "1.2"))
    assert block_names(nn.Linear(2, 2)) == ("Linear", ("",))
    with pytest.raises(TypeError, match="nn.Module"):
        compile_blocks("model")  # type: ignore[arg-type]


def test_padding_to_a_multiple_leaves_the_loss_unchanged():
    model = lora_llama().eval()
    rows = [
        {"input_ids": [5, 6, 7], "labels": [5, 6, 7]},
        {"input_ids": [8, 9, 10, 11, 12], "labels": [-100, 9, 10, 11, 12]},
    ]
    plain, padded = collate(rows, pad_id=0), collate(rows, pad_id=0, pad_multiple=PAD)
    assert plain["input_ids"].shape == (2, 5) and padded["input_ids"].shape == (2, PAD)
    assert (padded["labels"][:, 5:] == -100).all() and (padded["attention_mask"][:, 5:] == 0).all()
    with torch.no_grad():
        torch.testing.assert_close(model(**padded).loss, model(**plain).loss, rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def compiled_run():  # ~15 s (dynamo + AOT autograd trace each graph): the tests using it are slow
    """A compiled (aot_eager) run of 8 steps with its losses and Compiled record, and the eager run's losses."""
    eager = fit(lora_llama(), compile=False, steps=8)
    model = lora_llama()
    compiled = compile_blocks(model, backend="aot_eager")
    losses = fit(model, compile=True, steps=8)
    return model, compiled, losses, eager


@pytest.mark.slow
def test_a_compiled_run_trains_as_the_eager_run(compiled_run):
    _, compiled, losses, eager = compiled_run
    assert compiled.modules == ("model.layers.0", "model.layers.1")
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(eager), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_recompiles_stay_bounded_over_lengths_padded_to_the_multiple(compiled_run):
    model, compiled, _, _ = compiled_run
    graphs = compiled.graphs  # 5 distinct padded lengths so far (8..32): static first, then one length-generic
    assert compiled.recompiles <= 2 and compiled.compile_s > 0
    for n in (33, 41, 50, 57, 64):  # five more lengths: the length-generic graphs take them
        ids = torch.randint(3, 100, (4, -(-n // PAD) * PAD))
        model(input_ids=ids, labels=ids).loss.backward()
    assert compiled.graphs - graphs <= 2  # at most one more per input variant, not one per length (10)


@pytest.mark.slow
def test_evaluation_without_gradients_after_compiled_training(compiled_run):
    model, compiled, _, _ = compiled_run
    torch._dynamo.reset()  # so that evaluation compiles its own graphs (not run eager past the recompile limit)
    graphs = compiled.graphs
    eager = lora_llama()
    eager.load_state_dict(model.state_dict())
    ids = torch.randint(3, 100, (2, 16))
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            torch.testing.assert_close(model.eval()(input_ids=ids).logits, eager.eval()(input_ids=ids).logits)
    assert compiled.graphs > graphs
    means = Trainer(model, TrainConfig(device="cpu"), callbacks=[]).evaluate(loader(8))
    assert means["loss"] == pytest.approx(
        Trainer(eager, TrainConfig(device="cpu"), callbacks=[]).evaluate(loader(8))["loss"], rel=1e-5
    )


def test_compiling_a_checkpointing_model_is_refused_with_the_reason():
    """torch.utils.checkpoint disables dynamo inside it: a checkpointed block would silently run eager, so the
    Trainer refuses compile=True there, before anything runs, and finetune's resolve says why."""
    from lorakit.hf import speed

    model = lora_llama(gradient_checkpointing=True)
    with pytest.raises(ValueError, match="gradient checkpointing is on"):
        Trainer(model, TrainConfig(device="cpu", compile=True, max_steps=1), callbacks=[]).fit(loader(4))
    assert not any(getattr(m, "_compiled_call_impl", None) for m in model.modules())
    cfg = TrainConfig(device="cpu", max_steps=10_000)
    with pytest.raises(ValueError, match="gradient checkpointing is on"):
        speed.resolve(speed.SpeedConfig(compile="on"), lora_llama(), task="causal-lm", train=cfg, checkpointing=True)
    auto = speed.resolve(speed.SpeedConfig(), lora_llama(), task="causal-lm", train=cfg, checkpointing=True)
    assert not auto.compile


class Stop(Exception):
    """Ends a run right after its checkpoint at a given step."""


@pytest.mark.slow
def test_a_resumed_compiled_run_ends_with_the_uninterrupted_runs_bytes(tmp_path):
    torch._dynamo.reset()  # this test's graphs must not count against the others' recompile limit

    def compiled_model() -> nn.Module:
        model = lora_llama()
        compile_blocks(model, backend="aot_eager")
        return model

    fit(compiled_model(), compile=True, steps=6, out=tmp_path / "whole", checkpoint_every=3)

    def stop(e: object) -> None:
        if isinstance(e, CheckpointSaved) and e.step == 3:
            raise Stop

    with pytest.raises(Stop):
        fit(compiled_model(), compile=True, steps=6, out=tmp_path / "cut", checkpoint_every=3, callbacks=[stop])
    fit(compiled_model(), compile=True, steps=6, out=tmp_path / "cut", checkpoint_every=3, resume=True)
    whole, cut = (tmp_path / d / "adapter" / "adapter_model.safetensors" for d in ("whole", "cut"))
    assert whole.read_bytes() == cut.read_bytes()


@pytest.mark.slow
def test_inductor_matches_eager_over_50_steps_with_dropout():
    """The issue's requirement: with inductor (fallback_random: eager's dropout masks) the loss curve is eager's to
    1e-4 over 50 steps, at TrainConfig's default learning rate (1e-3). Measured: 4.8e-7 apart at most. At lr 1e-2
    the tiny model's curves drift apart (0.017 by step 50): Adam's normalised steps amplify the last-bit
    differences of inductor's reordered fp32 sums, not a different computation (the first steps agree)."""
    torch._dynamo.reset()  # this test's graphs must not count against the others' recompile limit
    from torch._dynamo.utils import counters

    eager = fit(lora_llama(), compile=False, steps=50, lr=1e-3)
    losses = fit(lora_llama(), compile=True, steps=50, lr=1e-3)  # the Trainer's own compile: inductor
    assert counters["stats"]["unique_graphs"] > 0  # the layers did run compiled (not eager past a recompile limit)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(eager), rtol=1e-4, atol=1e-4)


def test_finetunes_compile_setting_resolves_by_the_measured_rule():
    from lorakit.hf.speed import SpeedConfig, resolve
    from lorakit.variants.quant import quantize_base

    model = lora_llama()

    def resolved(choice: str, task: str = "causal-lm", **train):
        return resolve(SpeedConfig(compile=choice), model, task=task, train=TrainConfig(device="cpu", **train))

    assert (resolved("off", max_steps=10**6).compile, resolved("off").pad_multiple) == (False, 1)
    # auto stays eager, however long the run: compiled blocks did not pay on top of the fused ones end to end
    assert not resolved("auto").compile and not resolved("auto", max_steps=10**6).compile
    on = resolved("on")
    assert (on.compile, on.pad_multiple, on.items()["compile"]) == (True, PAD, "on")
    quantize_base(model, "int8")
    with pytest.raises(ValueError, match="compile='on' cannot be used: the base is quantised"):
        resolved("on")
    assert not resolved("auto", max_steps=10**6).compile


@pytest.mark.slow
def test_finetune_with_compile_on_end_to_end(tmp_path):
    """`finetune --compile on` as the CLI runs it in process: compiled blocks, padded batches, reported compile."""
    torch._dynamo.reset()  # this test's graphs must not count against the others' recompile limit
    import json

    import _hf_models

    from lorakit.hf.finetune import FinetuneJob, prepare, run
    from lorakit.hf.speed import SpeedConfig

    rows = [{"text": s} for s in _hf_models.SENTENCES] * 2
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    job = FinetuneJob(
        model=_hf_models.save_tiny("llama", tmp_path / "llama"),
        data=tmp_path / "train.jsonl",
        task="causal-lm",
        out=tmp_path / "out",
        lora=lk.LoraConfig(rank=4, alpha=8.0, dropout=0.1),
        batch_size=4,
        train=TrainConfig(max_steps=3, device="cpu", log_every=1),
        speed=SpeedConfig(compile="on"),
    )
    setup = prepare(job)
    assert setup.speed.compile and setup.speed.pad_multiple == PAD
    assert next(iter(setup.train_loader))["input_ids"].shape[1] % PAD == 0
    report = run(setup, callbacks=[])
    assert report["speed"]["compile"] is True
    steps = [json.loads(line) for line in (tmp_path / "out").rglob("metrics.jsonl").__next__().read_text().splitlines()]
    step_rows = [r for r in steps if r["kind"] == "step"]
    assert step_rows and all(r["compile_s"] > 0 and r["recompiles"] >= 0 for r in step_rows)
