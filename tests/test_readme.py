"""The README's API tour runs as written (its first Python block), and its commands are the ones CI uses:
.ci/run sets up with the first half of the test command and runs its second half as the last step."""

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
    assert len(commands) == 2  # exactly two; the next block (`lorakit example chat`) runs in test_first_hour.py
    run, test = (c.split("#")[0].strip() for c in commands[:2])
    assert run.endswith("lorakit example") and "pytest" in test
    ci = (ROOT / ".ci" / "run").read_text()
    setup, _, pytest_cmd = test.partition(" && ")
    assert setup == "bash scripts/setup.sh dev" and re.search(rf"^setup\(\) {{ {setup}; }}$", ci, re.M)
    tests_step = re.search(r"^tests\(\) {\n(.*?)^}", ci, re.M | re.S)
    assert tests_step and pytest_cmd in tests_step.group(1)
    steps = re.search(r"^ALL=\((.*)\)$", ci, re.M).group(1).split()
    assert steps[0] == "setup" and steps[-1] == "tests"  # set up first; the README's test command runs last


def test_many_adapters_snippet_runs_after_the_tour(tmp_path, monkeypatch):
    """The "Many adapters on one base" block, as written, in the namespace the tour left (a reader's session)."""
    tour, many = re.findall(r"```python\n(.*?)```", README, re.S)[:2]
    assert "### Many adapters on one base\n\n```python\n" + many in README
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(tour, "README.md", "exec"), namespace)
    exec(compile(many, "README.md", "exec"), namespace)
    import lorakit as lk

    model = namespace["model"]
    assert lk.list_adapters(model) == ["math", "mix"]  # code deleted; the combination kept
    assert namespace["logits"].shape == (4, 8, 100)
    assert (tmp_path / "adapters" / "mix" / "adapter_model.safetensors").is_file()
