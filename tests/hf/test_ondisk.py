"""lorakit.hf.ondisk: a data directory tokenized into memory-mapped Arrow files, its memory bounded.

The directory path must give the rows the in-memory path gives for the same data (same order, same ids),
hold out a seeded split without a list of all rows, reuse its cache only for the same data and tokenizer,
pack without materialising, and train the same adapter as the same rows in one JSONL file.
"""

from __future__ import annotations

import gc
import json
import sys
import tracemalloc
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
import _hf_models  # noqa: E402

pytest.importorskip("datasets")

from lorakit.hf import data, ondisk, packing  # noqa: E402
from lorakit.hf.finetune import FinetuneJob, prepare, run  # noqa: E402
from lorakit.train import TrainConfig  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return _hf_models.tokenizer(bos=True)


def _rows(n: int) -> list[dict]:
    """n causal-lm rows of the three plain forms, their words from the tokenizer's vocabulary."""
    words = " ".join(_hf_models.SENTENCES).split()
    out: list[dict] = []
    for i in range(n):
        text = " ".join(words[(i * 7 + k) % len(words)] for k in range(8 + i % 9))
        if i % 3 == 0:
            out.append({"text": text})
        elif i % 3 == 1:
            out.append({"prompt": text, "completion": words[i % len(words)] + " " + words[(i + 1) % len(words)]})
        else:
            out.append({"instruction": text, "input": None, "output": words[i % len(words)]})
    return out


