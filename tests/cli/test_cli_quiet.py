"""No third-party chatter on any command: torchao's "Failed to load ....so", torch's pytree deprecations and
transformers' progress bars stay off stderr, whichever command imports them (the mechanism is cli/quiet.py, in main).

One child Python runs every subcommand's --help, then `inspect --model` (which loads a transformers model, importing
torchao where installed), through lorakit.cli.main as the console script does: stderr must stay empty.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import lorakit as lk

sys.path.insert(0, str(Path(__file__).parents[1]))
import _hf_models  # noqa: E402

pytestmark = pytest.mark.slow  # a subprocess: not in the fast set

CHILD = """
import sys
from lorakit.cli import build_parser, main

commands = build_parser()._subparsers._group_actions[0].choices  # every subcommand there is
for name in commands:
    try:
        main([name, "--help"])
    except SystemExit as e:
        assert e.code == 0, (name, e.code)
print("inspect:", main(["inspect", sys.argv[1], "--model", sys.argv[2]]), "commands:", " ".join(commands))
"""


def test_no_command_prints_third_party_noise(tmp_path):
    from transformers import AutoModelForCausalLM

    model_dir = _hf_models.save_tiny("llama", tmp_path / "model")
    model = lk.apply_lora(AutoModelForCausalLM.from_pretrained(model_dir), lk.LoraConfig(rank=2), ["q_proj"])
    adapter = lk.save_adapters(model, tmp_path / "adapter")
    r = subprocess.run(
        [sys.executable, "-c", CHILD, str(adapter), str(model_dir)], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    assert "inspect: 0" in r.stdout and "export" in r.stdout.splitlines()[-1]
    assert r.stderr == ""  # not "Failed to load ... .so", no pytree warning, no "Loading weights" bar
