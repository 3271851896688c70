"""LoRA dropout: every layer draws its own mask at every call (the LoRA paper's and PEFT's semantics).

No draw is shared between sibling layers reading one input (q/k/v, gate/up) or between models, and
nothing is kept between calls: `lorakit.ops` holds no mutable state. The masks a forward used are
recovered by re-seeding torch's default generator and drawing them again with `ops.dropout_keep`.
"""

import gc
import types
import weakref

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit import ops, ops_linear

P = 0.3


def layers(n=2, d_in=16, d_outs=(8, 12), p=P):
    """`n` LoRA linear layers reading d_in features, with random B so that the branch matters."""
    torch.manual_seed(0)
    out = []
    for d_out in d_outs[:n]:
        layer = lk.with_lora(nn.Linear(d_in, d_out), lk.LoraConfig(rank=4, dropout=p)).train()
        with torch.no_grad():
            layer.lora_B.normal_()
        out.append(layer)
    return out


def reference(layer, x, keep, scale):
    """The layer's formula written naively in fresh autograd leaves, with the given mask."""
    A, B = (t.detach().clone().requires_grad_(True) for t in (layer.lora_A, layer.lora_B))
    y = ops.lora_linear_reference(x, layer.base.weight, layer.base.bias, A, B, layer.scaling, keep, scale)
    return y, A, B


def test_siblings_reading_one_input_draw_independent_masks_and_match_the_formula():
    q, k = layers()
    x = torch.randn(5, 7, 16, requires_grad=True)
    torch.manual_seed(11)
    yq, yk = q(x), k(x)
    torch.manual_seed(11)  # the same two draws, in call order
    (keep_q, scale), (keep_k, _) = ops.dropout_keep((35, 16), P), ops.dropout_keep((35, 16), P)
    assert not torch.equal(keep_q, keep_k)
    g_q, g_k = torch.randn_like(yq), torch.randn_like(yk)
    ((yq * g_q).sum() + (yk * g_k).sum()).backward()
    x_ref = x.detach().clone().requires_grad_(True)
    rq, Aq, Bq = reference(q, x_ref, keep_q, scale)
    rk, Ak, Bk = reference(k, x_ref, keep_k, scale)
    torch.testing.assert_close(yq, rq)
    torch.testing.assert_close(yk, rk)  # before the fix k reused q's mask: off by ~1
    ((rq * g_q).sum() + (rk * g_k).sum()).backward()
    for got, want in [
        (x.grad, x_ref.grad),
        (q.lora_A.grad, Aq.grad),
        (q.lora_B.grad, Bq.grad),
        (k.lora_A.grad, Ak.grad),
        (k.lora_B.grad, Bk.grad),
    ]:
        torch.testing.assert_close(got, want)


def test_two_models_fed_the_same_tensor_draw_different_masks():
    (a,), (b,) = layers(1), layers(1)  # two unrelated models, identical weights
    x = torch.randn(64, 16)
    torch.manual_seed(3)
    ya, yb = a(x), b(x)  # with identical weights, equal outputs would mean one shared mask
    assert not torch.equal(ya, yb)
    torch.manual_seed(3)
    keep_a, scale = ops.dropout_keep((64, 16), P)
    keep_b, _ = ops.dropout_keep((64, 16), P)
    torch.testing.assert_close(yb, reference(b, x, keep_b, scale)[0])
    torch.testing.assert_close(ya, reference(a, x, keep_a, scale)[0])


def test_a_repeated_call_draws_again_and_a_seed_replays_it():
    (a,) = layers(1)
    x = torch.randn(64, 16)
    torch.manual_seed(5)
    first = a(x)
    assert not torch.equal(first, a(x))
    torch.manual_seed(5)
    assert torch.equal(first, a(x))


def test_eval_and_zero_dropout_draw_nothing():
    (a,) = layers(1)
    (z,) = layers(1, p=0.0)
    x = torch.randn(8, 16)
    state = torch.get_rng_state()
    z(x)
    a.eval()
    a(x)
    with torch.no_grad():
        a(x)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("module", [ops, ops_linear], ids=lambda m: m.__name__)
def test_ops_holds_no_mutable_state(module):
    """Module-level names in lorakit.ops (and its linear fast path) are functions, classes, modules and
    immutable constants only."""
    immutable = (int, float, str, bytes, bool, tuple, frozenset, type(None))
    for name, value in vars(module).items():
        if name.startswith("__") or name == "annotations":
            continue
        ok = isinstance(value, (types.FunctionType, types.BuiltinFunctionType, types.ModuleType, type, *immutable))
        assert ok, f"{module.__name__}.{name} is a {type(value).__name__}: module-level state shared by every caller"


def test_nothing_outlives_the_model():
    """Once model, input and output are gone, no tensor shaped like the input or its mask is alive."""
    (a,) = layers(1, d_in=77, d_outs=(9,))
    x = torch.randn(1234, 77, requires_grad=True)
    ref = weakref.ref(x)
    a(x).sum().backward()
    del a, x
    gc.collect()
    assert ref() is None
    alive = [t for t in gc.get_objects() if type(t) is torch.Tensor and t.shape == (1234, 77)]
    assert not alive, f"{len(alive)} tensor(s) of the input's shape outlived the model"  # before: the mask and x·mask
