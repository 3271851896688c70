"""The LoRA linear's CPU choices (`ops.GemmPlan`: rank-r GEMM orientation, folding into the weight), each forced.

Every plan computes the same math: outputs and the gradients of x, A, B, bias match `ops.lora_linear_reference`
(relative error ≤ 1e-5 fp32, ≤ 1e-2 bf16) whichever orientation and fold decision runs. The default plan is a
rule, not a timing: the same in every call and every process, so a resumed run computes the bits it did.
"""

from __future__ import annotations

import itertools
import subprocess
import sys

import pytest
import torch

from lorakit import ops

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
PLANS = [ops.GemmPlan(rank_r=o, fold=f) for o, f in itertools.product(["wide", "narrow"], ["auto", "never", "always"])]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make(n: int, d_in: int, d_out: int, r: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    t = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(dtype).requires_grad_()  # noqa: E731
    return t(n, d_in), t(d_out, d_in, scale=d_in**-0.5).detach(), t(d_out), t(r, d_in, scale=d_in**-0.5), t(d_out, r)


# (tokens, d_in, d_out): few tokens fold nothing under "auto"; 40 at 16 -> 48 fold the forward only, at 48 -> 16
# the input gradient only; 96 at 16 -> 16 both
SHAPES = [(5, 16, 24), (40, 16, 48), (40, 48, 16), (96, 16, 16)]


@pytest.mark.parametrize("plan", PLANS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("shape", SHAPES)
def test_every_plan_matches_the_formula_in_training(plan, dtype, p, shape):
    x, W, b, A, B = make(*shape, 8, dtype)
    torch.manual_seed(7)
    y = ops.lora_linear(x, W, b, A, B, 1.5, p, True, plan=plan)
    torch.manual_seed(7)
    keep, scale = ops.dropout_keep((shape[0], shape[1]), p) if p else (None, 1.0)
    y_ref = ops.lora_linear_reference(x, W, b, A, B, 1.5, keep, scale)
    assert rel(y, y_ref) <= TOL[dtype]
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    for g, g_ref in zip(
        torch.autograd.grad(y, [x, b, A, B], gy), torch.autograd.grad(y_ref, [x, b, A, B], gy), strict=True
    ):
        assert rel(g, g_ref) <= TOL[dtype]


@pytest.mark.parametrize("plan", PLANS, ids=str)
@pytest.mark.parametrize("train_A", [True, False])
@pytest.mark.parametrize("conv1d", [False, True])
def test_every_plan_matches_with_frozen_A_and_conv1d_weights(plan, train_A, conv1d):
    """The backward's own fold rule (dh is then owed to dx alone) and Conv1D's (d_in, d_out) stored weight."""
    x, W, b, A, B = make(40, 48, 16, 4, torch.float32)
    A.requires_grad_(train_A)
    weight = W.t().contiguous().t() if conv1d else W
    y = ops.lora_linear(x, weight, b, A, B, 1.5, fan_in_fan_out=conv1d, plan=plan)
    y_ref = ops.lora_linear_reference(x, W, b, A, B, 1.5)
    assert rel(y, y_ref) <= 1e-5
    live = [t for t in (x, b, A, B) if t.requires_grad]
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
    for g, g_ref in zip(torch.autograd.grad(y, live, gy), torch.autograd.grad(y_ref, live, gy), strict=True):
        assert rel(g, g_ref) <= 1e-5


@pytest.mark.parametrize("plan", PLANS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_every_plan_matches_the_formula_without_grad(plan, dtype, shape):
    x, W, b, A, B = make(*shape, 8, dtype)
    with torch.no_grad():
        y = ops.lora_linear(x, W, b, A, B, 1.5, plan=plan)
        assert rel(y, ops.lora_linear_reference(x, W, b, A, B, 1.5)) <= TOL[dtype]


def test_the_plan_is_honoured():
    """Forcing a fold changes the rounding (one GEMM on W + s·B A instead of an accumulate): the setting is used."""
    x, W, b, A, B = make(96, 16, 16, 8, torch.float32)
    with torch.no_grad():
        y = {f: ops.lora_linear(x, W, b, A, B, 1.5, plan=ops.GemmPlan(fold=f)) for f in ("never", "always", "auto")}
    assert not torch.equal(y["never"], y["always"])
    assert torch.equal(y["auto"], y["always"])  # 96 tokens > d_in + d_out: "auto" folds here


def test_the_default_plan_is_a_constant():
    assert ops.gemm_plan() == ops.GemmPlan(rank_r="wide", fold="auto")
    x, W, b, A, B = make(40, 16, 48, 8, torch.float32)
    y = [ops.lora_linear(x, W, b, A, B, 1.5) for _ in range(2)]
    assert torch.equal(y[0], y[1])
    assert torch.equal(y[0], ops.lora_linear(x, W, b, A, B, 1.5, plan=ops.gemm_plan()))


@pytest.mark.slow  # a subprocess
def test_a_fresh_process_decides_and_computes_the_same():
    """What a resumed run relies on: a new process picks the same plan and computes the same bits (no timing)."""
    code = (
        "import torch; from lorakit import ops; g = torch.Generator().manual_seed(0); "
        "x, W, A, B = (torch.randn(*s, generator=g) for s in ((300, 64), (96, 64), (8, 64), (96, 8))); "
        "y = ops.lora_linear(x, W, None, A, B, 2.0); print(repr(ops.gemm_plan())); print(y.double().sum().item())"
    )
    g = torch.Generator().manual_seed(0)
    x, W, A, B = (torch.randn(*s, generator=g) for s in ((300, 64), (96, 64), (8, 64), (96, 8)))
    y = ops.lora_linear(x, W, None, A, B, 2.0)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == repr(ops.gemm_plan())
    assert float(out[1]) == y.double().sum().item()


@pytest.mark.parametrize("field,value", [("rank_r", "tall"), ("fold", "sometimes")])
def test_a_bad_plan_names_the_setting(field, value):
    with pytest.raises(ValueError, match=f"GemmPlan.{field} must be .*{value}"):
        ops.GemmPlan(**{field: value})
