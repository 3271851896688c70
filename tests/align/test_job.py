"""`lorakit finetune --task dpo|grpo`'s flags, checked in process before any model loads: a flag of another task,
a loss of the other task, LoRA flags beside --init-adapter and bad config values exit 2 naming the flag; run-file
keys do the same; align.job.config_of builds the configs with TRL's defaults."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "cli"))
from _cli import in_process  # noqa: E402

from lorakit.align import job as align_job  # noqa: E402
from lorakit.errors import LoraError  # noqa: E402
from lorakit.train import DPOConfig, GRPOConfig  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A tiny saved llama: the path checks pass, and every check here comes before it loads."""
    sys.path.insert(0, str(Path(__file__).parents[1]))
    import _hf_models

    return _hf_models.save_tiny("llama", tmp_path_factory.mktemp("align-job") / "llama")


@pytest.fixture
def base(tmp_path: Path, tiny: Path) -> list:
    """A finetune command line whose model and data paths exist."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    return ["finetune", "--model", tiny, "--data", rows, "--out", tmp_path / "out", "--device", "cpu"]


@pytest.mark.parametrize(
    ("task", "flags", "said"),
    [
        ("causal-lm", ["--beta", "0.1"], "--beta is for --task dpo or grpo, not --task causal-lm"),
        ("seq-cls", ["--ref-adapter", "x"], "--ref-adapter is for --task dpo or grpo, not --task seq-cls"),
        ("dpo", ["--num-generations", "4"], "--num-generations is for --task grpo, not --task dpo"),
        ("dpo", ["--reward", "exact_match"], "--reward is for --task grpo, not --task dpo"),
        ("grpo", ["--simpo-gamma", "1"], "--simpo-gamma is for --task dpo, not --task grpo"),
        ("dpo", ["--loss-type", "dapo"], "--loss-type dapo is not a --task dpo loss: expected one of sigmoid, ipo"),
        ("grpo", ["--loss-type", "ipo"], "--loss-type ipo is not a --task grpo loss: expected one of grpo, bnpo"),
        ("dpo", ["--loss-type", "simpo", "--ref-adapter", "x"], "--ref-adapter: --loss-type simpo is reference-free"),
        ("dpo", ["--init-adapter", "x", "--rank", "4"], "--rank: --init-adapter x starts from that adapter"),
        ("grpo", ["--init-adapter", "x", "--targets", "q_proj"], "--targets: --init-adapter x starts from that"),
    ],
)
def test_a_flag_the_task_does_not_take_exits_2_naming_it(base, capsys, task, flags, said) -> None:
    status, _, err = in_process(capsys, *base, "--task", task, *flags)
    assert status == 2 and said in err, err
    assert not Path(base[6]).exists()  # nothing written


@pytest.mark.parametrize(
    ("task", "flags", "said"),
    [
        ("dpo", ["--beta", "-1"], "--beta -1.0 is invalid: expected a finite number > 0"),
        ("grpo", ["--beta", "-0.5"], "--beta -0.5 is invalid: expected a finite number >= 0"),
        ("grpo", ["--num-generations", "1"], "--num-generations 1 is invalid: expected an int >= 2"),
        ("grpo", ["--top-p", "1.5"], "--top-p 1.5 is invalid: expected 0 < top_p <= 1"),
        ("grpo", ["--temperature", "0"], "--temperature 0.0 is invalid"),
        (
            "grpo",
            ["--reward", "exact_match", "--reward", "json_valid", "--reward-weights", "1"],
            "--reward-weights [1.0] has 1 weight(s) for 2 reward(s) ['exact_match', 'json_valid']",
        ),
    ],
)
def test_a_bad_config_value_exits_2_worded_as_its_flag(base, capsys, task, flags, said) -> None:
    status, _, err = in_process(capsys, *base, "--task", task, *flags)
    assert status == 2 and said in err, err


def test_run_file_keys_are_the_flags_and_checked_the_same_way(base, tmp_path, capsys) -> None:
    run = tmp_path / "run.toml"
    run.write_text("num_generations = 4\n")
    status, _, err = in_process(capsys, *base, "--task", "dpo", "--config", run)
    assert status == 2 and "--num-generations is for --task grpo, not --task dpo" in err, err
    run.write_text('beta = 0.2\nloss_type = "ipo"\nreward = ["exact_match"]\n')
    status, _, err = in_process(capsys, *base, "--task", "grpo", "--config", run)
    assert status == 2 and "--loss-type ipo is not a --task grpo loss" in err, err
    run.write_text("num_generations = 1.5\n")
    status, _, err = in_process(capsys, *base, "--task", "grpo", "--config", run)
    assert status == 2 and "num_generations = 1.5 is invalid: expected an integer" in err, err


def test_config_of_keeps_trls_defaults_for_what_is_not_given() -> None:
    assert align_job.config_of("dpo", {}) == DPOConfig()
    assert align_job.config_of("grpo", {"beta": 0.04, "rewards": ("contains",)}) == GRPOConfig(
        beta=0.04, rewards=("contains",)
    )
    with pytest.raises(LoraError) as e:
        align_job.config_of("dpo", {"loss_type": "simpo", "reference": "reference"})
    assert e.value.param is None and "not used by loss_type='simpo'" in str(e.value)
    with pytest.raises(LoraError) as e:
        align_job.config_of("grpo", {"epsilon_high": -1.0})
    assert e.value.param == "epsilon_high"
    with pytest.raises(ValueError, match="task='causal-lm' has no preference or RL config"):
        align_job.config_of("causal-lm", {})


def test_a_bad_reward_spec_exits_2_naming_it_before_the_model_loads(base, capsys) -> None:
    status, _, err = in_process(capsys, *base, "--task", "grpo", "--reward", "regex:[0-9")
    assert status == 2 and "--reward: reward 'regex:[0-9': the pattern '[0-9' is not a valid regex" in err, err
    status, _, err = in_process(capsys, *base, "--task", "grpo", "--reward", "no_such_module_here:fn")
    assert status == 2 and "--reward: " in err and "no_such_module_here" in err, err
