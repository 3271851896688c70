"""`lorakit.summary`: a rich table of the LoRA layers, in every adapter state."""

from __future__ import annotations

from torch import nn

import lorakit as lk


def _model() -> nn.Module:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2)))
    return lk.apply_lora(model, lk.LoraConfig(rank=2, alpha=4), ["0", "2.0", "2.1"])


def test_summary_with_no_active_adapter() -> None:
    model = _model()
    lk.set_adapter(model, None)  # every layer computes its base; the adapter waits in the stash
    text = lk.summary(model)
    rows = text.splitlines()
    assert rows[0].split() == ["module", "type", "adapter", "lora_A", "lora_B", "rank", "alpha", "trainable"]
    assert rows[2].split() == ["0", "Linear", "-", "-", "-", "-", "-", "0"]
    assert rows[-1] == f"trainable 0 of {lk.trainable_parameters(model)[1]:,} parameters (0.00%)"


def test_summary_rows_line_up_and_name_the_active_adapter() -> None:
    model = _model()
    rows = lk.summary(model).splitlines()
    assert [r.split()[:3] for r in rows[2:5]] == [
        ["0", "Linear", "default"],
        ["2.0", "Linear", "default"],
        ["2.1", "Linear", "default"],
    ]
    assert len({r.index("Linear") for r in rows[2:5]}) == 1  # one column, whatever the name's length
    assert set(rows[1]) == {"─"}
    assert "2×4" in rows[2] and "8×2" in rows[2]
