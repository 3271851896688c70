"""Preference pairs (task dpo) and prompts (task grpo): tokenised as TRL 1.16 tokenises them (TRL is the oracle),
bad rows named by file:line, batched in TRL's layouts, and a finetune job that starts from an SFT adapter and keeps
another frozen as the reference."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))
import _hf_models  # noqa: E402

pytest.importorskip("transformers")

import torch  # noqa: E402

import lorakit as lk  # noqa: E402
from lorakit.hf import data, finetune  # noqa: E402
from lorakit.hf import models as hf  # noqa: E402
from lorakit.hf.examples import form_lines  # noqa: E402
from lorakit.hf.preference_batches import collate_pairs, collate_prompts  # noqa: E402
from lorakit.train import DPOConfig, GRPOConfig, TrainConfig  # noqa: E402

PAIR_KEYS = ("prompt_ids", "chosen_ids", "rejected_ids")
SYSTEM = {"role": "system", "content": "you are a helpful bot"}


def _user(text):
    return [{"role": "user", "content": text}]


def _bot(text):
    return [{"role": "assistant", "content": text}]


# max_length 13: the first row just fits, the third's completions are cut, the fourth's prompt fills it (TRL drops it)
PLAIN_PAIRS = [
    {"prompt": "question : what is two plus two ? answer :", "chosen": " four", "rejected": " five"},
    {"prompt": "the cat sat", "chosen": " on the mat", "rejected": " in the park"},
    {"prompt": "the quick brown fox jumps over the lazy dog", "chosen": " one two three", "rejected": " a bird"},
    {"prompt": "one two three four five one two three four five one two three", "chosen": " good", "rejected": " a"},
]
LONG = "the quick brown fox jumps over the lazy dog"
# max_length 22: the first row just fits, the third is cut, the fourth's prompt fills it
CHAT_PAIRS = [
    {"prompt": [SYSTEM, *_user("what is two plus two ?")], "chosen": _bot("four"), "rejected": _bot("five")},
    {"prompt": _user("hello world"), "chosen": _bot("good morning"), "rejected": _bot("the dog ran in the park")},
    {"prompt": _user(LONG), "chosen": _bot("one two three four five " * 2), "rejected": _bot("a bird sang a song")},
    {"prompt": [SYSTEM, *_user(f"{LONG} {LONG}")], "chosen": _bot("four"), "rejected": _bot("five")},
]


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tok():
    return _hf_models.tokenizer(bos=True, chat=True)  # ChatML template, <|im_end|> the EOS


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return _hf_models.save_tiny("llama", tmp_path_factory.mktemp("pref") / "model", chat_template=_hf_models.CHATML)


def _trl_pairs(tok, rows, max_length, out):
    """TRL's DPOTrainer's tokenised rows (after its max_length filter) and its collator's batch of them."""
    import transformers
    from datasets import Dataset
    from trl import DPOConfig as TRLDPOConfig
    from trl import DPOTrainer

    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    args = TRLDPOConfig(output_dir=str(out), max_length=max_length, report_to="none", use_cpu=True)
    trainer = DPOTrainer(
        model=transformers.LlamaForCausalLM(config), ref_model=transformers.LlamaForCausalLM(config), args=args,
        train_dataset=Dataset.from_list(rows), processing_class=tok,
    )  # fmt: skip
    kept = [{k: list(r[k]) for k in PAIR_KEYS} for r in trainer.train_dataset]
    return kept, trainer.data_collator(kept)


