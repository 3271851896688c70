"""bases.py: what a LoRA layer asks of its frozen base. A storage format is one `QuantizedBase` class that writes
and decodes its own tensor; the core reaches it through that interface only, so a new format changes no core file."""

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit import bases, ops

SRC = Path(lk.__file__).parent


class Fixed16(bases.QuantizedBase):
    """A toy format the core has never seen: the weight as int16 in units of 1/1024."""

    format = "fixed16"

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        w = base.weight.detach()
        self.dtype, (self.out_features, self.in_features) = w.dtype, w.shape
        self.weight = nn.Parameter(torch.round(w * 1024).to(torch.int16), requires_grad=False)
        self.bias = base.bias

    @staticmethod
    def decode(stored, dtype=None):
        return stored.to(dtype or torch.float32) / 1024

    def dequantized(self):
        plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            plain.weight.copy_(self.dequantize())
            if self.bias is not None:
                plain.bias.copy_(self.bias)
        return plain

    def forward(self, x):
        return nn.functional.linear(x, self.dequantize(x.dtype), self.bias)


@pytest.fixture(scope="module")
def layer():
    torch.manual_seed(0)
    layer = lk.with_lora(nn.Linear(8, 6), lk.LoraConfig(rank=2, alpha=4.0))
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.base = Fixed16(layer.base)
    return layer


def test_a_new_storage_format_is_one_class(layer):
    W = layer.base.dequantize()  # (6, 8) fp32
    assert bases.is_quantized(layer.base) and torch.equal(bases.dense_weight(layer.base), W)
    assert bases.weight_shape(layer.base) == (6, 8)
    x = torch.randn(5, 8, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    assert not any(t.dtype.is_floating_point and t.shape == W.shape for t in saved), "a dense W was saved"
    ref = ops.lora_linear_reference(x, W, layer.base.bias, layer.lora_A, layer.lora_B, layer.scaling)
    torch.testing.assert_close(y, ref)
    params = [x, layer.lora_A, layer.lora_B]
    for got, want in zip(torch.autograd.grad(y.sum(), params), torch.autograd.grad(ref.sum(), params), strict=True):
        torch.testing.assert_close(got, want)
    with pytest.raises(lk.LoraStateError, match="quantised"):
        layer.merge_()
    with torch.no_grad():
        torch.testing.assert_close(layer.merge()(x), ref)


def _defined(*names):
    """{name: files of src/ that define a function called `name` (at any depth)}, parsing each file once."""
    found = {name: [] for name in names}
    for p in sorted(SRC.rglob("*.py")):
        defs = {n.name for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.FunctionDef)}
        for name in set(names) & defs:
            found[name].append(str(p.relative_to(SRC)))
    return found


def test_one_dense_weight_and_one_is_quantized():
    """A layer's dense weight has one spelling (`bases.dense_weight`), whether a base is quantised one answer."""
    found = _defined("dense_weight", "is_quantized", "_linear_weight")
    assert found == {"dense_weight": ["bases.py"], "is_quantized": ["bases.py"], "_linear_weight": []}, found
    assert not hasattr(lk.LoraLayer, "base_weight")
