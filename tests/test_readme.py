"""The README's API tour runs as written (its first Python block), and its commands are the ones CI uses."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_api_tour_runs(tmp_path, monkeypatch):
    block = re.findall(r"```python\n(.*?)```", README, re.S)[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {})
    assert (tmp_path / "adapters" / "fc1.safetensors").is_file()
    assert (tmp_path / "adapters" / "adapter_config.json").is_file()


def test_the_two_commands_come_first_and_ci_runs_the_test_command():
    commands = re.findall(r"```bash\n(.*?)```", README, re.S)[0].strip().splitlines()
    assert len(commands) == 2
    run, test = (c.split("#")[0].strip() for c in commands)
    assert run.endswith("lorakit example") and "pytest" in test
    ci = (ROOT / ".ci" / "run").read_text()
    setup, _, pytest_cmd = test.partition(" && ")
    assert "scripts/setup.sh dev" in ci and pytest_cmd in ci