@pytest.mark.parametrize(("rows", "max_length"), [(PLAIN_PAIRS, 13), (CHAT_PAIRS, 22)], ids=["plain", "chat"])
def test_dpo_rows_are_tokenised_and_cut_as_trl_does(tmp_path, tok, rows, max_length):
    train = _jsonl(tmp_path / "train.jsonl", rows)
    valid = _jsonl(tmp_path / "valid.jsonl", rows[:1])
    prepared = data.prepare(train, "dpo", tok, valid_path=valid, max_length=max_length, skip_bad_rows=True)
    trl_rows, batch = _trl_pairs(tok, rows, max_length, tmp_path / "trl")
    assert len(trl_rows) == 3, "the fourth row's prompt fills max_length: TRL drops it"
    # TRL's collator cuts prompt + completion to max_length (keep_start); the rows here come cut
    cut = [{k: r[k][: max_length - len(r["prompt_ids"])] if k != "prompt_ids" else r[k] for k in r} for r in trl_rows]
    assert prepared.train == cut
    assert cut[:2] == trl_rows[:2] and cut[2] != trl_rows[2]  # the first rows whole, the third cut
    assert len(prepared.bad_rows) == 1, prepared.bad_rows
    assert str(prepared.bad_rows[0]).startswith(f"{train}:4: the prompt has ")
    assert f"tokens and fills max_length={max_length}; no completion token would be left" in str(prepared.bad_rows[0])
    ours = collate_pairs(prepared.train, tok.pad_token_id)
    assert ours.keys() == batch.keys()
    for key, value in batch.items():
        assert torch.equal(ours[key], value), key
    assert (prepared.chat_template is not None) == isinstance(rows[0]["prompt"], list)


def _trl_prompt_ids(tok, prompts):
    """TRL's GRPOTrainer._tokenize_prompts on these prompts (a trainer without tools, environments or images)."""
    from trl import GRPOTrainer

    trainer = SimpleNamespace(processing_class=tok, _is_vlm=False, environment_factories=None, tools=None,
                              chat_template=None, chat_template_kwargs={})  # fmt: skip
    ids, _, _ = GRPOTrainer._tokenize_prompts(trainer, prompts)
    return [list(i) for i in ids]


def test_grpo_prompts_are_tokenised_as_trl_does(tmp_path, tok):
    from trl import apply_chat_template

    plain = ["question : what is two plus two ? answer :", "the cat sat"]
    chats = [[SYSTEM, *_user("what colour is the sky ?")], _user("hello world")]
    rows = [{"prompt": plain[0], "answer": "four"}, {"prompt": plain[1]}, {"messages": chats[0], "answer": "blue"},
            {"prompt": chats[1]}]  # fmt: skip  # TRL's conversational prompt column, and ours: 'messages'
    prepared = data.prepare(
        _jsonl(tmp_path / "t.jsonl", rows), "grpo", tok, valid_path=_jsonl(tmp_path / "v.jsonl", rows[:1])
    )
    assert [r["prompt_ids"] for r in prepared.train] == _trl_prompt_ids(tok, plain) + _trl_prompt_ids(tok, chats)
    texts = plain + [apply_chat_template({"prompt": c}, tok)["prompt"] for c in chats]
    assert [r["prompt"] for r in prepared.train] == texts
    assert [r["answer"] for r in prepared.train] == ["four", None, "blue", None]


DPO_GOOD = {"prompt": "hello", "chosen": " world", "rejected": " good morning"}
DPO_BAD = [  # (row, what its reason says), on lines 2, 3, ...
    ({"prompt": "hello", "chosen": " world"}, "missing field 'rejected'; the row has 'prompt', 'chosen'"),
    ({"prompt": "hello", "chosen": " world", "rejected": " world"}, "'chosen' and 'rejected' are the same"),
    ({"prompt": "hello", "chosen": " ", "rejected": " world"}, "field 'chosen' is empty"),
    ({"prompt": "hello", "chosen": 3, "rejected": " world"}, "field 'chosen' is a int ('3'); expected a string or"),
    (
        {"prompt": _user("hello"), "chosen": "world", "rejected": _bot("good")},
        "field 'prompt' is a list of messages "
        "but 'chosen' is a string; give all three as text or all three as messages",
    ),  # fmt: skip
    (
        {"prompt": _user("hello"), "chosen": _user("world"), "rejected": _bot("good")},
        "chosen[0] has role 'user'; a completion is the assistant's reply",
    ),  # fmt: skip
    (
        {"prompt": [{"role": "tool", "content": "x"}], "chosen": _bot("a"), "rejected": _bot("b")},
        "prompt[0] has role 'tool'; expected one of system, user, assistant",
    ),  # fmt: skip
    ({"prompt": _user("hello"), "chosen": [], "rejected": _bot("b")}, "field 'chosen' is empty"),
    ({"messages": _user("hello")}, "dpo rows are {prompt, chosen, rejected}"),
    ("{not json", "not valid JSON"),
]
GRPO_GOOD = {"prompt": "hello", "answer": "world"}
GRPO_BAD = [
    ({"answer": "x"}, "missing field 'prompt' (or 'messages'); the row has 'answer'"),
    ({"prompt": "  "}, "field 'prompt' is empty"),
    ({"prompt": "hello", "messages": _user("hello")}, "has both 'prompt' and 'messages'; use one form per row"),
    ({"prompt": "hello", "answer": 4}, "field 'answer' is a int ('4'); expected a string (write a number as text"),
    ({"messages": "hello"}, "field 'messages' is a str ('hello'); expected a list of {role, content} messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0] has role 'robot'"),
    ({"prompt": 5}, "field 'prompt' is a int ('5'); expected a string or a list of messages"),
    ({"prompt": "one two three four five " * 3}, "the prompt has 16 tokens, over max_length=8"),
]


