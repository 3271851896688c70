"""DPOObjective in the modes users train in: gradient checkpointing (both modes), torch.compile, another thread,
inference_mode for the cached reference, bf16 autocast — each against the plain eager step of test_dpo.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from lorakit.train import DPOConfig, DPOObjective
from lorakit.train.dpo import reference_logps

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))
from _tiny_models import llama  # noqa: E402
from test_dpo import ROWS, collate, lora_factors, lorakit_step, policy_model  # noqa: E402


@pytest.fixture(scope="module")
def base() -> torch.nn.Module:
    return llama()


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    return collate(ROWS)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(base, batch, reentrant):
    model = policy_model(base)
    calls = []
    hook = model.model.layers[0].mlp.act_fn.register_forward_hook(lambda *_: calls.append(1))
    config = DPOConfig(beta=0.1)
    want_loss, _, want = lorakit_step(model, config, batch)
    plain_calls = len(calls)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    try:
        loss, _, grads = lorakit_step(model, config, batch)
    finally:
        model.gradient_checkpointing_disable()
        hook.remove()
    assert len(calls) - plain_calls == plain_calls + 1  # the backward pass ran the layer again
    # the reentrant mode runs the first forward under no_grad, where LoRA's inference formulation may fold B·A
    # into another GEMM (ops_linear._fold_pays): equal to float32 rounding there, bit for bit otherwise
    rounding = {"rtol": 1.3e-6, "atol": 1e-5}  # torch's float32 default, as tests/test_modes.py's reentrant check
    torch.testing.assert_close(loss, want_loss, **(rounding if reentrant else {"rtol": 0, "atol": 0}))
    for name, grad in grads.items():
        torch.testing.assert_close(grad, want[name], **(rounding if reentrant else {"rtol": 1e-6, "atol": 1e-8}))


def test_compile_threads_and_inference_mode_give_the_eager_values(base, batch):
    """The objective through torch.compile (aot_eager) and on another thread gives the eager loss and gradients;
    the reference log-probs computed under inference_mode are the no_grad ones."""
    import threading

    model = policy_model(base)
    config = DPOConfig(beta=0.1)
    want_loss, _, want = lorakit_step(model, config, batch)
    want = {n: g.clone() for n, g in want.items()}
    model.zero_grad()
    out = DPOObjective(model, config)(torch.compile(model, backend="aot_eager"), batch)
    out.loss.backward()
    torch.testing.assert_close(out.loss.detach(), want_loss, rtol=1e-6, atol=1e-7)
    for name, p in lora_factors(model).items():
        torch.testing.assert_close(p.grad, want[name], rtol=1e-5, atol=1e-7)
    got: list = []
    worker = threading.Thread(target=lambda: got.append(lorakit_step(model, config, batch)))
    worker.start()
    worker.join()
    torch.testing.assert_close(got[0][0], want_loss, rtol=0, atol=0)
    for name, grad in got[0][2].items():
        torch.testing.assert_close(grad, want[name], rtol=0, atol=0)
    args = {"config": config, "batch_size": 2, "device": torch.device("cpu")}
    plain = reference_logps(model, ROWS, collate, **args)
    with torch.inference_mode():
        inferred = reference_logps(model, ROWS, collate, **args)
    assert inferred == plain


def test_bf16_autocast_runs_and_stays_near_float32(base, batch):
    model = policy_model(base)
    config = DPOConfig(beta=0.1)
    want_loss, _, _ = lorakit_step(model, config, batch)
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = DPOObjective(model, config)(model, batch)
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and out.outputs.dtype == torch.float32
    assert abs(out.loss.item() - want_loss.item()) < 0.02
    assert all(torch.isfinite(p.grad).all() for p in lora_factors(model).values())
    # the cached reference under bf16 is what a bf16 step computes in it
    cpu = torch.device("cpu")
    logps = reference_logps(model, ROWS, collate, config=config, batch_size=3, device=cpu, bf16=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        chosen, rejected = DPOObjective(model, config)._reference(batch)
    assert logps == list(zip(chosen.tolist(), rejected.tolist(), strict=True))
