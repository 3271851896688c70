"""test_layers.py's table-driven checks on transformers' GPT-2 Conv1D (weight stored (d_in, d_out)).

Kept apart so that test_layers.py needs only torch; this module needs the HF extra.
"""

import sys
from pathlib import Path

import pytest
from transformers.pytorch_utils import Conv1D

sys.path.insert(0, str(Path(__file__).parent))
import test_layers as core  # noqa: E402

KIND = "conv1d_hf"
DTYPE_IDS = [str(d).removeprefix("torch.") for d in core.DTYPES]


@pytest.mark.parametrize("dtype", core.DTYPES, ids=DTYPE_IDS)
def test_fresh_layer_is_exactly_the_base(dtype):
    core.test_fresh_layer_is_exactly_the_base(KIND, dtype)


@pytest.mark.parametrize("dtype", core.DTYPES, ids=DTYPE_IDS)
def test_forward_matches_naive_formula_and_merge(dtype):
    core.test_forward_matches_naive_formula_and_merge(KIND, dtype)


@pytest.mark.parametrize("dtype", core.DTYPES, ids=DTYPE_IDS)
def test_inplace_merge_and_exact_unmerge(dtype):
    core.test_inplace_merge_and_exact_unmerge(KIND, dtype)


@pytest.mark.parametrize("bias", ["none", "all"])
def test_gradients_reach_only_the_adapter(bias):
    core.test_gradients_reach_only_the_adapter(KIND, bias)


def test_gradients_match_naive_autograd():
    core.test_gradients_match_naive_autograd(KIND)


def test_layer_file_round_trip(tmp_path):
    core.test_layer_file_round_trip(KIND, tmp_path)


def test_the_hf_kind_is_really_conv1d():
    base, _ = core.make(KIND)
    assert type(base) is Conv1D