@pytest.mark.parametrize(("task", "good", "bad"), [("dpo", DPO_GOOD, DPO_BAD), ("grpo", GRPO_GOOD, GRPO_BAD)])
def test_bad_rows_are_named_by_file_and_line(tmp_path, tok, task, good, bad):
    path = _jsonl(tmp_path / "rows.jsonl", [good] + [row for row, _ in bad] + [good])
    valid = _jsonl(tmp_path / "valid.jsonl", [good])
    with pytest.raises(data.BadRowsError) as caught:
        data.prepare(path, task, tok, valid_path=valid, max_length=8)
    found = [str(b) for b in caught.value.bad_rows]
    assert len(found) == len(bad), found
    for line, (_, reason) in enumerate(bad, start=2):
        assert f"{path}:{line}: " in found[line - 2] and reason in found[line - 2], (line, found[line - 2], reason)
    kept = data.prepare(path, task, tok, valid_path=valid, max_length=8, skip_bad_rows=True)
    assert len(kept.train) == 2 and [str(b) for b in kept.bad_rows] == found


def test_csv_columns_are_checked_and_csv_rows_read(tmp_path, tok):
    short = tmp_path / "short.csv"
    short.write_text("prompt,chosen\nhello,world\n", encoding="utf-8")
    with pytest.raises(data.DataError, match="expected columns prompt,chosen,rejected; the header has prompt,chosen"):
        data.prepare(short, "dpo", tok)
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(
        "prompt,chosen,rejected,score\nhello, world, good morning,3\nthe cat, sat, ran,1\n", encoding="utf-8"
    )
    rows = [{"prompt": "hello", "chosen": " world", "rejected": " good morning"},
            {"prompt": "the cat", "chosen": " sat", "rejected": " ran"}]  # fmt: skip
    from_csv = data.prepare(pairs, "dpo", tok, valid_path=pairs)
    assert from_csv.train == data.prepare(_jsonl(tmp_path / "p.jsonl", rows), "dpo", tok, valid_path=pairs).train
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("prompt,answer\nhello,world\nthe cat,\n", encoding="utf-8")
    assert [r["answer"] for r in data.prepare(prompts, "grpo", tok, valid_path=prompts).train] == ["world", None]
    with pytest.raises(data.DataError, match="expected columns prompt, or messages; the header has question"):
        (tmp_path / "q.csv").write_text("question\nhello\n", encoding="utf-8")
        data.prepare(tmp_path / "q.csv", "grpo", tok)


