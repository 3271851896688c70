"""lorakit.fused against transformers' own code: LlamaRMSNorm / Qwen3RMSNorm, LlamaMLP's act, apply_rotary_pos_emb.

fp32 to 1e-6 (forward, input and weight gradients), bf16 to a bf16 tolerance, odd shapes; no_grad,
inference_mode, bf16 autocast, torch.compile (no graph break); and fewer bytes saved for backward.
"""

import pytest
import torch
from transformers.activations import ACT2FN
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

from lorakit.fused import rms_norm, rotary, swiglu

TOL = {torch.float32: dict(atol=1e-6, rtol=1e-6), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
SHAPES = [(3, 5, 7), (2, 33), (1, 1, 4, 64)]


def _norm_ref(cls, d, dtype, weight_dtype):
    """A transformers RMSNorm with a random weight."""
    torch.manual_seed(1)
    ref = cls(d, eps=1e-5).to(weight_dtype)
    with torch.no_grad():
        ref.weight.normal_()
    return ref


def _grads(out, *tensors):
    """Gradients of a fixed random projection of `out` with respect to `tensors`."""
    torch.manual_seed(2)
    g = torch.randn(out.shape, dtype=out.dtype)
    return torch.autograd.grad(out, tensors, g)


def _close(a, b, dtype):
    torch.testing.assert_close(a, b, **TOL[dtype])


@pytest.mark.parametrize("cls", [LlamaRMSNorm, Qwen3RMSNorm])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    ("dtype", "weight_dtype"), [(torch.float32,) * 2, (torch.bfloat16,) * 2, (torch.bfloat16, torch.float32)]
)
def test_rms_norm_matches_transformers(cls, shape, dtype, weight_dtype):
    ref = _norm_ref(cls, shape[-1], dtype, weight_dtype)
    x = torch.randn(shape).to(dtype).requires_grad_()
    expected = ref(x)
    got = rms_norm(x, ref.weight, ref.variance_epsilon)
    assert got.dtype == expected.dtype
    _close(got, expected, dtype)
    for a, b in zip(_grads(got, x, ref.weight), _grads(expected, x, ref.weight), strict=True):
        assert a.dtype == b.dtype
        _close(a, b, dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_matches_llama_mlp_act(shape, dtype):
    gate = (3 * torch.randn(shape)).to(dtype).requires_grad_()
    up = torch.randn(shape).to(dtype).requires_grad_()
    expected = ACT2FN["silu"](gate) * up
    got = swiglu(gate, up)
    _close(got, expected, dtype)
    for a, b in zip(_grads(got, gate, up), _grads(expected, gate, up), strict=True):
        _close(a, b, dtype)


def _qk_cos_sin(dtype, seq=5, dim=8, halves_equal=True):
    """q (2, 3, seq, dim), k (2, 1, seq, dim) and cos/sin (2, seq, dim): a model's (equal halves) or arbitrary."""
    torch.manual_seed(3)
    q = torch.randn(2, 3, seq, dim).to(dtype).requires_grad_()
    k = torch.randn(2, 1, seq, dim).to(dtype).requires_grad_()
    angles = torch.randn(2, seq, dim // 2 if halves_equal else dim)
    if halves_equal:
        angles = torch.cat([angles, angles], dim=-1)
    return q, k, angles.cos().to(dtype), angles.sin().to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("seq", "dim", "halves_equal"), [(5, 8, True), (7, 6, False), (1, 64, True)])
def test_rotary_matches_apply_rotary_pos_emb(dtype, seq, dim, halves_equal):
    q, k, cos, sin = _qk_cos_sin(dtype, seq, dim, halves_equal)
    expected = apply_rotary_pos_emb(q, k, cos, sin)
    got = rotary(q, k, cos, sin)
    for a, b in zip(got, expected, strict=True):
        _close(a, b, dtype)
    out_got, out_ref = torch.cat([t.flatten() for t in got]), torch.cat([t.flatten() for t in expected])
    for a, b in zip(_grads(out_got, q, k), _grads(out_ref, q, k), strict=True):
        _close(a, b, dtype)


def test_rotary_unsqueeze_dim_2():
    q, k, cos, sin = _qk_cos_sin(torch.float32)
    q2, k2 = q.detach().transpose(1, 2), k.detach().transpose(1, 2)  # (batch, seq, heads, dim)
    for a, b in zip(rotary(q2, k2, cos, sin, unsqueeze_dim=2), apply_rotary_pos_emb(q2, k2, cos, sin, 2), strict=True):
        _close(a, b, torch.float32)


def _all_ops(x, w, gate, up, q, k, cos, sin):
    """Every op once, summed into one scalar per op."""
    return rms_norm(x, w, 1e-6), swiglu(gate, up), *rotary(q, k, cos, sin)


def _inputs(requires_grad=False):
    torch.manual_seed(4)
    x, w, gate, up = torch.randn(4, 16), torch.randn(16), torch.randn(4, 16), torch.randn(4, 16)
    q, k, cos, sin = (t.detach() for t in _qk_cos_sin(torch.float32))
    tensors = [x, w, gate, up, q, k]
    for t in tensors:
        t.requires_grad_(requires_grad)
    return (*tensors, cos, sin)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_no_grad_and_inference_mode(mode):
    expected = _all_ops(*_inputs(requires_grad=True))
    with mode():
        got = _all_ops(*_inputs(requires_grad=True))
    for a, b in zip(got, expected, strict=True):
        assert a.grad_fn is None
        torch.testing.assert_close(a, b.detach(), atol=0, rtol=0)


def test_bf16_autocast_matches_transformers():
    ref = _norm_ref(LlamaRMSNorm, 16, torch.float32, torch.float32)
    lin = torch.nn.Linear(16, 16)
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = lin(x)  # bf16, as a decoder block's projections give under autocast
        got, expected = rms_norm(h, ref.weight, ref.variance_epsilon), ref(h)
        got_s, expected_s = swiglu(h, h), ACT2FN["silu"](h) * h
    assert got.dtype == expected.dtype == torch.float32 and got_s.dtype == expected_s.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    torch.testing.assert_close(got_s, expected_s, atol=0, rtol=0)


def test_torch_compile_traces_every_op_without_graph_breaks():
    torch._dynamo.reset()
    explained = torch._dynamo.explain(_all_ops)(*_inputs(requires_grad=True))
    assert explained.graph_break_count == 0, explained.break_reasons
    eager_in, compiled_in = _inputs(requires_grad=True), _inputs(requires_grad=True)
    eager, compiled = _all_ops(*eager_in), torch.compile(_all_ops, backend="aot_eager")(*compiled_in)
    sum(o.sum() for o in eager).backward()
    sum(o.sum() for o in compiled).backward()
    for a, b in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a, b)
    for a, b in zip(compiled_in[:6], eager_in[:6], strict=True):
        torch.testing.assert_close(a.grad, b.grad)


