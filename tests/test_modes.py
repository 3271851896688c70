"""LoRA layers under the ways models are run, each pinned against the same run done plainly or the naive formula.

Gradient checkpointing (transformers' and torch's, reentrant and not), torch.compile of a training step,
threads, inference-mode tensors and vmap of grad; no_grad / inference_mode, autocast, torch.func, forward-mode AD
and double backward are in test_modes_formula.py. All with dropout on, where it applies: dropout masks are drawn
inside the forward, so every mode must see the masks an ordinary run would.
"""

import sys
import threading
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import lorakit as lk
from lorakit import ops

sys.path.insert(0, str(Path(__file__).parent))
from _numerics import rel  # noqa: E402

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def randomise_B(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(got, want):
    assert got.keys() == want.keys() and want
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=name)


# -- gradient checkpointing ---------------------------------------------------------------------------


def lora_llama():
    pytest.importorskip("transformers")
    sys.path.insert(0, str(Path(__file__).parent))
    from _tiny_models import llama

    model = lk.apply_lora(llama(), lk.LoraConfig(rank=4, alpha=8.0, dropout=0.1), LLAMA_TARGETS)
    return randomise_B(model).train()


@pytest.mark.slow
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_hf_gradient_checkpointing_gives_the_plain_loss_and_gradients(use_reentrant):
    """Issue 12 defect 1: the reentrant mode gave loss 4.6124 vs 4.6155 and gradients off by 0.26."""
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))

    def step(model):
        torch.manual_seed(5)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), lora_grads(model)

    want_loss, want = step(lora_llama())
    model = lora_llama()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    model.enable_input_require_grads()  # the reentrant mode needs an input that requires grad
    got_loss, got = step(model)
    torch.testing.assert_close(got_loss, want_loss)
    assert_same_grads(got, want)


def sibling_pair(kind):
    """Two LoRA layers that read the same input (as q and k do), dropout 0.2, and that input."""
    torch.manual_seed(0)
    cfg = lk.LoraConfig(rank=4, alpha=8.0, dropout=0.2)
    if kind == "linear":
        pair = [lk.with_lora(nn.Linear(16, d), cfg) for d in (8, 12)]
        x = torch.randn(4, 6, 16, requires_grad=True)
    else:
        pair = [lk.with_lora(nn.Conv2d(3, d, 3, padding=1), cfg) for d in (4, 5)]
        x = torch.randn(2, 3, 6, 6, requires_grad=True)
    return [randomise_B(layer, seed=i).train() for i, layer in enumerate(pair)], x


@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_checkpoint_around_one_sibling_gives_the_plain_loss_and_gradients(kind, use_reentrant):
    (q, k), x = sibling_pair(kind)

    def step(checkpointed):
        for t in (x, *q.parameters(), *k.parameters()):
            t.grad = None
        torch.manual_seed(7)
        yq = q(x)
        yk = checkpoint(k, x, use_reentrant=use_reentrant) if checkpointed else k(x)
        loss = yq.square().mean() + yk.square().mean()
        loss.backward()
        return loss.detach(), {
            "x": x.grad.clone(),
            **{f"q.{n}": g for n, g in lora_grads(q).items()},
            **{f"k.{n}": g for n, g in lora_grads(k).items()},
        }

    want_loss, want = step(False)
    got_loss, got = step(True)
    torch.testing.assert_close(got_loss, want_loss)
    assert_same_grads(got, want)


# -- torch.compile ------------------------------------------------------------------------------------


def lora_mlp(p=0.1):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    return randomise_B(lk.apply_lora(model, lk.LoraConfig(rank=4, alpha=8.0, dropout=p), ["0", "2"])).train()


@pytest.mark.slow
@pytest.mark.parametrize("backward_in_graph", [True, False])
def test_compiled_training_step_with_dropout_matches_eager(backward_in_graph):
    """fullgraph=True over forward, loss and backward; aot_eager runs the captured graph with eager's RNG."""
    torch._dynamo.reset()
    model = lora_mlp()
    x, t = torch.randn(64, 16), torch.randn(64, 8)

    def step(x, t):
        loss = (model(x) - t).square().mean()
        if backward_in_graph:
            loss.backward()
            return loss.detach()
        return loss

    def run(fn):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        loss = fn(x, t)
        if not backward_in_graph:
            loss.backward()
        return loss.detach(), lora_grads(model)

    with torch._dynamo.config.patch(trace_autograd_ops=True):  # lets dynamo trace loss.backward()
        got_loss, got = run(torch.compile(step, fullgraph=True, backend="aot_eager"))
    want_loss, want = run(step)
    torch.testing.assert_close(got_loss, want_loss)
    assert_same_grads(got, want)


