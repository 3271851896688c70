"""`lorakit eval` on chat rows: it scores the format the adapter trained on (the template saved beside it), and
without a template it names its own flag.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))
import _hf_models  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _cli import _write_jsonl, lorakit  # noqa: E402

transformers = pytest.importorskip("transformers")

from lorakit.cli import main  # noqa: E402

pytestmark = pytest.mark.slow  # subprocesses, servers or export runtimes: not in the fast set

transformers.utils.logging.set_verbosity_error()

# -- chat: eval scores the format the adapter trained on ------------------------------------------------------

TURN_TEMPLATE = (  # not the tokenizer's ChatML: a format only the adapter's saved template can reproduce
    "{% for m in messages %}{{ m['role'] + ' : ' + m['content'] + ' ' }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token + ' ' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant : ' }}{% endif %}"
)


def test_eval_uses_the_adapters_chat_template_and_reproduces_finetune_valid_loss(tmp_path, capsys):
    """finetune's own reported valid loss is the oracle: eval of its adapter on the same valid file must equal it,
    which holds only when eval renders the chat rows with the template the adapter trained with (saved beside it),
    not the tokenizer's own ChatML."""
    model = _hf_models.save_tiny("llama", tmp_path / "llama", chat_template=_hf_models.CHATML)
    template = tmp_path / "turns.jinja"
    template.write_text(TURN_TEMPLATE, encoding="utf-8")
    qa = [("what is two plus two ?", "four"), ("what colour is the sky ?", "blue"), ("good morning", "hello world")]
    chats = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in qa]
    train, valid = _write_jsonl(tmp_path / "train.jsonl", chats * 4), _write_jsonl(tmp_path / "valid.jsonl", chats * 2)
    out = tmp_path / "adapter"
    r = lorakit(
        "finetune",
        "--model",
        model,
        "--data",
        train,
        "--valid",
        valid,
        "--task",
        "causal-lm",
        "--out",
        out,
        "--chat-template",
        template,
        "--rank",
        "4",
        "--epochs",
        "2",
        "--lr",
        "1e-2",
        "--batch-size",
        "8",
        "--device",
        "cpu",
        "--plain",
        timeout=300,  # the 300 s of test_cli_eval.py's own helper, where this test was
    )
    assert r.returncode == 0, r.stderr
    after = json.loads((out / "run" / "finetune_report.json").read_text())["after"]

    def scored(*extra) -> dict:
        assert (
            main(
                [
                    "eval",
                    "--model",
                    str(model),
                    "--adapter",
                    f"a={out}",
                    "--data",
                    str(valid),
                    "--json",
                    *map(str, extra),
                ]
            )
            == 0
        )
        return json.loads(capsys.readouterr().out)

    report = scored()
    assert report["adapters"]["a"]["loss"] == pytest.approx(after["loss"], abs=1e-5)
    chatml = tmp_path / "chatml.jinja"
    chatml.write_text(_hf_models.CHATML, encoding="utf-8")
    other = scored("--chat-template", chatml)  # the flag overrides the saved template: another format, scored
    assert abs(other["adapters"]["a"]["loss"] - report["adapters"]["a"]["loss"]) > 1e-3
    assert scored("--chat-template", template) == report
    print(
        f"\nfinetune valid loss {after['loss']:.6f}; eval {report['adapters']['a']['loss']:.6f}, "
        f"with ChatML {other['adapters']['a']['loss']:.6f}"
    )


def test_eval_without_a_template_names_its_own_flag(tmp_path, capsys):
    bare = _hf_models.save_tiny("llama", tmp_path / "bare", chat_template="")
    rows = _write_jsonl(
        tmp_path / "chat.jsonl",
        [{"messages": [{"role": "user", "content": "good morning"}, {"role": "assistant", "content": "hello world"}]}],
    )
    assert main(["eval", "--model", str(bare), "--data", str(rows)]) == 2
    assert "pass --chat-template FILE" in capsys.readouterr().err
    template = tmp_path / "t.jinja"
    template.write_text(TURN_TEMPLATE, encoding="utf-8")
    assert main(["eval", "--model", str(bare), "--data", str(rows), "--chat-template", str(template), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["base"]["tokens"] == 3  # 'hello world' and the EOS after it
