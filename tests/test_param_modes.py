"""LoRA on expert parameters under the ways models are run, each pinned against a plain run, PEFT, or the formula.

Gradient checkpointing, torch.compile, threads, no_grad / inference_mode, bf16 autocast, double backward,
dropout drawn per adapted weight and call, and the memory claim: the routed forward never forms an
(experts, d_in, d_out)-sized tensor.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from _moe_models import tiny_qwen3_moe
from _peft_params import copy_into_peft, peft_grads, peft_params_model, peft_wrappers
from torch.utils._python_dispatch import TorchDispatchMode

import lorakit as lk
from lorakit.ops import dropout_keep
from lorakit.param_layers import param_paths

IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]


def randomise(model, seed=7):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


@pytest.fixture(scope="module")
def base():
    return tiny_qwen3_moe()


def lora_model(base, dropout=0.0):
    cfg = lk.LoraConfig(rank=2, alpha=4, dropout=dropout)
    return randomise(lk.apply_lora(copy.deepcopy(base), cfg, target_parameters=EXPERTS))


def factor_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def routed_inputs(T=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, 16, generator=g)
    index = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(T)])
    weights = torch.softmax(torch.randn(T, 2, generator=g), -1)
    return hidden, index, weights


def test_gradient_checkpointing_gives_the_plain_loss_and_gradients_with_dropout(base):
    def step(model):
        torch.manual_seed(5)
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        return loss.detach(), factor_grads(model)

    want_loss, want = step(lora_model(base, dropout=0.2).train())
    model = lora_model(base, dropout=0.2).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    got_loss, got = step(model)
    assert got.keys() == want.keys() and want
    torch.testing.assert_close(got_loss, want_loss)
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=name)


@pytest.mark.slow
def test_compiled_experts_match_eager_forward_and_gradients(base):
    model = lora_model(base)
    layer = model.model.layers[0].mlp.experts
    hidden, index, weights = routed_inputs()
    want = layer(hidden, index, weights)
    want.square().sum().backward()
    want_grads = factor_grads(layer)
    layer.zero_grad()
    got = torch.compile(layer, backend="aot_eager")(hidden, index, weights)  # dynamo + AOT autograd, no codegen
    got.square().sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for name, g in factor_grads(layer).items():
        torch.testing.assert_close(g, want_grads[name], rtol=1e-5, atol=1e-5)


def test_two_threads_get_what_each_gets_alone(base):
    model = lora_model(base)
    inputs = [IDS, IDS.flip(1)]
    with torch.no_grad():
        alone = [model(x).logits for x in inputs]
    got: list = [None, None]
    start = threading.Barrier(2)

    def run(i):
        start.wait()
        with torch.no_grad():
            for _ in range(3):
                got[i] = model(inputs[i]).logits

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(g, a) for g, a in zip(got, alone, strict=True))


def test_no_grad_and_inference_mode_compute_the_grad_mode_output(base):
    model = lora_model(base)
    want = model(IDS).logits.detach()
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, want)
    with torch.inference_mode():
        assert torch.equal(model(IDS).logits, want)


def test_bf16_autocast_runs_in_bf16_and_stays_near_fp32(base):
    model = lora_model(base)
    want = model(IDS).logits
    want.square().sum().backward()
    want_grads = factor_grads(model)
    model.zero_grad()
    layer = model.model.layers[0].mlp.experts
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(*routed_inputs()).dtype == torch.float32  # the module's output dtype is its input's
        got = model(IDS).logits
    got.float().square().sum().backward()
    torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.05)
    for name, g in factor_grads(model).items():
        assert g.dtype == torch.float32
        cos = torch.nn.functional.cosine_similarity(g.flatten(), want_grads[name].flatten(), dim=0)
        assert cos > 0.98, name


def test_double_backward_equals_peft(base):
    """Second derivatives through the routed forward: d/dB of |dL/dA|², against PEFT's plain autograd (on one
    experts module: the attention kernels have no double backward), in float64 so that only the math differs."""
    ours = lora_model(base).double()
    eager = copy.deepcopy(base)
    eager.config._experts_implementation = "eager"  # grouped_mm has no float64
    theirs = peft_params_model(eager, EXPERTS).double()
    copy_into_peft(ours, theirs)
    layers = param_paths(lk.lora_layers(ours))
    wrappers = peft_wrappers(theirs)
    inputs = [t.double() if t.is_floating_point() else t for t in routed_inputs()]
    for _, experts, factors_A in [
        (ours, ours.model.layers[0].mlp.experts, [layer.lora_A for layer in layers.values()]),
        (
            theirs,
            theirs.base_model.model.model.layers[0].mlp.experts,
            [wrappers[p].lora_A["default"].weight for p in layers],
        ),
    ]:
        loss = experts(*inputs).square().sum()
        grads = torch.autograd.grad(loss, factors_A[:2], create_graph=True, allow_unused=True)
        sum(g.square().sum() for g in grads if g is not None).backward()
    want = peft_grads(ours, theirs)
    for path, layer in layers.items():
        if ".layers.0." in path:
            assert layer.lora_B.grad is not None and layer.lora_B.grad.abs().sum() > 0
            torch.testing.assert_close(layer.lora_B.grad, want[path][1], rtol=1e-10, atol=1e-10)


def reference_experts(layer, hidden, index, weights, p):
    """The experts' formula token by token, with masks drawn as the fast path draws them: one (S, d_in) mask per
    adapted weight, rows in expert-sorted order, gate_up's first."""
    owner = layer.owner
    factors = {lp.param_name: lp.active_factors() for lp in layer.chain()}
    T, k = index.shape
    order = torch.sort(index.reshape(-1), stable=True).indices
    row = torch.empty_like(order)
    row[order] = torch.arange(order.numel())  # flat slot -> its row in sorted order
    keep_up, scale_up = dropout_keep((T * k, 16), p)
    keep_down, scale_down = dropout_keep((T * k, 12), p)
    out = torch.zeros_like(hidden)
    for t in range(T):
        for j in range(k):
            e, r = int(index[t, j]), int(row[t * k + j])
            A, B, cfg = factors["gate_up_proj"]
            x = hidden[t]
            gu = owner.gate_up_proj[e] @ x + cfg.scaling * B[e] @ (A[e] @ (x * keep_up[r] * scale_up))
            h = owner._apply_gate(gu)
            A, B, cfg = factors["down_proj"]
            y = owner.down_proj[e] @ h + cfg.scaling * B[e] @ (A[e] @ (h * keep_down[r] * scale_down))
            out[t] += weights[t, j] * y
    return out


