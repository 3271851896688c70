"""Sibling LoRA layers reading one input (q/k/v, gate/up) share one dropout draw; everything else draws afresh."""

import torch
from torch import nn

import lorakit as lk
from lorakit import ops


def pair(p=0.3):
    torch.manual_seed(0)
    a = lk.with_lora(nn.Linear(16, 8), lk.LoraConfig(rank=4, dropout=p)).train()
    b = lk.with_lora(nn.Linear(16, 12), lk.LoraConfig(rank=4, dropout=p)).train()
    with torch.no_grad():
        for layer in (a, b):
            layer.lora_B.normal_()
    return a, b


def test_siblings_share_one_mask_and_match_the_formula():
    a, b = pair()
    x = torch.randn(5, 7, 16, requires_grad=True)
    ya = a(x)
    keep_a, scale = ops._sibling_dropout.keep, ops._sibling_dropout.scale
    yb = b(x)
    assert ops._sibling_dropout.keep is keep_a  # b reused a's draw
    keep = keep_a.view(x.shape).float()
    g_a, g_b = torch.randn_like(ya), torch.randn_like(yb)
    (ya * g_a).sum().add((yb * g_b).sum()).backward()
    got = [x.grad, a.lora_A.grad, a.lora_B.grad, b.lora_A.grad, b.lora_B.grad]
    x2 = x.detach().clone().requires_grad_(True)
    params = [t.detach().clone().requires_grad_(True) for t in (a.lora_A, a.lora_B, b.lora_A, b.lora_B)]
    ra = nn.functional.linear(x2, a.base.weight, a.base.bias) + a.scaling * ((x2 * keep * scale) @ params[0].t()) @ params[1].t()
    rb = nn.functional.linear(x2, b.base.weight, b.base.bias) + b.scaling * ((x2 * keep * scale) @ params[2].t()) @ params[3].t()
    torch.testing.assert_close(ya, ra, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(yb, rb, rtol=1e-5, atol=1e-5)
    (ra * g_a).sum().add((rb * g_b).sum()).backward()
    for g, w in zip(got, [x2.grad] + [t.grad for t in params]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_a_repeated_call_or_a_changed_input_draws_again():
    a, b = pair()
    x = torch.randn(64, 16)
    a(x)
    first = ops._sibling_dropout.keep
    a(x)  # the same layer again: a fresh mask
    assert ops._sibling_dropout.keep is not first
    second = ops._sibling_dropout.keep
    x.add_(1.0)  # changed in place: its version moved on, so b must not reuse the old mask
    b(x)
    assert ops._sibling_dropout.keep is not second
    y = torch.randn(64, 16)  # another tensor: another draw
    b(y)
    assert ops._sibling_dropout.keep is not second


def test_eval_and_p0_never_touch_the_shared_draw():
    a, _ = pair(p=0.0)
    before = ops._sibling_dropout.keep
    a(torch.randn(4, 16))
    a.eval()
    a(torch.randn(4, 16))
    assert ops._sibling_dropout.keep is before
