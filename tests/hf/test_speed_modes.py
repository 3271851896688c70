"""finetune's default speed path on a causal LM (fused blocks + the chunked loss, hf/speed.py) in the modes users
run: the same loss and LoRA gradients as the plain model under gradient checkpointing (both modes), in threads,
and under inference_mode. (torch.compile of the same path: tests/train/test_compile.py; fused ops alone:
tests/test_fused.py; the loss alone: tests/hf/test_causal_loss.py.)"""

from __future__ import annotations

import copy
import sys
import threading
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
pytest.importorskip("transformers")

from test_causal_loss import BATCHES, build, lora, loss_and_grads  # noqa: E402

from lorakit.hf import checkpointing, speed  # noqa: E402
from lorakit.train import TrainConfig  # noqa: E402
from lorakit.train import batch as batches  # noqa: E402


def fast_and_plain():
    """The same LoRA Llama twice: as finetune's speed settings resolve it on CPU (fused, chunked), and plain."""
    plain = lora(build("llama"))
    fast = copy.deepcopy(plain)
    resolved = speed.resolve(speed.SpeedConfig(loss="chunked"), fast, task="causal-lm", train=TrainConfig(device="cpu"))
    speed.apply(resolved, fast)
    assert resolved.fuse and resolved.loss == "chunked"
    objective = speed.objective(resolved, fast)
    assert objective is not None
    return fast, objective, plain


def assert_same(got, want):
    (out, grads), (out0, grads0) = got, want
    torch.testing.assert_close(out.loss, out0.loss, atol=1e-5, rtol=1e-5)
    assert grads.keys() == grads0.keys() and len(grads0) > 10
    for name, g in grads0.items():
        torch.testing.assert_close(grads[name], g, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_fused_and_chunked_equal_the_plain_model_under_gradient_checkpointing(reentrant):
    fast, objective, plain = fast_and_plain()
    b = BATCHES["padded-prompt-masked"]()
    want = loss_and_grads(plain, lambda: batches._mapping(plain, b, None))
    if reentrant:  # the reentrant variant needs an input that requires grad (transformers' own switch)
        fast.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        fast.enable_input_require_grads()
    else:
        checkpointing.enable(fast)  # as finetune turns it on
    assert checkpointing.active(fast)
    assert_same(loss_and_grads(fast, lambda: objective(fast, b)), want)


def test_fused_and_chunked_in_two_threads_equal_one_at_a_time():
    """Nothing is shared between calls: two threads, each its own model, get what each gets alone."""
    runs = [fast_and_plain()[:2] for _ in range(2)]
    b = BATCHES["packed"]()
    alone = [loss_and_grads(m, lambda m=m, o=o: o(m, b)) for m, o in runs]
    together: list = [None, None]

    def work(i: int) -> None:
        m, o = runs[i]
        together[i] = loss_and_grads(m, lambda: o(m, b))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(together, alone, strict=True):
        assert_same(got, want)


def test_fused_and_chunked_under_inference_mode_give_the_plain_loss():
    fast, objective, plain = fast_and_plain()
    b = BATCHES["padded-prompt-masked"]()
    with torch.inference_mode():
        want = batches._mapping(plain.eval(), b, None).loss
        got = objective(fast.eval(), b).loss
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
