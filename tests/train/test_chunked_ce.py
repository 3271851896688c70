"""Chunked cross-entropy (train/chunked_ce.py) against `F.cross_entropy(F.linear(hidden, weight, bias), labels)`:
the loss and every gradient, for sizes that are not multiples of the chunk, ignored rows, a bias or none, a weight
that trains or is frozen, bf16 inputs and autocast; no_grad, inference_mode and torch.compile (dynamo) work."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lorakit.train.chunked_ce import chunk_size, chunked_cross_entropy

CASES = {  # name: (tokens, hidden, vocab, chunk, bias, weight trains, ignored rows)
    "ragged-chunks": (37, 16, 50, 5, False, False, "every third"),
    "bias-and-weight-grads": (37, 16, 50, 8, True, True, "every third"),
    "one-chunk": (9, 8, 30, None, True, False, "none"),
    "chunk-of-one": (7, 8, 30, 1, False, True, "none"),
    "chunk-larger-than-tokens": (6, 8, 30, 100, True, True, "first half"),
    "one-token-kept": (11, 8, 30, 4, False, True, "all but last"),
}


def _inputs(tokens, hidden, vocab, bias, weight_grad, ignored, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) * 0.5).to(dtype).requires_grad_(weight_grad)
    b = (torch.randn(vocab, generator=g) * 0.5).to(dtype).requires_grad_() if bias else None
    y = torch.randint(0, vocab, (tokens,), generator=g)
    if ignored == "every third":
        y[::3] = -100
    elif ignored == "first half":
        y[: tokens // 2] = -100
    elif ignored == "all but last":
        y[:-1] = -100
    elif ignored == "all":
        y[:] = -100
    return h, w, b, y


def _loss_and_grads(fn, h, w, b, y, scale=1.0):
    loss = fn(h, w, b, y)
    wrt = [t for t in (h, w, b) if t is not None and t.requires_grad]
    return loss.detach(), torch.autograd.grad(loss * scale, wrt)


def plain(h, w, b, y):
    return F.cross_entropy(F.linear(h, w, b).float(), y, ignore_index=-100)


def chunked(n):
    return lambda h, w, b, y: chunked_cross_entropy(h, w, y, bias=b, chunk_tokens=n)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_loss_and_every_gradient_match_the_plain_cross_entropy(case):
    tokens, hidden, vocab, n, bias, weight_grad, ignored = case
    h, w, b, y = _inputs(tokens, hidden, vocab, bias, weight_grad, ignored)
    want_loss, want = _loss_and_grads(plain, h, w, b, y, scale=0.37)  # a loss scaled after (grad accumulation)
    got_loss, got = _loss_and_grads(chunked(n), h, w, b, y, scale=0.37)
    assert got_loss.dtype == torch.float32 and len(got) == len(want) == 1 + weight_grad + bias
    torch.testing.assert_close(got_loss, want_loss, atol=1e-5, rtol=1e-5)
    for g, wg in zip(got, want, strict=True):
        torch.testing.assert_close(g, wg, atol=1e-5, rtol=1e-5)


def test_no_label_gives_nan_and_zero_gradients_as_f_cross_entropy():
    h, w, b, y = _inputs(6, 8, 30, True, True, "all")
    want_loss, want = _loss_and_grads(plain, h, w, b, y)
    got_loss, got = _loss_and_grads(chunked(4), h, w, b, y)
    assert want_loss.isnan() and got_loss.isnan()
    for g, wg in zip(got, want, strict=True):
        assert torch.equal(g, wg) and not g.any()


@pytest.mark.parametrize("how", ["bf16-inputs", "autocast"])
def test_bf16_matches_the_plain_path_at_a_bf16_tolerance(how):
    dtype = torch.bfloat16 if how == "bf16-inputs" else torch.float32
    h, w, b, y = _inputs(37, 16, 50, True, True, "every third", dtype=dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=how == "autocast"):
        want_loss, want = _loss_and_grads(plain, h, w, b, y)
        got_loss, got = _loss_and_grads(chunked(8), h, w, b, y)
    assert got_loss.dtype == want_loss.dtype == torch.float32  # fp32 math, as the plain path's upcast
    torch.testing.assert_close(got_loss, want_loss, atol=1e-5, rtol=1e-5)  # same bf16 logits, fp32 softmax
    for g, wg in zip(got, want, strict=True):
        assert g.dtype == wg.dtype == dtype
        torch.testing.assert_close(g.float(), wg.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_without_gradients_it_is_the_loss_alone(mode):
    h, w, b, y = _inputs(37, 16, 50, True, True, "every third")
    want = plain(h, w, b, y).detach()
    with mode():
        got = chunked_cross_entropy(h, w, y, bias=b, chunk_tokens=5)
    assert not got.requires_grad
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_dynamo_traces_it_whole():
    h, w, b, y = _inputs(37, 16, 50, True, True, "every third")
    compiled = torch.compile(chunked(8), backend="aot_eager", fullgraph=True)
    want_loss, want = _loss_and_grads(plain, h, w, b, y)
    got_loss, got = _loss_and_grads(compiled, h, w, b, y)
    torch.testing.assert_close(got_loss, want_loss, atol=1e-5, rtol=1e-5)
    for g, wg in zip(got, want, strict=True):
        torch.testing.assert_close(g, wg, atol=1e-5, rtol=1e-5)


def test_chunks_stay_under_32_mib_of_fp32_logits_or_hold_256_tokens():
    for vocab in (4096, 32000):
        assert chunk_size(vocab) * vocab * 4 <= 32 * 2**20 < (chunk_size(vocab) + 1) * vocab * 4
    assert chunk_size(128256) == chunk_size(10**6) == 256


@pytest.mark.parametrize(
    "shapes, match",
    [
        (((4, 8), (30, 7), (4,)), r"hidden \(4, 8\), weight \(30, 7\)"),
        (((4, 8), (30, 8), (5,)), r"labels \(5,\)"),
        (((4, 8), (30, 8), (4,), (29,)), r"bias \(29,\)"),
    ],
)
def test_bad_shapes_are_named(shapes, match):
    h, w, y = torch.zeros(shapes[0]), torch.zeros(shapes[1]), torch.zeros(shapes[2], dtype=torch.long)
    b = torch.zeros(shapes[3]) if len(shapes) > 3 else None
    with pytest.raises(ValueError, match=match):
        chunked_cross_entropy(h, w, y, bias=b)
    with pytest.raises(ValueError, match="chunk_tokens=0"):
        chunked_cross_entropy(torch.zeros(4, 8), torch.zeros(30, 8), torch.zeros(4, dtype=torch.long), chunk_tokens=0)
