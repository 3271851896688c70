"""`finetune --gradient-checkpointing` (hf/checkpointing.py): on while training, and the same loss and gradients.

The oracle is the same job without checkpointing: same seed, same batch, LoRA dropout 0.1 (each layer's mask is
drawn in its forward, so the recompute in the backward must draw it again identically). "On" is checked by
what checkpointing does: every checkpointed layer runs its forward twice per step, and the forward keeps fewer
tensors for the backward.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
transformers = pytest.importorskip("transformers")

import _hf_models  # noqa: E402

import lorakit as lk  # noqa: E402
from lorakit.hf import checkpointing  # noqa: E402
from lorakit.hf.finetune import FinetuneJob, prepare  # noqa: E402

transformers.utils.logging.set_verbosity_error()


@pytest.fixture(scope="module")
def job_files(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("gc")
    rows = [{"text": s} for s in _hf_models.SENTENCES] * 2
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return _hf_models.save_tiny("llama", root / "llama"), root / "train.jsonl"


def setup_for(job_files, tmp_path, checkpointed: bool):
    model_dir, rows = job_files
    job = FinetuneJob(
        model=model_dir,
        data=rows,
        task="causal-lm",
        out=tmp_path / f"out{checkpointed}",
        lora=lk.LoraConfig(rank=4, alpha=8.0, dropout=0.1),
        batch_size=4,
        gradient_checkpointing=checkpointed,
    )
    setup = prepare(job)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B = 0 at init would leave every lora_A gradient zero
        for layer in lk.lora_layers(setup.model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.3)
    return setup


def step(setup):
    """One training forward and backward: (loss, LoRA grads, forwards of layer 0's q_proj, bytes saved)."""
    model = setup.model.train()
    batch = next(iter(setup.train_loader))
    calls = []
    hook = model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *_: calls.append(1))
    saved: dict[int, int] = {}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def keep(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            saved[s.data_ptr()] = s.nbytes()
        return t

    torch.manual_seed(5)  # the dropout masks
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        loss = model(**batch).loss
    loss.backward()
    hook.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}
    return loss.detach(), grads, len(calls), sum(saved.values())


def test_checkpointing_is_on_and_gives_the_same_loss_and_gradients(job_files, tmp_path):
    plain, ckpt = setup_for(job_files, tmp_path, False), setup_for(job_files, tmp_path, True)
    assert not checkpointing.active(plain.model) and checkpointing.active(ckpt.model)
    want_loss, want, plain_calls, plain_saved = step(plain)
    got_loss, got, ckpt_calls, ckpt_saved = step(ckpt)
    assert (plain_calls, ckpt_calls) == (1, 2)  # the backward ran layer 0 again
    assert ckpt_saved < plain_saved / 2  # the layers' activations were not kept
    torch.testing.assert_close(got_loss, want_loss, atol=1e-6, rtol=1e-6)
    assert got.keys() == want.keys() and len(want) > 10
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-6, msg=name)
    assert any(g.abs().sum() > 0 for n, g in want.items() if "lora_A" in n)


def test_a_model_without_checkpointing_support_is_refused_by_name(job_files):
    model = transformers.AutoModelForCausalLM.from_pretrained(job_files[0])
    model.supports_gradient_checkpointing = False  # as transformers marks architectures without it
    with pytest.raises(ValueError, match=r"gradient_checkpointing=True: the 'llama' model \(LlamaForCausalLM\)"):
        checkpointing.enable(model)