def _saved_bytes(fn, *args):
    """Bytes of the distinct tensors autograd keeps for the backward of fn(*args)."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(seen.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saves_fewer_bytes_than_transformers(dtype):
    ref = _norm_ref(LlamaRMSNorm, 64, dtype, dtype).requires_grad_(False)  # a frozen model's norm
    x, gate, up = (torch.randn(32, 64).to(dtype).requires_grad_() for _ in range(3))
    # fp32 with a frozen weight: autograd too keeps only x, rstd and w; bf16: it keeps x's fp32 copy
    fused_norm, ref_norm = _saved_bytes(rms_norm, x, ref.weight, 1e-6), _saved_bytes(ref, x)
    assert fused_norm < ref_norm if dtype == torch.bfloat16 else fused_norm <= ref_norm
    ref.requires_grad_(True)  # a trained norm weight: autograd also keeps the normalised copy
    assert _saved_bytes(rms_norm, x, ref.weight, 1e-6) < _saved_bytes(ref, x)
    assert _saved_bytes(swiglu, gate, up) < _saved_bytes(lambda g, u: ACT2FN["silu"](g) * u, gate, up)


def test_bad_shapes_are_errors():
    with pytest.raises(ValueError, match="weight shape"):
        rms_norm(torch.ones(2, 4), torch.ones(3), 1e-6)
    with pytest.raises(ValueError, match="gate shape"):
        swiglu(torch.ones(2, 4), torch.ones(2, 3))
    with pytest.raises(ValueError, match="head_dim"):
        rotary(torch.ones(1, 1, 2, 5), torch.ones(1, 1, 2, 5), torch.ones(1, 2, 5), torch.ones(1, 2, 5))