@pytest.mark.slow
def test_inductor_compiles_a_training_step_with_dropout():
    """The real compiler draws with its own RNG (masks differ from eager's), so: one graph, seeded, and live."""
    torch._dynamo.reset()
    model = lora_mlp(p=0.5)
    x, t = torch.randn(64, 16), torch.randn(64, 8)

    def step(x, t):
        loss = (model(x) - t).square().mean()
        loss.backward()
        return loss.detach()

    with torch._dynamo.config.patch(trace_autograd_ops=True):
        compiled = torch.compile(step, fullgraph=True)
        losses = []
        for seed in (1, 1, 2):
            model.zero_grad(set_to_none=True)
            torch.manual_seed(seed)
            losses.append(compiled(x, t))
    assert torch.equal(losses[0], losses[1]) and not torch.equal(losses[0], losses[2])
    assert all(torch.isfinite(g).all() for g in lora_grads(model).values())


# -- threads ------------------------------------------------------------------------------------------


def test_threads_training_their_own_models_see_only_their_own_draws():
    """Four threads, each training its own sibling pair on one shared batch (issue 12 defect 2: a process-wide
    cache handed one thread's mask and dropped input to another). Every forward draws a mask no other layer
    or thread drew, its output matches the formula with that very mask, and so do its gradients."""
    x = torch.randn(128, 16)  # the same batch object in every thread
    failures: list[str] = []
    masks: list[bytes] = []
    models = [sibling_pair("linear")[0] for _ in range(4)]  # built here: sibling_pair seeds the global generator
    scale = ops.dropout_keep((0,), 0.2)[1]  # 1/(1 - p) for p as realised (an empty draw)

    def work(seed):
        try:
            q, k = models[seed]
            for step in range(40):
                for layer in (q, k):
                    y = layer(x)
                    keep = y.grad_fn.saved_tensors[-1]  # the mask this call drew and saved for backward
                    assert keep.dtype == torch.bool and keep.shape == x.shape
                    masks.append(keep.numpy().tobytes())
                    ref, A, B = naive(layer, x, keep, scale)
                    g = torch.randn_like(y)
                    y.backward(g)
                    ref.backward(g)
                    for name, got, want in [
                        ("y", y, ref),
                        ("dA", layer.lora_A.grad, A.grad),
                        ("dB", layer.lora_B.grad, B.grad),
                    ]:
                        assert rel(got, want) <= 1e-5, f"step {step}, {name}: relative error {rel(got, want):.2e}"
                    with torch.no_grad():
                        for p in (layer.lora_A, layer.lora_B):
                            p -= 1e-3 * p.grad
                            p.grad = None
        except Exception as e:  # noqa: BLE001  reported from the main thread
            failures.append(f"thread {seed}: {e!r}"[:400])

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        sys.setswitchinterval(interval)
    assert not failures, failures
    assert len(masks) == 4 * 40 * 2
    assert len(set(masks)) == len(masks), f"{len(masks) - len(set(masks))} forwards reused another's mask"


def naive(layer, x, keep, scale):
    """The layer's formula in fresh autograd leaves for A and B, with the given mask."""
    A, B = (t.detach().clone().requires_grad_(True) for t in (layer.lora_A, layer.lora_B))
    return ops.lora_linear_reference(x, layer.base.weight, layer.base.bias, A, B, layer.scaling, keep, scale), A, B


# -- inference-mode tensors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_inference_mode_tensor_feeds_a_training_forward(kind, p):
    """A tensor made under torch.inference_mode (a cached batch, say) trains as a normal one does."""
    (layer, _), x = sibling_pair(kind)
    layer.config = lk.LoraConfig(rank=4, alpha=8.0, dropout=p)
    with torch.inference_mode():
        x_inf = x.detach().clone()
    grads = []
    for inp in (x.detach(), x_inf):
        layer.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        layer(inp).square().mean().backward()
        grads.append(lora_grads(layer))
    assert_same_grads(grads[1], grads[0])


def test_per_sample_gradients_with_vmap_of_grad():
    """The Opacus-style use: per-example gradients of A and B of a LoRA layer via functional_call."""
    torch.manual_seed(0)
    layer = randomise_B(lk.with_lora(nn.Linear(16, 8), lk.LoraConfig(rank=4, alpha=8.0))).double()
    params = {n: p.detach() for n, p in layer.named_parameters() if "lora_" in n}
    xs, ts = torch.randn(6, 3, 16, dtype=torch.float64), torch.randn(6, 3, 8, dtype=torch.float64)

    def loss(params, x, t):
        return (torch.func.functional_call(layer, params, (x,)) - t).square().sum()

    got = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, xs, ts)
    for i in range(len(xs)):
        layer.zero_grad(set_to_none=True)
        W, b = layer.base.weight, layer.base.bias
        A, B = (params[n].clone().requires_grad_(True) for n in ("lora_A", "lora_B"))
        (ops.lora_linear_reference(xs[i], W, b, A, B, layer.scaling) - ts[i]).square().sum().backward()
        torch.testing.assert_close(got["lora_A"][i], A.grad)
        torch.testing.assert_close(got["lora_B"][i], B.grad)
