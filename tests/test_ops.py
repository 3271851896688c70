"""The LoRA math's fast paths pinned against the naive formula (`ops.lora_linear_reference`).

Outputs and the gradients of x, A, B, bias (and a weight that asks for one) across shapes, ranks, dtypes,
dropout on/off, train/eval and grad/no-grad, nn.Linear's and Conv1D's weight layout; dropout is compared
with the same mask by re-seeding. Other ways of running (checkpointing, compile, threads, autocast,
torch.func) are in test_modes.py and test_modes_formula.py; dropout's semantics in test_dropout.py.
Tolerances: relative (norm) error ≤ 1e-5 in fp32, ≤ 1e-2 in bf16.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit as lk
from lorakit import ops
from lorakit.errors import LoraMergeError

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}

# (leading dims, d_in, d_out): few tokens take the unmerged path, many tokens (fp32) the folded-weight path;
# 30 tokens at 16 -> 40 fold the forward only (N > d_in, N < d_out), at 40 -> 16 the input gradient only
SHAPES = [
    ((3,), 16, 24),
    ((2, 5), 7, 3),
    ((64,), 16, 16),
    ((4, 40), 24, 40),
    ((1,), 1, 1),
    ((30,), 16, 40),
    ((30,), 40, 16),
]
RANKS = [1, 4, 8]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make(lead, d_in, d_out, r, dtype, bias, weight_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(dtype)  # noqa: E731
    x = t(*lead, d_in).requires_grad_()
    W = t(d_out, d_in, scale=d_in**-0.5).requires_grad_(weight_grad)
    b = t(d_out).requires_grad_() if bias else None
    A = t(r, d_in, scale=d_in**-0.5).requires_grad_()
    B = t(d_out, r, scale=0.5).requires_grad_()
    return x, W, b, A, B


def grads(y, inputs, gy):
    live = [t for t in inputs if t is not None and t.requires_grad]
    return torch.autograd.grad(y, live, gy)


# (the 1×1 layer is fp32 only: one bf16 element with cancelling terms has no meaningful relative error)
CASES = [
    c
    for c in itertools.product(SHAPES, RANKS, [torch.float32, torch.bfloat16], [0.0, 0.25], [True, False])
    if not (c[0][1] == 1 and c[2] == torch.bfloat16)
]


@pytest.mark.parametrize("shape,r,dtype,p,bias", CASES)
def test_train_matches_reference_outputs_and_grads(shape, r, dtype, p, bias):
    lead, d_in, d_out = shape
    x, W, b, A, B = make(lead, d_in, d_out, r, dtype, bias)
    gy = torch.randn(*lead, d_out, generator=torch.Generator().manual_seed(9)).to(dtype)
    torch.manual_seed(1234)
    y = ops.lora_linear(x, W, b, A, B, 1.5, p, True)
    got = grads(y, [x, A, B, b], gy)
    torch.manual_seed(1234)  # the same mask: dropout_keep is the first draw in the fast path
    keep, scale = ops.dropout_keep((x[..., 0].numel(), d_in), p) if p else (None, 1.0)
    # the reference runs in fp32 on the same (possibly bf16-valued) inputs
    f = [t.detach().float().requires_grad_(t.requires_grad) if t is not None else None for t in (x, W, b, A, B)]
    y_ref = ops.lora_linear_reference(*f, 1.5, keep, scale)
    want = grads(y_ref, [f[0], f[3], f[4], f[2]], gy.float())
    # bf16 rounds every product; on tiny tensors the naive formula in bf16 itself can miss 1e-2, so the
    # bound there is: within 1e-2 of exact, or no worse than 1.5× the naive formula's own bf16 error
    naive = [None] * 5
    if dtype != torch.float32:
        n = [t.detach().requires_grad_(t.requires_grad) if t is not None else None for t in (x, W, b, A, B)]
        y_n = ops.lora_linear_reference(*n, 1.5, keep, scale)
        naive = [y_n, *grads(y_n, [n[0], n[3], n[4], n[2]], gy)]
    assert y.dtype == dtype and y.shape == y_ref.shape
    for name, g_got, g_want, g_naive in zip(
        ["y", "x", "A", "B", "bias"], [y, *got], [y_ref, *want], naive, strict=False
    ):
        assert g_got.shape == g_want.shape, name
        bound = TOL[dtype] if g_naive is None else max(TOL[dtype], 1.5 * rel(g_naive, g_want))
        assert rel(g_got, g_want) <= bound, name


@pytest.mark.parametrize("shape,r,dtype", list(itertools.product(SHAPES, RANKS, [torch.float32, torch.bfloat16])))
@pytest.mark.parametrize("mode", ["eval", "no_grad"])
def test_eval_and_no_grad_match_reference(shape, r, dtype, mode):
    lead, d_in, d_out = shape
    x, W, b, A, B = make(lead, d_in, d_out, r, dtype, bias=True)
    ref = ops.lora_linear_reference(*(t.detach().float() for t in (x, W, b, A, B)), 0.75)
    if mode == "eval":  # dropout is off in eval, with grad or without
        y = ops.lora_linear(x, W, b, A, B, 0.75, dropout=0.3, training=False)
    else:
        with torch.no_grad():
            y = ops.lora_linear(x, W, b, A, B, 0.75, dropout=0.0, training=True)
    assert rel(y, ref) <= TOL[dtype]


@pytest.mark.parametrize("n", [2, 300])
def test_no_grad_dropout_uses_the_same_mask_rule(n):
    x, W, b, A, B = make((n,), 12, 10, 4, torch.float32, bias=True)
    torch.manual_seed(7)
    with torch.no_grad():
        y = ops.lora_linear(x, W, b, A, B, 2.0, 0.4, True)
    torch.manual_seed(7)
    keep, scale = ops.dropout_keep((n, 12), 0.4)
    assert rel(y, ops.lora_linear_reference(x, W, b, A, B, 2.0, keep, scale)) <= 1e-5


@pytest.mark.parametrize("n", [3, 200])
def test_weight_gradient_when_the_weight_asks_for_one(n):
    x, W, b, A, B = make((n,), 16, 8, 4, torch.float32, bias=True, weight_grad=True)
    y = ops.lora_linear(x, W, b, A, B, 2.0)
    y_ref = ops.lora_linear_reference(x, W, b, A, B, 2.0)
    gy = torch.randn_like(y)
    for g, g_ref in zip(grads(y, [x, W, b, A, B], gy), grads(y_ref, [x, W, b, A, B], gy), strict=False):
        assert rel(g, g_ref) <= 1e-5


def test_frozen_input_and_transposed_weight():
    """x without grad (a first layer) and a (d_in, d_out)-stored weight passed transposed (Conv1D)."""
    x, W, b, A, B = make((50,), 16, 12, 4, torch.float32, bias=False)
    x = x.detach()
    Wt = W.detach().t().contiguous().t()  # same values, (d_in, d_out) storage
    y = ops.lora_linear(x, Wt, None, A, B, 1.0)
    y_ref = ops.lora_linear_reference(x, W.detach(), None, A, B, 1.0)
    gy = torch.randn_like(y)
    assert rel(y, y_ref) <= 1e-5
    for g, g_ref in zip(grads(y, [A, B], gy), grads(y_ref, [A, B], gy), strict=False):
        assert rel(g, g_ref) <= 1e-5


def test_dropout_keep_rate_and_unbiased_scale():
    torch.manual_seed(0)
    keep, scale = ops.dropout_keep((1000, 100), 0.1)
    assert keep.dtype == torch.bool and keep.shape == (1000, 100)
    assert abs(keep.float().mean().item() - 0.9) < 0.005
    cut = round(0.1 * 65536)
    assert scale * (65536 - cut) / 65536 == pytest.approx(1.0, abs=1e-12)
    # fresh masks every call, reproducible under a seed
    assert not torch.equal(keep, ops.dropout_keep((1000, 100), 0.1)[0])
    torch.manual_seed(0)
    assert torch.equal(keep, ops.dropout_keep((1000, 100), 0.1)[0])


def test_layer_dropout_is_reproducible_and_train_only():
    layer = lk.with_lora(nn.Linear(16, 16), lk.LoraConfig(rank=4, alpha=8.0, dropout=0.5))
    nn.init.normal_(layer.lora_B)
    x = torch.randn(8, 16)
    torch.manual_seed(3)
    a = layer(x)
    torch.manual_seed(3)
    assert torch.equal(a, layer(x))
    assert not torch.equal(a, layer(x))  # a new mask
    layer.eval()
    assert torch.equal(layer(x), layer(x))


def test_delta_and_merged_weight_match_naive():
    A, B = torch.randn(4, 16), torch.randn(8, 4)
    delta = ops.delta_weight(A, B, 0.5)
    assert rel(delta, 0.5 * B @ A) <= 1e-6
    W = torch.randn(8, 16, dtype=torch.bfloat16)
    merged = ops.merged_weight(W, ops.delta_weight(A, B, 0.5))
    assert merged.dtype == torch.bfloat16
    assert torch.equal(merged, (W.float() + 0.5 * B @ A).to(torch.bfloat16))


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), -float("inf")])
def test_merged_weight_refuses_non_finite(bad):
    W = torch.zeros(4, 4)
    delta = torch.zeros(4, 4)
    delta[2, 1] = bad
    with pytest.raises(LoraMergeError, match="non-finite"):
        ops.merged_weight(W, delta)
    big = torch.full((2, 2), 3e38)  # finite in fp32, overflows bf16
    with pytest.raises(LoraMergeError):
        ops.merged_weight(big.to(torch.bfloat16), big.clone())


@pytest.mark.slow
@pytest.mark.parametrize("dropout", [0.0, 0.25])
@pytest.mark.parametrize("training", [True, False])
def test_lora_linear_compiles_fullgraph(training, dropout):
    """A LoRA layer traces as one graph (no graph breaks, dropout's draw included) and matches eager,
    forward and backward; aot_eager runs the graph on eager's generator, so one seed gives one mask."""
    torch._dynamo.reset()
    layer = lk.with_lora(nn.Linear(16, 24), lk.LoraConfig(rank=4, alpha=8.0, dropout=dropout))
    nn.init.normal_(layer.lora_B)
    layer.train(training)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    for n in (3, 64):  # both the unmerged and the folded-weight path
        x = torch.randn(n, 16, requires_grad=True)
        torch.manual_seed(n)
        y = layer(x)
        torch.manual_seed(n)
        y_c = compiled(x)
        assert rel(y_c, y) <= 1e-5
        gy = torch.randn_like(y)
        for g, g_c in zip(
            grads(y, [x, layer.lora_A, layer.lora_B], gy), grads(y_c, [x, layer.lora_A, layer.lora_B], gy), strict=False
        ):
            assert rel(g_c, g) <= 1e-5


# -- the base's own arithmetic (transformers' Conv1D computes addmm(b, x, W) on W stored (d_in, d_out)) --


def conv1d_base(x, W_stored, b):
    """What transformers.pytorch_utils.Conv1D.forward computes, written out (no transformers import)."""
    return torch.addmm(b, x.view(-1, x.shape[-1]), W_stored).view(*x.shape[:-1], W_stored.shape[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["grad", "no_grad"])
@pytest.mark.parametrize("lead", [(3,), (4, 50)])  # few tokens: the unmerged path; many (fp32): the folded weight
@pytest.mark.parametrize("layout", ["linear", "conv1d"])
def test_zero_B_gives_the_base_bit_for_bit(layout, lead, mode, dtype):
    """Issue 12 defect 14: with B = 0 the output, and the input gradient, are exactly the base's, on any CPU,
    because the base term is computed by the base's own GEMM (and the fold keeps the base's weight layout)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*lead, 24, generator=g).to(dtype).requires_grad_(mode == "grad")
    W = (torch.randn(40, 24, generator=g) * 0.2).to(dtype)  # (d_out, d_in)
    b = torch.randn(40, generator=g).to(dtype)
    A = torch.randn(4, 24, generator=g).to(dtype).requires_grad_()
    B = torch.zeros(40, 4, dtype=dtype, requires_grad=True)
    if layout == "conv1d":
        W_stored = W.t().contiguous()  # (d_in, d_out), as Conv1D stores it
        base, weight = conv1d_base(x, W_stored, b), W_stored.t()  # the layer passes the transposed view
    else:
        base, weight = F.linear(x, W, b), W
    with torch.set_grad_enabled(mode == "grad"):
        y = ops.lora_linear(x, weight, b, A, B, 2.0, fan_in_fan_out=layout == "conv1d")
    assert torch.equal(y, base)
    if mode == "grad":
        gy = torch.randn(base.shape, generator=g).to(dtype)
        assert torch.equal(torch.autograd.grad(y, x, gy)[0], torch.autograd.grad(base, x, gy)[0])


@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("lead", [(3,), (4, 50)])
def test_conv1d_layout_matches_the_formula(lead, p):
    x, W, b, A, B = make(lead, 24, 40, 4, torch.float32, bias=True)
    torch.manual_seed(5)
    y = ops.lora_linear(x, W.detach().t().contiguous().t(), b, A, B, 1.5, p, True, fan_in_fan_out=True)
    torch.manual_seed(5)
    keep, scale = ops.dropout_keep((x[..., 0].numel(), 24), p) if p else (None, 1.0)
    y_ref = ops.lora_linear_reference(x, W.detach(), b, A, B, 1.5, keep, scale)
    assert rel(y, y_ref) <= 1e-5
    gy = torch.randn_like(y)
    for g, g_ref in zip(grads(y, [x, A, B, b], gy), grads(y_ref, [x, A, B, b], gy), strict=False):
        assert rel(g, g_ref) <= 1e-5


@pytest.mark.parametrize("shape", [((30,), 16, 40), ((30,), 40, 16), ((64,), 16, 16), ((3,), 16, 24)])
@pytest.mark.parametrize("train_A", [True, False])
def test_input_gradient_whichever_way_the_backward_folds(shape, train_A):
    """The backward folds the input gradient on its own rule (cheaper when A's gradient is not owed, since
    dh = gy B is then needed for dx alone): dx, dA, dB match the formula on both sides of the rule."""
    lead, d_in, d_out = shape
    x, W, b, A, B = make(lead, d_in, d_out, 4, torch.float32, bias=True)
    A.requires_grad_(train_A)
    gy = torch.randn(*lead, d_out, generator=torch.Generator().manual_seed(3))
    got = grads(ops.lora_linear(x, W, b, A, B, 1.5), [x, A, B], gy)
    want = grads(ops.lora_linear_reference(x, W, b, A, B, 1.5), [x, A, B], gy)
    assert len(got) == len(want) == (3 if train_A else 2)
    for g_got, g_want in zip(got, want, strict=False):
        assert rel(g_got, g_want) <= 1e-5