@pytest.mark.parametrize("task", ["dpo", "grpo"])
def test_a_data_directory_gives_the_rows_a_file_gives(tmp_path, tok, task):
    rows = CHAT_PAIRS[:3] if task == "dpo" else [{"messages": c["prompt"], "answer": "x"} for c in CHAT_PAIRS[:2]]
    rows += [{"prompt": "hello"}] if task == "grpo" else []
    (tmp_path / "dir").mkdir()
    _jsonl(tmp_path / "dir" / "a.jsonl", rows)
    valid = _jsonl(tmp_path / "valid.jsonl", rows[:1])
    from_dir = data.prepare(tmp_path / "dir", task, tok, valid_path=valid, max_length=20, cache_dir=tmp_path / "cache")
    from_file = data.prepare(tmp_path / "dir" / "a.jsonl", task, tok, valid_path=valid, max_length=20)
    assert [from_dir.train[i] for i in range(len(from_dir.train))] == from_file.train
    assert from_dir.chat_template == from_file.chat_template is not None


def test_collate_layouts_match_trl():
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    rows = [{"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6], "ref_chosen_logps": -1.5,
             "ref_rejected_logps": -2.0},
            {"prompt_ids": [7], "chosen_ids": [9], "rejected_ids": [10, 11, 12, 13], "ref_chosen_logps": -0.5,
             "ref_rejected_logps": -3.0}]  # fmt: skip
    ours, trl = collate_pairs(rows, pad_id=0), DataCollatorForPreference(pad_token_id=0)(rows)
    assert ours.keys() == trl.keys()
    for key in trl:
        assert torch.equal(ours[key], trl[key]), key
    assert ours["input_ids"].shape == (4, 5) and ours["input_ids"].dtype == torch.long
    assert ours["input_ids"][1].tolist() == [7, 9, 0, 0, 0]  # right-padded
    assert ours["completion_mask"][3].tolist() == [0, 1, 1, 1, 1]
    assert ours["ref_chosen_logps"].dtype == torch.float32 and ours["ref_chosen_logps"].tolist() == [-1.5, -0.5]
    assert "ref_chosen_logps" not in collate_pairs([{k: r[k] for k in PAIR_KEYS} for r in rows], pad_id=0)
    prompts = collate_prompts([{"prompt_ids": [1, 2, 3], "prompt": "a", "answer": "x"},
                               {"prompt_ids": [4], "prompt": "b", "answer": None}], pad_id=0)  # fmt: skip
    assert prompts["prompt_ids"].tolist() == [[1, 2, 3], [0, 0, 4]]  # left-padded: completions start together
    assert prompts["prompt_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert prompts["prompt"] == ["a", "b"] and prompts["answer"] == ["x", None]


def test_the_help_lists_the_row_forms_of_dpo_and_grpo():
    assert form_lines("dpo")[0].startswith('{"prompt": ..., "chosen": ..., "rejected": ...}  (')
    assert [line.split("  (")[0] for line in form_lines("grpo")] == ['{"prompt": ...}', '{"messages": [...]}']
    assert hf.TRAIN_TASKS == ("causal-lm", "seq-cls", "dpo", "grpo")
    assert [hf.model_task(t) for t in hf.TRAIN_TASKS] == ["causal-lm", "seq-cls", "causal-lm", "causal-lm"]


def _job(model_dir, tmp_path, **kw):
    rows = _jsonl(tmp_path / "pairs.jsonl", PLAIN_PAIRS[:3])
    settings = {"model": model_dir, "data": rows, "valid": rows, "task": "dpo", "out": tmp_path / "out",
                "max_length": 13, "batch_size": 2, "train": TrainConfig(epochs=1)} | kw  # fmt: skip
    return finetune.FinetuneJob(**settings)


def test_the_job_checks_its_align_settings(model_dir, tmp_path):
    assert _job(model_dir, tmp_path).align == DPOConfig()
    assert _job(model_dir, tmp_path, task="grpo").align == GRPOConfig()
    cases = [
        ({"align": GRPOConfig()}, "align=GRPOConfig(...) does not fit task 'dpo': expected a DPOConfig"),
        ({"task": "causal-lm", "align": DPOConfig()}, "align=DPOConfig(...) is for tasks dpo, grpo"),
        ({"init_adapter": "a", "lora": lk.LoraConfig(rank=4, alpha=16.0)}, "lora.rank=4 conflicts with init_adapter"),
        ({"init_adapter": "a", "targets": ["q_proj"]}, "targets=['q_proj'] conflicts with init_adapter"),
        ({"task": "causal-lm", "ref_adapter": "a"}, "ref_adapter='a' is for tasks dpo, grpo"),
        ({"ref_adapter": "a", "align": DPOConfig(loss_type="simpo")}, "not used by loss_type='simpo'"),
        ({"align": DPOConfig(reference="sft")}, "align.reference='sft': the reference adapter is the one the job"),
    ]
    for kw, message in cases:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            _job(model_dir, tmp_path, **kw)


@pytest.fixture(scope="module")
def sft_adapters(model_dir, tmp_path_factory):
    """Two SFT adapters on q_proj/v_proj with random B (so that neither is the base), and their factors by name."""
    saved = []
    for seed in (1, 2):
        model = hf.load_model(model_dir, "causal-lm")
        lk.apply_lora(model, lk.LoraConfig(rank=2, alpha=4.0), ["q_proj", "v_proj"])
        torch.manual_seed(seed)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p)
        out = lk.save_adapters(model, tmp_path_factory.mktemp(f"sft{seed}"))
        saved.append((out, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}))
    return saved


