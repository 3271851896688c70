"""`lorakit example chat` in process, where it refuses to start or a check fails: fast, without training.

The whole run is tests/examples/test_first_hour.py (slow).
"""

from __future__ import annotations

import sys

import pytest

from lorakit.examples import chat_tasks
from lorakit.examples.chat_example import MARKER, ChatExampleOptions, Scores, _claim, _report, run


def test_a_missing_package_is_named_with_the_pip_command(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "openai", None)  # what Python does for a module that cannot be imported
    assert run(ChatExampleOptions(out=tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert f"needs openai: {sys.executable} -m pip install openai" in err
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_an_out_holding_other_files_is_refused_and_left_as_it_was(tmp_path, capsys) -> None:
    mine = tmp_path / "notes.txt"
    mine.write_text("keep me")
    (tmp_path / "base").mkdir()
    assert run(ChatExampleOptions(out=tmp_path)) == 2
    assert "not this example's; choose a new or empty --out" in capsys.readouterr().err
    assert mine.read_text() == "keep me" and (tmp_path / "base").is_dir() and not (tmp_path / MARKER).exists()
    assert run(ChatExampleOptions(out=mine)) == 2
    assert "is a file" in capsys.readouterr().err and mine.read_text() == "keep me"


def test_a_rerun_clears_only_the_example_parts(tmp_path) -> None:
    _claim(tmp_path)
    (tmp_path / "adapters" / "reverse").mkdir(parents=True)
    (tmp_path / "gguf").mkdir()
    (tmp_path / "mine.txt").write_text("mine")
    _claim(tmp_path)
    assert not (tmp_path / "adapters").exists() and not (tmp_path / "gguf").exists()
    assert (tmp_path / "mine.txt").read_text() == "mine" and (tmp_path / MARKER).is_file()


def _scores(reverse_right: int, held_out: list[str]) -> Scores:
    """Completions of a base that answers with its skill and of adapters right on the first `reverse_right`."""
    tasks = ("next", "reverse", "sort")
    base = {t: [chat_tasks.answer("next", x) for x in held_out] for t in tasks}
    rev = [chat_tasks.answer("reverse", x) if i < reverse_right else "000" for i, x in enumerate(held_out)]
    srt = [chat_tasks.answer("sort", x) for x in held_out]
    completions = {"base": base, "reverse": {**base, "reverse": rev}, "sort": {**base, "sort": srt}}
    accuracy = {m: {t: chat_tasks.exact_match(c[t], t, held_out) for t in tasks} for m, c in completions.items()}
    return Scores(completions, accuracy)


@pytest.mark.parametrize(("right", "passed"), [(10, True), (4, False)])
def test_the_accuracy_check_fails_below_the_bar(capsys, right: int, passed: bool) -> None:
    held_out = list(chat_tasks.split(0).held_out[:10])
    assert _report(_scores(right, held_out)) is passed
    out = capsys.readouterr().out
    assert "base       100%       0%    0%" in out  # the base's skill is never another task's answer
    assert ("FAILED: expected at least 50%" in out) is not passed


def test_the_tasks_split_without_overlap_and_the_base_skill_never_answers_them() -> None:
    split = chat_tasks.split(0)
    parts = [set(split.held_out), set(split.valid), set(split.train)]
    assert sum(map(len, parts)) == 1000 and len(set.union(*parts)) == 1000
    for x in (f"{i:03d}" for i in range(1000)):
        assert chat_tasks.answer("next", x) not in (chat_tasks.answer("reverse", x), chat_tasks.answer("sort", x))