def _parquet_dir(d: Path, rows: list[dict], shards: int) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    d.mkdir(parents=True)
    size = -(-len(rows) // shards)
    for k in range(shards):
        part = rows[k * size : (k + 1) * size]
        cols = {
            key: [r.get(key) for r in part]
            for key in ("text", "prompt", "completion", "instruction", "input", "output")
        }
        pq.write_table(pa.table(cols, schema=pa.schema([(c, pa.string()) for c in cols])), d / f"part-{k:03d}.parquet")
    return d


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _all(rows) -> list[dict]:
    return [rows[i] for i in range(len(rows))]


def _peak(fn):
    """(result, peak bytes traced by tracemalloc while fn runs)."""
    gc.collect()
    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.slow
def test_a_directory_is_tokenized_into_arrow_with_bounded_memory(tmp_path, tok, monkeypatch):
    monkeypatch.setattr(ondisk, "BATCH_ROWS", 100)  # what the directory path holds at once: 100 rows, not 3000
    rows = _rows(3000)
    shards = _parquet_dir(tmp_path / "shards", rows, shards=6)
    valid = _jsonl(tmp_path / "valid.jsonl", rows[:5])  # the same validation rows for both paths
    one_file = _jsonl(tmp_path / "all.jsonl", rows)
    warm = _parquet_dir(tmp_path / "warm", rows[:6], shards=6)  # the first use imports datasets' builders (~7 MB)
    data.prepare(warm, "causal-lm", tok, valid_path=valid, max_length=64)
    (on_disk, disk_peak) = _peak(
        lambda: data.prepare(shards, "causal-lm", tok, valid_path=valid, max_length=64, cache_dir=tmp_path / "cache")
    )
    (in_memory, memory_peak) = _peak(lambda: data.prepare(one_file, "causal-lm", tok, valid_path=valid, max_length=64))
    assert isinstance(in_memory.train, list)
    assert not isinstance(on_disk.train, list) and type(on_disk.train).__name__ == "Dataset"
    assert on_disk.train.cache_files and all(
        f["filename"].startswith(str(tmp_path / "cache")) for f in on_disk.train.cache_files
    )  # memory-mapped files, ours
    assert disk_peak < memory_peak / 8, (disk_peak, memory_peak)
    assert len(on_disk.train) == len(in_memory.train) == 3000
    assert _all(on_disk.train) == in_memory.train and _all(on_disk.valid) == in_memory.valid  # ints, same order


def test_holdout_by_seeded_hash_and_small_directories_get_a_row_each_side(tmp_path, tok):
    rows = _rows(400)
    d = _parquet_dir(tmp_path / "d", rows, shards=2)
    a = data.prepare(d, "causal-lm", tok, valid_fraction=0.2, seed=3, cache_dir=tmp_path / "c1")
    b = data.prepare(d, "causal-lm", tok, valid_fraction=0.2, seed=3)  # a temporary cache: the same split
    c = data.prepare(d, "causal-lm", tok, valid_fraction=0.2, seed=4)
    assert len(a.train) + len(a.valid) == 400 and 40 <= len(a.valid) <= 120
    key = lambda r: json.dumps(r, sort_keys=True)  # noqa: E731
    everything = sorted(
        map(key, data.encode(data.validate("x", enumerate(rows), "causal-lm")[0], tok, "causal-lm", 256)[0])
    )
    assert sorted(map(key, _all(a.train) + _all(a.valid))) == everything  # every row once, on one side
    assert _all(a.valid) == _all(b.valid) and _all(a.valid) != _all(c.valid)
    small = _parquet_dir(tmp_path / "small", rows[:3], shards=1)
    for seed in range(4):
        p = data.prepare(small, "causal-lm", tok, valid_fraction=0.1, seed=seed)
        assert (len(p.train), len(p.valid)) == (2, 1)
    with pytest.raises(data.DataError, match="no usable validation rows"):
        data.prepare(_parquet_dir(tmp_path / "one", rows[:1], shards=1), "causal-lm", tok)
    with pytest.raises(ValueError, match=r"valid fraction 1\.0 is invalid"):
        data.prepare(d, "causal-lm", tok, valid_fraction=1.0)


def test_seq_cls_labels_from_a_directory_and_bad_rows_named(tmp_path, tok):
    d = tmp_path / "cls"
    d.mkdir()
    _jsonl(
        d / "a.jsonl",
        [{"text": "the cat sat", "label": "pos"}, {"text": "the dog ran", "label": "neg"}] * 20
        + [{"text": "", "label": "weird"}],
    )
    (d / "b.jsonl").write_text('{"text": "hello world", "label": "neg"}\n{oops\n', encoding="utf-8")
    with pytest.raises(data.BadRowsError) as e:
        data.prepare(d, "seq-cls", tok)
    assert [str(b) for b in e.value.bad_rows] == [
        f"{d / 'a.jsonl'}:41: field 'text' is empty",
        f"{d / 'b.jsonl'}:2: not valid JSON (Expecting property name enclosed in double quotes at column 2)",
    ]
    p = data.prepare(d, "seq-cls", tok, skip_bad_rows=True)
    assert p.id2label == {0: "neg", 1: "pos"}  # 'weird' was only on a bad row, as for a file
    assert len(p.train) + len(p.valid) == 41 and {r["labels"] for r in _all(p.train)} == {0, 1}
    (d / "c.jsonl").write_text('{"text": "good morning", "label": 1}\n', encoding="utf-8")
    with pytest.raises(data.DataError, match=r"labels mix strings and ints") as e:
        data.prepare(d, "seq-cls", tok, skip_bad_rows=True)
    assert f"{d / 'a.jsonl'}:1 has 'pos'" in str(e.value) and f"{d / 'c.jsonl'}:1 has 1" in str(e.value)


def test_the_cache_is_reused_for_the_same_inputs_and_rebuilt_when_they_change(tmp_path, tok):
    d = _parquet_dir(tmp_path / "d", _rows(30), shards=2)
    cache = tmp_path / "cache"
    first = data.prepare(d, "causal-lm", tok, cache_dir=cache)
    (built,) = [p for p in cache.iterdir()]
    stamp = (built / ondisk.META).stat().st_mtime_ns
    again = data.prepare(d, "causal-lm", tok, cache_dir=cache)
    assert [p for p in cache.iterdir()] == [built] and (built / ondisk.META).stat().st_mtime_ns == stamp
    assert _all(again.train) == _all(first.train)
    chat_tok = _hf_models.tokenizer(bos=True, chat=True)  # other ids for the same words
    other = data.prepare(d, "causal-lm", chat_tok, cache_dir=cache)
    assert [p.name for p in cache.iterdir()] != [built.name] and _all(other.train) != _all(first.train)
    key = ondisk.fingerprint(d, None, tok, {})
    tok("the cat", truncation=True, max_length=3)  # a call leaves truncation set on the backend: not a change
    assert ondisk.fingerprint(d, None, tok, {}) == key
    _parquet_dir(tmp_path / "d2", _rows(32), shards=2)  # its second shard has 16 rows, d's 15
    (d / "part-001.parquet").write_bytes((tmp_path / "d2" / "part-001.parquet").read_bytes())  # the data changed
    assert ondisk.fingerprint(d, None, tok, {}) != key
    changed = data.prepare(d, "causal-lm", tok, cache_dir=cache)
    assert len(changed.train) + len(changed.valid) == 31 and len(list(cache.iterdir())) == 1


def test_packing_reads_arrow_rows_on_access(tmp_path, tok):
    d = _parquet_dir(tmp_path / "d", _rows(50), shards=3)
    p = data.prepare(d, "causal-lm", tok, max_length=64)
    rows = packing.pack(p.train, 128)
    assert isinstance(rows, packing.PackedRows)
    assert _all(rows) == packing.pack(_all(p.train), 128)
    assert packing.summary(p.train, rows, 4, 0) == packing.summary(_all(p.train), _all(rows), 4, 0)
    cls = tmp_path / "cls"
    cls.mkdir()
    _jsonl(cls / "a.jsonl", [{"text": "the cat sat", "label": "pos"}, {"text": "the dog ran", "label": "neg"}] * 3)
    with pytest.raises(ValueError, match="class labels: packing is for causal-lm rows"):
        packing.pack(data.prepare(cls, "seq-cls", tok).train, 64)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return _hf_models.save_tiny("llama", tmp_path_factory.mktemp("models") / "llama")


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / "adapter_model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("pack", [False, True])
def test_finetune_on_a_parquet_directory_gives_the_adapter_of_the_same_rows_in_one_file(tmp_path, tiny_llama, pack):
    rows = _rows(24)
    shards = _parquet_dir(tmp_path / "shards", rows, shards=3)
    one_file = _jsonl(tmp_path / "train.jsonl", rows)
    valid = _jsonl(tmp_path / "valid.jsonl", rows[:4])
    train = TrainConfig(epochs=1, lr=1e-2, seed=5)
    reports = {}
    for name, source in (("dir", shards), ("file", one_file)):
        job = FinetuneJob(
            model=tiny_llama,
            data=source,
            valid=valid,
            task="causal-lm",
            out=tmp_path / name,
            batch_size=4,
            max_length=64,
            train=train,
            pack=pack,
        )
        reports[name] = run(prepare(job))
    assert (tmp_path / "dir" / "run" / "data-cache").is_dir() and not (
        tmp_path / "file" / "run" / "data-cache"
    ).exists()
    a, b = _adapter(tmp_path / "dir"), _adapter(tmp_path / "file")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert reports["dir"]["after"] == reports["file"]["after"] and reports["dir"]["train_rows"] == 24
    assert reports["dir"]["packing"] == reports["file"]["packing"]


def test_a_refused_directory_leaves_out_as_it_was(tmp_path, tiny_llama):
    d = tmp_path / "d"
    d.mkdir()
    _jsonl(d / "a.jsonl", _rows(6))
    (d / "b.jsonl").write_text("{oops\n", encoding="utf-8")
    job = FinetuneJob(model=tiny_llama, data=d, task="causal-lm", out=tmp_path / "out")
    with pytest.raises(data.BadRowsError, match=r"b.jsonl:1: not valid JSON"):
        prepare(job)
    assert not (tmp_path / "out").exists()  # the fixed run may start there
