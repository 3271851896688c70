"""lorakit.data: every bad row named by file:line, file-level problems refused, prompt tokens masked."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
import _hf_models  # noqa: E402

pytest.importorskip("transformers")

from lorakit.hf import data  # noqa: E402
from lorakit.hf.data import DataError  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return _hf_models.tokenizer(bos=True)


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def _bad(path, task, **kw) -> list[str]:
    records, bad = data.read_records(path)
    _, more = data.validate(path, records, task, **kw)
    return [str(b) for b in sorted(bad + more, key=lambda b: b.line)]


# -- rows and their line numbers ------------------------------------------------------------------


def test_causal_rows_bad_ones_named_by_file_and_line(tmp_path):
    p = _jsonl(
        tmp_path / "t.jsonl",
        [
            {"text": "the cat"},  # 1 ok
            {"prompt": "q", "completion": "a"},  # 2 ok
            "",  # 3 blank: skipped
            "{not json",  # 4
            {"text": ""},  # 5 empty
            {"text": 3},  # 6 wrong type
            {"prompt": "q"},  # 7 no completion
            {"body": "x"},  # 8 missing field
            [1, 2],  # 9 not an object
            {"text": "a", "prompt": "b", "completion": "c"},  # 10 both forms
        ],
    )
    bad = _bad(p, "causal-lm")
    assert [b.split(":")[1] for b in bad] == ["4", "5", "6", "7", "8", "9", "10"]
    assert f"{p}:4: not valid JSON" in bad[0]
    assert "field 'text' is empty" in bad[1] and "is a int" in bad[2] and "missing field 'completion'" in bad[3]
    assert (
        "missing field 'text' (or 'prompt' and 'completion', or 'messages', or 'instruction' and 'output'); "
        "the row has 'body'"
    ) in bad[4]
    assert "expected a JSON object, got list" in bad[5] and "both" in bad[6]


def test_seq_cls_labels_str_or_int_and_unknown_labels(tmp_path):
    p = _jsonl(
        tmp_path / "t.jsonl",
        [
            {"text": "a", "label": "pos"},
            {"text": "b", "label": "neg"},
            {"text": "c", "label": True},
            {"text": "d", "label": 1.5},
            {"text": "e"},
            {"text": "f", "label": ""},
            {"text": "g", "label": -1},
        ],
    )
    bad = _bad(p, "seq-cls")
    assert [b.split(": ", 1)[1] for b in bad] == [
        "label True is a bool; expected a string or an int",
        "label 1.5 is a float; expected a string or an int",
        "missing field 'label'; the row has 'text'",
        "label is empty",
        "label -1 is negative; int labels are class ids 0, 1, 2, ...",
    ]
    examples, _ = data.validate(p, data.read_records(p)[0], "seq-cls")
    id2label = data.label_names(examples)
    assert id2label == {0: "neg", 1: "pos"}
    v = _jsonl(tmp_path / "v.jsonl", [{"text": "x", "label": "pos"}, {"text": "y", "label": "meh"}])
    assert _bad(v, "seq-cls", label2id=data.label_to_id(id2label, examples)) == [
        f"{v}:2: unknown label 'meh'; the training labels are 'neg', 'pos'"
    ]


def test_int_labels_with_gaps_are_refused_not_made_into_phantom_classes(tmp_path, tok):
    p = _jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": x} for x in (0, 1, 2, 7, 1, 0)])
    with pytest.raises(DataError) as e:
        data.prepare(p, "seq-cls", tok)
    assert str(e.value) == (
        f"int labels are class ids: 0, 1, 2, 7 would make 8 classes, and 3, 4, 5, 6 never occur in the training "
        f'data ({p}:4 has 7); renumber the labels 0..3, or write them as strings ("7") to use them as class names'
    )
    strings = _jsonl(tmp_path / "s.jsonl", [{"text": "a", "label": str(x)} for x in (0, 1, 2, 7, 1, 0)])
    assert data.prepare(strings, "seq-cls", tok, valid_path=strings).id2label == {0: "0", 1: "1", 2: "2", 3: "7"}


def test_csv_header_without_the_task_columns_is_refused_once(tmp_path, tok):
    p = tmp_path / "t.csv"
    p.write_text("text,lbl\nthe cat,pos\nthe dog,neg\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        data.prepare(p, "seq-cls", tok)
    assert str(e.value) == f"{p}: expected columns text,label; the header has text,lbl"
    q = tmp_path / "q.tsv"
    q.write_text("question\tanswer\nq\ta\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        data.prepare(q, "causal-lm", tok)
    assert str(e.value) == (
        f"{q}: expected columns text, or prompt,completion, or messages, or instruction,output; "
        "the header has question,answer"
    )
    ok = tmp_path / "ok.csv"
    ok.write_text("id,instruction,output\n1,greet,hello world\n2,count,one two three\n", encoding="utf-8")
    assert len(data.prepare(ok, "causal-lm", tok, valid_path=ok).train) == 2  # extra columns are fine


@pytest.mark.parametrize(
    "labels, want",
    [
        ([1, 0, 2], {0: "0", 1: "1", 2: "2"}),
        (["10", "9", "2"], {0: "2", 1: "9", 2: "10"}),  # numeric strings (CSV) sort as numbers
        (["b", "a"], {0: "a", 1: "b"}),
    ],
)
def test_label_names(labels, want):
    assert data.label_names([data.Example("f", i, "t", label=x) for i, x in enumerate(labels)]) == want


def test_label_names_refuses_mixed_kinds_and_one_class():
    with pytest.raises(DataError, match=r"mix strings and ints"):
        data.label_names([data.Example("f", 1, "t", label="a"), data.Example("f", 2, "t", label=1)])
    with pytest.raises(DataError, match="at least 2 labels"):
        data.label_names([data.Example("f", 1, "t", label="a")])


def test_csv_with_quoted_multiline_field_keeps_physical_line_numbers(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text('text,label\n"hello, world",pos\n"two\nlines",neg\nonly-one-field\n,neg\n', encoding="utf-8")
    records, bad = data.read_records(p)
    assert records == [
        (2, {"text": "hello, world", "label": "pos"}),
        (3, {"text": "two\nlines", "label": "neg"}),
        (6, {"text": "", "label": "neg"}),
    ]
    assert [str(b) for b in bad] == [f"{p}:5: has 1 fields; the header has 2 (text, label)"]
    assert [str(b) for b in data.validate(p, records, "seq-cls")[1]] == [f"{p}:6: field 'text' is empty"]
    tsv = tmp_path / "t.tsv"
    tsv.write_text("prompt\tcompletion\nq\ta\n", encoding="utf-8")
    assert data.read_records(tsv)[0] == [(2, {"prompt": "q", "completion": "a"})]


# -- a directory of Parquet and JSONL files, through datasets ------------------------------------------------


def _parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _cached() -> set[Path]:
    from datasets import config

    return set(Path(config.HF_DATASETS_CACHE).rglob("*"))


def test_directory_of_parquet_and_jsonl_files(tmp_path, tok):
    cached = _cached()
    d = tmp_path / "data"
    (d / "more").mkdir(parents=True)
    _parquet(
        d / "a.parquet",
        [
            {"text": "the cat sat", "label": "pos"},
            {"text": "", "label": "neg"},
            {"text": "the dog ran", "label": "neg"},
        ],
    )
    _jsonl(d / "more" / "b.jsonl", [{"text": "hello world", "label": "pos"}, "{bad", {"text": "good", "label": "neg"}])
    (d / "README.md").write_text("# not data\n")
    (d / "dataset_info.json").write_text('{\n  "not": "rows"\n}\n')
    (d / ".cache").mkdir()
    _jsonl(d / ".cache" / "x.jsonl", ["{junk"])
    with pytest.raises(DataError) as e:
        data.prepare(d, "seq-cls", tok)
    assert e.value.bad_rows == [
        data.BadRow(str(d / "a.parquet"), 1, "field 'text' is empty", "row"),
        data.BadRow(
            str(d / "more" / "b.jsonl"),
            2,
            "not valid JSON (Expecting property name enclosed in double quotes at column 2)",
        ),
    ]
    assert f"{d / 'a.parquet'}:row 1: field 'text' is empty" in str(e.value)
    assert f"{d / 'more' / 'b.jsonl'}:2: not valid JSON" in str(e.value)
    prepared = data.prepare(d, "seq-cls", tok, valid_path=d, skip_bad_rows=True)
    assert len(prepared.train) == 4 and prepared.id2label == {0: "neg", 1: "pos"}
    assert _cached() == cached and not list(d.rglob("*.lock"))  # the datasets cache went to a temporary directory


def test_parquet_chat_rows_and_file_level_problems(tmp_path, tok):
    chat_tok = _hf_models.tokenizer(bos=True, chat=True)
    d = tmp_path / "chat"
    d.mkdir()
    u, a = {"role": "user", "content": "hello world"}, {"role": "assistant", "content": "good morning"}
    _parquet(d / "c.parquet", [{"messages": [u, a]}, {"messages": [u, {**a, "train": False}, a]}, {"messages": [u]}])
    with pytest.raises(DataError) as e:
        data.prepare(d, "causal-lm", chat_tok, valid_path=d)
    assert [str(b) for b in e.value.bad_rows] == [
        f"{d / 'c.parquet'}:row 2: no assistant message; the loss falls on assistant turns only, so there is "
        "nothing to learn"
    ] * 2  # train and valid: the same directory
    prepared = data.prepare(d, "causal-lm", chat_tok, valid_path=d, skip_bad_rows=True)
    assert [sum(y != -100 for y in r["labels"]) for r in prepared.train] == [3, 3]  # good morning <|im_end|>
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    _parquet(wrong / "w.parquet", [{"body": "x"}])
    with pytest.raises(
        DataError,
        match=r"w.parquet: expected columns text, or prompt,completion, or messages, or "
        r"instruction,output; the file has body",
    ):
        data.prepare(wrong, "causal-lm", tok)
    (wrong / "w.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"w.parquet: not a readable Parquet file"):
        data.prepare(wrong, "causal-lm", tok)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"empty: no data files in this directory; expected .parquet, .jsonl"):
        data.prepare(empty, "causal-lm", tok)


# -- file-level problems --------------------------------------------------------------------------


def test_file_level_errors_are_clear(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        data.read_records(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match=r"unknown data format '\.txt'"):
        data.read_records(tmp_path / "x.txt")
    (tmp_path / "empty.jsonl").write_text("\n  \n")
    with pytest.raises(DataError, match="empty.jsonl: the file is empty"):
        data.read_records(tmp_path / "empty.jsonl")
    (tmp_path / "latin.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin.jsonl:2: not UTF-8 \(byte 0xe9 at column 14\)"):
        data.read_records(tmp_path / "latin.jsonl")
    (tmp_path / "utf16.jsonl").write_bytes('{"text": "hi"}\n'.encode("utf-16-le"))
    with pytest.raises(DataError, match="NUL bytes"):
        data.read_records(tmp_path / "utf16.jsonl")
    (tmp_path / "noheader.csv").write_text("\n\n")
    with pytest.raises(DataError, match="empty"):
        data.read_records(tmp_path / "noheader.csv")


def test_bom_is_accepted_and_huge_lines_become_bad_rows(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + b'{"text": "a"}\n' + b'{"text": "' + b"x" * 5000 + b'"}\n{"text": "b"}\n')
    records, bad = data.read_records(p, max_line_bytes=1000)
    assert [n for n, _ in records] == [1, 3]
    assert [str(b) for b in bad] == [f"{p}:2: line is longer than 1,000 bytes (max_line_bytes)"]


# -- tokenization ------------------------------------------------------------------------------------


def test_loss_only_on_completion_tokens(tok):
    ex = data.Example("f", 1, "question : what is two plus two ? answer :", completion="four")
    [enc], bad = data.encode([ex], tok, "causal-lm", max_length=64)
    prompt = tok(ex.text)["input_ids"]
    assert not bad and enc["input_ids"] == prompt + tok("four", add_special_tokens=False)["input_ids"] + [
        tok.eos_token_id
    ]
    assert enc["labels"] == [-100] * len(prompt) + enc["input_ids"][len(prompt) :]
    [plain], _ = data.encode([data.Example("f", 2, "the cat sat")], tok, "causal-lm", max_length=64)
    assert plain["labels"] == plain["input_ids"]


def test_prompt_filling_max_length_is_a_bad_row(tok):
    ex = data.Example("f.jsonl", 7, "one two three four five", completion="four")
    out, bad = data.encode([ex], tok, "causal-lm", max_length=4)
    assert out == [] and [str(b) for b in bad] == [
        "f.jsonl:7: the prompt fills max_length; nothing to learn from this row"
    ]


def test_seq_cls_encoding_needs_label2id_and_a_label(tok):
    # found by mypy: a missing label2id was a bare TypeError ('NoneType' is not subscriptable)
    with pytest.raises(ValueError, match="f.jsonl:3: seq-cls needs"):
        data.encode([data.Example("f.jsonl", 3, "hi", label="pos")], tok, "seq-cls", max_length=8)
    with pytest.raises(ValueError, match="f.jsonl:4: seq-cls needs"):
        data.encode([data.Example("f.jsonl", 4, "hi")], tok, "seq-cls", max_length=8, label2id={"pos": 0})
    [enc], _ = data.encode([data.Example("f.jsonl", 5, "hi", label="pos")], tok, "seq-cls", 8, {"pos": 0})
    assert enc["labels"] == 0


def test_collate_pads_and_masks():
    batch = data.collate(
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_id=0
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    cls = data.collate([{"input_ids": [5, 6], "labels": 1}, {"input_ids": [7], "labels": 0}], pad_id=0)
    assert cls["labels"].tolist() == [1, 0] and cls["labels"].dtype == torch.long


# -- the whole pipeline ----------------------------------------------------------------------------


def test_prepare_refuses_bad_rows_unless_skipped(tmp_path, tok):
    p = _jsonl(
        tmp_path / "t.jsonl",
        [{"text": f"the cat sat {i}", "label": "a" if i % 2 else "b"} for i in range(20)]
        + [{"text": "", "label": "a"}, {"txt": "x", "label": "b"}],
    )
    with pytest.raises(DataError) as e:
        data.prepare(p, "seq-cls", tok)
    assert "2 bad row(s)" in str(e.value) and f"{p}:21:" in str(e.value) and f"{p}:22:" in str(e.value)
    assert "skip_bad_rows=True" in str(e.value) and len(e.value.bad_rows) == 2
    prepared = data.prepare(p, "seq-cls", tok, skip_bad_rows=True, valid_fraction=0.25, seed=3)
    assert len(prepared.train) == 15 and len(prepared.valid) == 5 and len(prepared.bad_rows) == 2
    assert prepared.id2label == {0: "a", 1: "b"}
    again = data.prepare(p, "seq-cls", tok, skip_bad_rows=True, valid_fraction=0.25, seed=3)
    assert again.valid == prepared.valid  # the held-out split is seeded


def test_prepare_with_a_valid_file_checks_its_labels(tmp_path, tok):
    t = _jsonl(tmp_path / "t.jsonl", [{"text": "a b", "label": 0}, {"text": "c d", "label": 1}])
    v = _jsonl(tmp_path / "v.jsonl", [{"text": "e", "label": 1}, {"text": "f", "label": 2}])
    with pytest.raises(DataError, match=r"v.jsonl:2: unknown label 2"):
        data.prepare(t, "seq-cls", tok, valid_path=v)
    prepared = data.prepare(t, "seq-cls", tok, valid_path=v, skip_bad_rows=True)
    assert prepared.id2label == {0: "0", 1: "1"} and [r["labels"] for r in prepared.valid] == [1]
    with pytest.raises(DataError, match="no usable validation rows"):
        data.prepare(
            t, "seq-cls", tok, valid_path=_jsonl(tmp_path / "w.jsonl", [{"text": "e", "label": 5}]), skip_bad_rows=True
        )