def test_dropout_draws_a_mask_per_adapted_weight_and_call(base):
    model = lora_model(base, dropout=0.3).train()
    layer = model.model.layers[0].mlp.experts
    hidden, index, weights = routed_inputs()
    torch.manual_seed(9)
    got = layer(hidden, index, weights)
    torch.manual_seed(9)
    want = reference_experts(layer, hidden, index, weights, 0.3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    again = layer(hidden, index, weights)  # the next call draws new masks
    assert not torch.allclose(again, got)
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(hidden, index, weights), reference_experts(layer, hidden, index, weights, 0.0))


class Allocations(TorchDispatchMode):
    """Records the element count of every tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.sizes: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.sizes.append((str(func), tuple(t.shape)))
        return out


def largest(record):
    return max(record.sizes, key=lambda s: torch.Size(s[1]).numel())


def test_the_training_forward_never_forms_an_expert_sized_delta(base):
    model = lora_model(base, dropout=0.1).train()
    layer = model.model.layers[0].mlp.experts
    smallest_stack = min(lp.param.numel() for lp in layer.chain())  # E · d_in · d_out of the smaller weight
    hidden, index, weights = routed_inputs()
    hidden.requires_grad_(True)
    with Allocations() as seen:
        layer(hidden, index, weights).square().sum().backward()
    func, shape = largest(seen)
    assert torch.Size(shape).numel() < smallest_stack, f"{func} made a {shape} tensor"
    with Allocations() as materialised:  # the check sees a delta where one is formed: W + s·B A
        layer.chain()[0].adapted()
    assert torch.Size(largest(materialised)[1]).numel() >= smallest_stack
