"""LoRA's linear op under no_grad / inference_mode, bf16 autocast, torch.func (grad, jvp), forward-mode AD and
double backward, each pinned against the naive formula. With dropout on, where it applies: the masks are drawn
inside the forward, so every mode must see the masks an ordinary run would.
"""

import sys
from pathlib import Path

import pytest
import torch
from torch.autograd import forward_ad

from lorakit import ops

sys.path.insert(0, str(Path(__file__).parent))
from _numerics import rel  # noqa: E402

SHAPES = [(3, 16, 24), (200, 16, 16)]  # few tokens: the unmerged path; many (fp32): the folded weight


def factors(n, d_in, d_out, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)

    def t(*s):
        return torch.randn(*s, generator=g).to(dtype)

    return t(n, d_in), t(d_out, d_in) * d_in**-0.5, t(d_out), t(4, d_in) * d_in**-0.5, t(d_out, 4)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("shape", SHAPES)
def test_no_grad_and_inference_mode_match_the_formula(shape, p, mode):
    x, W, b, A, B = factors(*shape)
    A.requires_grad_(True)
    ctx = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    torch.manual_seed(2)
    with ctx:
        y = ops.lora_linear(x, W, b, A, B, 1.5, p, training=True)
    torch.manual_seed(2)
    keep, scale = ops.dropout_keep(x.shape, p) if p else (None, 1.0)
    assert rel(y, ops.lora_linear_reference(x, W, b, A.detach(), B, 1.5, keep, scale)) <= 1e-5


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("shape", SHAPES)
def test_bf16_autocast_matches_the_formula_under_autocast(shape, p):
    x, W, b, A, B = factors(*shape)
    x.requires_grad_(True)
    A.requires_grad_(True)
    B.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(4)
        y = ops.lora_linear(x, W, b, A, B, 1.5, p, training=True)
        torch.manual_seed(4)
        keep, scale = ops.dropout_keep(x.shape, p) if p else (None, 1.0)
        ref = ops.lora_linear_reference(x, W, b, A, B, 1.5, keep, scale)
    assert y.dtype == ref.dtype == torch.bfloat16
    assert rel(y, ref) <= 1e-2
    g = torch.randn_like(y)
    got, want = torch.autograd.grad(y, (x, A, B), g), torch.autograd.grad(ref, (x, A, B), g)
    for name, a, w in zip("xAB", got, want, strict=False):
        assert a.dtype == w.dtype, name
        assert rel(a, w) <= 2e-2, name


# -- torch.func, forward-mode AD, double backward ------------------------------------------------------


def f64(*shape_args, seed=0):
    return [t.double() for t in factors(*shape_args, seed=seed)]


def loss_fast(x, W, b, A, B):
    return ops.lora_linear(x, W, b, A, B, 1.5).square().sum()


def loss_naive(x, W, b, A, B):
    return ops.lora_linear_reference(x, W, b, A, B, 1.5).square().sum()


@pytest.mark.parametrize("shape", SHAPES)
def test_torch_func_grad_matches_the_formula(shape):
    args = f64(*shape)
    got = torch.func.grad(loss_fast, argnums=(0, 3, 4))(*args)
    want = torch.func.grad(loss_naive, argnums=(0, 3, 4))(*args)
    for a, w in zip(got, want, strict=False):
        torch.testing.assert_close(a, w)


def test_torch_func_grad_with_dropout_uses_the_drawn_mask():
    x, W, b, A, B = f64(5, 16, 24)
    torch.manual_seed(6)
    got = torch.func.grad(lambda A: ops.lora_linear(x, W, b, A, B, 1.5, 0.3, True).square().sum())(A)
    torch.manual_seed(6)
    keep, scale = ops.dropout_keep(x.shape, 0.3)
    want = torch.func.grad(lambda A: ops.lora_linear_reference(x, W, b, A, B, 1.5, keep, scale).square().sum())(A)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("shape", SHAPES)
def test_jvp_and_forward_mode_ad_match_the_formula(shape):
    x, W, b, A, B = f64(*shape)
    tx, tA, tB = (torch.randn_like(t) for t in (x, A, B))

    def fast(x, A, B):
        return ops.lora_linear(x, W, b, A, B, 1.5)

    def slow(x, A, B):
        return ops.lora_linear_reference(x, W, b, A, B, 1.5)

    y, t = torch.func.jvp(fast, (x, A, B), (tx, tA, tB))
    y_ref, t_ref = torch.func.jvp(slow, (x, A, B), (tx, tA, tB))
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(t, t_ref)
    with forward_ad.dual_level():
        duals = [forward_ad.make_dual(p, tp) for p, tp in ((x, tx), (A, tA), (B, tB))]
        t_fwd = forward_ad.unpack_dual(fast(*duals)).tangent
    torch.testing.assert_close(t_fwd, t_ref)


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("shape", SHAPES)
def test_second_derivatives_match_the_formula(shape, p):
    """Issue 12 defect 8: the backward treated the saved x·Aᵀ as a constant (second derivative off by 21.8)."""
    x, W, b, A, B = (t.requires_grad_(i in (0, 3, 4)) for i, t in enumerate(f64(*shape)))

    def penalty(y):  # a gradient penalty: every first derivative, squared, differentiated again
        firsts = torch.autograd.grad(y.square().sum() + y.sum(), (x, A, B), create_graph=True)
        return torch.autograd.grad(sum(g.square().sum() for g in firsts), (x, A, B))

    torch.manual_seed(8)
    got = penalty(ops.lora_linear(x, W, b, A, B, 1.5, p, True))
    torch.manual_seed(8)
    keep, scale = ops.dropout_keep(x.shape, p) if p else (None, 1.0)
    want = penalty(ops.lora_linear_reference(x, W, b, A, B, 1.5, keep, scale))
    for name, a, w in zip("xAB", got, want, strict=False):
        torch.testing.assert_close(a, w, msg=name)


def test_gradgradcheck():
    x, W, b, A, B = (t.requires_grad_(i in (0, 3, 4)) for i, t in enumerate(f64(4, 5, 3)))

    def fn(x, A, B):
        return ops.lora_linear(x, W, b, A, B, 1.5)

    assert torch.autograd.gradgradcheck(fn, (x, A, B))