def test_prepare_starts_from_the_init_adapter_and_freezes_the_reference(model_dir, tmp_path, sft_adapters):
    (init_dir, init), (ref_dir, ref) = sft_adapters
    setup = finetune.prepare(_job(model_dir, tmp_path, init_adapter=init_dir, ref_adapter=ref_dir))
    model = setup.model
    assert lk.list_adapters(model) == ["default", "reference"] and lk.active_adapter(model) == "default"
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trained.keys() == init.keys()  # the init adapter's factors train, nothing else
    assert all(torch.equal(trained[n], init[n]) for n in init)
    with lk.use_adapter(model, "reference"):
        now = dict(model.named_parameters())
        assert all(torch.equal(now[n], ref[n]) for n in ref)
    assert setup.job.align == DPOConfig(reference="reference")
    batch = next(iter(setup.train_loader))
    assert batch.keys() == {"input_ids", "attention_mask", "completion_mask"} and batch["input_ids"].shape[0] == 4
    with pytest.raises(ValueError, match=r"task 'dpo' trains with lorakit\.align\.job\.run\(setup\)"):
        finetune.run(setup)


def test_a_grpo_job_gets_fresh_lora_and_prompt_batches(model_dir, tmp_path):
    rows = _jsonl(tmp_path / "prompts.jsonl", [{"prompt": "the cat sat", "answer": "on"}, {"messages": _user("hi")}])
    setup = finetune.prepare(_job(model_dir, tmp_path, task="grpo", data=rows, valid=rows))
    assert lk.list_adapters(setup.model) == ["default"] and setup.job.align == GRPOConfig()
    batch = next(iter(setup.valid_loader))
    assert batch["prompt_mask"][:, -1].tolist() == [1, 1] and batch["answer"] == ["on", None]


def test_a_refused_input_leaves_out_as_it_was(model_dir, tmp_path, sft_adapters):
    bad = _jsonl(tmp_path / "bad.jsonl", [DPO_GOOD, DPO_BAD[0][0]])
    out = tmp_path / "out"
    with pytest.raises(data.BadRowsError, match=r"bad\.jsonl:2: missing field 'rejected'"):
        finetune.prepare(_job(model_dir, tmp_path, data=bad, valid=bad))
    assert not out.exists()
    out.mkdir()
    with pytest.raises(FileNotFoundError, match=r"not an adapter directory \(ref_adapter\): no adapter_config\.json"):
        finetune.prepare(_job(model_dir, tmp_path, ref_adapter=tmp_path))
    with pytest.raises(FileNotFoundError, match=r"no such adapter directory \(init_adapter\)"):
        finetune.prepare(_job(model_dir, tmp_path, init_adapter=tmp_path / "nowhere"))
    assert out.is_dir() and not any(out.iterdir())
