"""Adapter directories: round trips and strict, side-effect-free refusal of every kind of bad file."""

import copy
import json
import os
import struct

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit import loading as io
from lorakit.files import safetensors as safetensors_io


class Net(nn.Module):
    def __init__(self, hidden=8):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(20, hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, 3)

    def forward(self, ids):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(self.embed(ids))))))


IDS = torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(1))


def trained(cfg=lk.LoraConfig(rank=2, alpha=4), targets=("embed", "fc1", "fc2"), **kw):
    model = lk.apply_lora(Net(), cfg, targets=list(targets), **kw)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def out(model):
    with torch.no_grad():
        return model(IDS)


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m).__name__ for m in model.modules()]


def assert_unchanged(model, snap):
    state, types = snap
    assert [type(m).__name__ for m in model.modules()] == types
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], v) for k, v in state.items())


@pytest.mark.parametrize("bias", ["none", "all"])
def test_round_trip_into_bare_and_wrapped_models(bias, tmp_path):
    model = trained(lk.LoraConfig(rank=2, alpha=4, bias=bias), modules_to_save=["head"])
    lk.save_adapters(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    bare = lk.load_adapters(Net(), tmp_path)
    assert torch.equal(out(bare), out(model))
    assert sorted(lk.lora_layers(bare)) == ["embed", "fc1", "fc2"]
    assert bare.head.weight.requires_grad  # modules_to_save train again after loading
    wrapped = lk.apply_lora(Net(), lk.LoraConfig(rank=2, alpha=1, bias=bias), ["embed", "fc1", "fc2"],
                            modules_to_save=["head"])
    lk.load_adapters(wrapped, tmp_path)
    assert torch.equal(out(wrapped), out(model))
    assert lk.lora_layers(wrapped)["fc1"].config.alpha == 4.0


def test_saved_files_use_peft_names(tmp_path):
    lk.save_adapters(trained(lk.LoraConfig(rank=2, bias="all"), modules_to_save=["head"]), tmp_path)
    tensors, meta = safetensors_io.read(tmp_path / "adapter_model.safetensors")
    assert meta == {"format": "pt"}
    assert sorted(tensors) == sorted([
        "base_model.model.embed.lora_embedding_A", "base_model.model.embed.lora_embedding_B",
        "base_model.model.fc1.lora_A.weight", "base_model.model.fc1.lora_B.weight", "base_model.model.fc1.base_layer.bias",
        "base_model.model.fc2.lora_A.weight", "base_model.model.fc2.lora_B.weight", "base_model.model.fc2.base_layer.bias",
        "base_model.model.head.weight", "base_model.model.head.bias"])
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 2 and cfg["lora_alpha"] == 1.0
    assert cfg["target_modules"] == ["embed", "fc1", "fc2"] and cfg["modules_to_save"] == ["head"]
    assert cfg["bias"] == "lora_only"


def test_safetensors_matches_the_reference_library(tmp_path):
    from safetensors.torch import load_file, save_file

    t = {"a": torch.randn(3, 4), "b": torch.randn(2).to(torch.bfloat16), "c": torch.arange(5)}
    safetensors_io.write(tmp_path / "ours.safetensors", t, {"k": "v"})
    theirs = load_file(tmp_path / "ours.safetensors")
    assert all(torch.equal(theirs[k], v) for k, v in t.items())
    save_file(t, tmp_path / "ref.safetensors")
    ours, _ = safetensors_io.read(tmp_path / "ref.safetensors")
    assert all(torch.equal(ours[k], v) for k, v in t.items())


def _rewrite(path, edit):
    tensors, meta = safetensors_io.read(path)
    edit(tensors)
    safetensors_io.write(path, tensors, meta)


BAD_FILES = {
    "missing key": (lambda t: t.pop("base_model.model.fc1.lora_B.weight"), "missing keys \\(1\\): base_model.model.fc1.lora_B"),
    "unexpected key": (lambda t: t.update({"base_model.model.fc9.lora_A.weight": torch.zeros(2, 8)}),
                       "unexpected keys \\(1\\): base_model.model.fc9"),
    "wrong shape": (lambda t: t.update({"base_model.model.fc1.lora_A.weight": torch.zeros(2, 9)}),
                    "shape \\(2, 9\\); the model expects \\(2, 8\\)"),
    "wrong dtype": (lambda t: t.update({"base_model.model.fc1.lora_A.weight": torch.zeros(2, 8, dtype=torch.int32)}),
                    "dtype torch.int32"),
    "nan": (lambda t: t["base_model.model.fc2.lora_B.weight"].fill_(float("nan")), "NaN or Inf"),
    "inf": (lambda t: t["base_model.model.fc2.lora_A.weight"].fill_(float("inf")), "NaN or Inf"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
@pytest.mark.parametrize("into", ["bare", "wrapped"])
def test_bad_tensors_refused_and_model_unchanged(case, into, tmp_path):
    lk.save_adapters(trained(), tmp_path)
    edit, needle = BAD_FILES[case]
    _rewrite(tmp_path / "adapter_model.safetensors", edit)
    model = Net() if into == "bare" else lk.apply_lora(Net(), lk.LoraConfig(rank=2, alpha=4), ["embed", "fc1", "fc2"])
    snap = snapshot(model)
    with pytest.raises(lk.LoraFileError, match=needle):
        lk.load_adapters(model, tmp_path)
    assert_unchanged(model, snap)


def test_missing_and_unexpected_reported_separately(tmp_path):
    lk.save_adapters(trained(), tmp_path)
    _rewrite(tmp_path / "adapter_model.safetensors",
             lambda t: (t.pop("base_model.model.fc1.lora_A.weight"), t.update({"base_model.model.zz.w": torch.zeros(1)})))
    with pytest.raises(lk.LoraFileError) as e:
        lk.load_adapters(Net(), tmp_path)
    assert "missing keys (1): base_model.model.fc1.lora_A.weight" in str(e.value)
    assert "unexpected keys (1): base_model.model.zz.w" in str(e.value)


def test_nonfinite_loads_when_asked(tmp_path):
    lk.save_adapters(trained(), tmp_path)
    _rewrite(tmp_path / "adapter_model.safetensors", BAD_FILES["nan"][0])
    model = lk.load_adapters(Net(), tmp_path, allow_nonfinite=True)
    assert torch.isnan(lk.lora_layers(model)["fc2"].lora_B).all()


def test_adapter_for_a_different_base_refused(tmp_path):
    model = lk.apply_lora(Net(hidden=16), lk.LoraConfig(rank=2), ["fc1"])
    lk.save_adapters(model, tmp_path)
    target = Net(hidden=8)
    snap = snapshot(target)
    with pytest.raises(lk.LoraFileError, match="different base"):
        lk.load_adapters(target, tmp_path)
    assert_unchanged(target, snap)


def test_rank_mismatch_into_wrapped_model(tmp_path):
    lk.save_adapters(trained(lk.LoraConfig(rank=2)), tmp_path)
    model = lk.apply_lora(Net(), lk.LoraConfig(rank=3), ["embed", "fc1", "fc2"])
    snap = snapshot(model)
    with pytest.raises(lk.LoraFileError, match="rank 2 in the adapter but 3 in the model"):
        lk.load_adapters(model, tmp_path)
    assert_unchanged(model, snap)


def _edit_config(tmp_path, edit):
    path = tmp_path / "adapter_config.json"
    cfg = json.loads(path.read_text())
    edit(cfg)
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize("edit,needle", [
    (lambda c: c.update(r="4"), "'r' is '4'; expected an int"),
    (lambda c: c.update(r=0), "rank=0"),
    (lambda c: c.update(lora_alpha=True), "'lora_alpha' is True"),
    (lambda c: c.update(target_modules=5), "'target_modules' is 5"),
    (lambda c: c.update(target_modules=["nothing_here"]), "'nothing_here' matches no module"),
    (lambda c: c.update(peft_type="IA3"), "peft_type 'IA3'"),
    (lambda c: c.pop("r"), "missing key 'r'"),
    (lambda c: c.update(bias="sometimes"), "'bias' is 'sometimes'"),
])
def test_bad_config_refused(edit, needle, tmp_path):
    lk.save_adapters(trained(), tmp_path)
    _edit_config(tmp_path, edit)
    model = Net()
    snap = snapshot(model)
    with pytest.raises(lk.LoraFileError, match=needle):
        lk.load_adapters(model, tmp_path)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("content,needle", [(b"{not json", "not valid JSON"), (b"[1, 2]", "JSON object"),
                                            (b"\xff\xfe", "not valid JSON")])
def test_config_not_json(content, needle, tmp_path):
    lk.save_adapters(trained(), tmp_path)
    (tmp_path / "adapter_config.json").write_bytes(content)
    with pytest.raises(lk.LoraFileError, match=needle):
        lk.load_adapters(Net(), tmp_path)


def test_pickle_never_loaded(tmp_path):
    lk.save_adapters(trained(), tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    marker = tmp_path / "pwned"
    # a pickle that would create a file if anything unpickled it
    import pickle

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "adapter_model.bin").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(lk.LoraFileError, match="adapter_model.bin is pickle"):
        lk.load_adapters(Net(), tmp_path)
    assert not marker.exists()


def test_missing_directory_and_files(tmp_path):
    with pytest.raises(lk.LoraFileError, match="not an adapter directory"):
        lk.load_adapters(Net(), tmp_path / "nope")
    with pytest.raises(lk.LoraFileError, match="adapter_config.json: no such file"):
        lk.load_adapters(Net(), tmp_path)


def _header_file(path, header, data=b""):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
DEEP = b"[" * 100_000 + b"]" * 100_000

# every malformed file docs/reliability.md lists; the needles are the safetensors library's reasons (and our hints)
CORRUPT = {
    "empty": (b"", "header too small"),
    "shorter than the length field": (b"\x01\x02\x03", "header too small"),
    "header length past the end": (struct.pack("<Q", 100) + b"{}", "header runs past the end of the file: truncated"),
    "huge header length": (struct.pack("<Q", 2**63) + b"{}", "header too large"),
    "header not JSON": (({"raw": b"{not json"}), "invalid JSON in header"),
    "header not UTF-8": (({"raw": b"\xff\xfe{}"}), "invalid UTF-8 in header"),
    "header not an object": (({"header": [1, 2]}), "invalid JSON in header"),
    "entry not an object": (({"header": {"a": [1, 2]}}), "invalid JSON in header"),
    "deeply nested JSON": (({"raw": DEEP}), "invalid JSON in header"),
    "data truncated": (({"header": {"a": F32x2}, "data": b"\0" * 4}), "truncated, or extra bytes"),
    "extra bytes after the data": (({"header": {"a": F32x2}, "data": b"\0" * 12}), "truncated, or extra bytes"),
    "wrong byte count for the shape": (({"header": {"a": {**F32x2, "data_offsets": [0, 4]}}, "data": b"\0" * 8}),
                                       "invalid shape, data type, or offset"),
    "overlapping offsets": (({"header": {"a": F32x2, "b": {**F32x2, "data_offsets": [4, 12]}}, "data": b"\0" * 12}),
                            "invalid offset for tensor `b`"),
    "gap before the data": (({"header": {"a": {**F32x2, "data_offsets": [4, 12]}}, "data": b"\0" * 12}),
                            "invalid offset for tensor `a`"),
    "unknown dtype": (({"header": {"a": {**F32x2, "dtype": "Q4"}}, "data": b"\0" * 8}), "unknown variant `Q4`"),
    "negative shape": (({"header": {"a": {**F32x2, "shape": [-2]}}, "data": b"\0" * 8}), "integer `-2`"),
    "bad data_offsets": (({"header": {"a": {**F32x2, "data_offsets": [8]}}, "data": b"\0" * 8}), "invalid length 1"),
    "bad metadata": (({"header": {"__metadata__": {"k": 1}}}), "invalid JSON in header"),
    "huge shape claim": (({"header": {"a": {**F32x2, "shape": [2**40, 2**40]}}, "data": b"\0" * 8}), "overflow"),
}


@pytest.mark.parametrize("case", list(CORRUPT))
def test_corrupt_safetensors_refused_naming_the_file(case, tmp_path):
    content, needle = CORRUPT[case]
    path = tmp_path / "adapter_model.safetensors"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        _header_file(path, content.get("raw", content.get("header")), content.get("data", b""))
    with pytest.raises(lk.LoraFileError) as e:
        safetensors_io.read(path)
    assert str(e.value).startswith(f"{path}: not a valid safetensors file: ")
    assert needle in str(e.value)
    lk.save_adapters(trained(), tmp_path / "ok")
    (tmp_path / "ok" / "adapter_model.safetensors").write_bytes(path.read_bytes())
    model = Net()
    snap = snapshot(model)
    with pytest.raises(lk.LoraFileError, match="adapter_model.safetensors: not a valid safetensors file"):
        lk.load_adapters(model, tmp_path / "ok")
    assert_unchanged(model, snap)


def test_write_stores_views_shared_and_odd_tensors(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    t = {"w": base, "tied": base, "t": base.t(), "row": base[1], "bf16": base.to(torch.bfloat16),
         "ints": torch.arange(3), "flags": torch.tensor([True, False]), "empty": torch.zeros(0, 4),
         "scalar": torch.tensor(2.5), "param": nn.Parameter(torch.ones(2))}
    safetensors_io.write(tmp_path / "x.safetensors", t, {"k": "v"})
    back, meta = safetensors_io.read(tmp_path / "x.safetensors")
    assert meta == {"k": "v"} and back.keys() == t.keys()
    assert all(back[k].dtype == v.dtype and torch.equal(back[k], v.detach()) for k, v in t.items())


READ_PEAK = r"""
import re, sys
import torch
from lorakit.files import safetensors as safetensors_io
def kib(field):
    return int(re.search(field + r":\s+(\d+) kB", open("/proc/self/status").read()).group(1))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # start the peak (VmHWM) afresh: imports above may have peaked higher
before = kib("VmRSS")
tensors, _ = safetensors_io.read(sys.argv[1])
assert sum(float(t.sum()) for t in tensors.values()) > 0  # every byte really read
print((kib("VmHWM") - before) * 1024)
"""


def test_reading_needs_one_copy_of_the_file_not_two(tmp_path):
    """The peak memory of reading a 64 MiB file, in a fresh process, is about the file's size."""
    import subprocess
    import sys

    path = tmp_path / "big.safetensors"
    safetensors_io.write(path, {f"t{i}": torch.full((1024, 1024), float(i + 1)) for i in range(16)})
    size = path.stat().st_size
    run = subprocess.run([sys.executable, "-c", READ_PEAK, str(path)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    grown = int(run.stdout)
    assert 0.9 * size < grown < 1.3 * size, f"reading {size >> 20} MiB raised the peak RSS by {grown >> 20} MiB"


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    model = trained()
    lk.save_adapters(model, tmp_path)
    before = (tmp_path / "adapter_model.safetensors").read_bytes()
    with torch.no_grad():
        lk.lora_layers(model)["fc1"].lora_A.add_(1.0)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        lk.save_adapters(model, tmp_path)
    monkeypatch.undo()
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_save_without_lora_is_an_error(tmp_path):
    with pytest.raises(lk.LoraFileError, match="no LoRA layers"):
        lk.save_adapters(Net(), tmp_path)


def test_ambiguous_names_saved_exactly(tmp_path):
    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(4, 4)
            self.inner = nn.Sequential()
            self.inner.add_module("fc1", nn.Linear(4, 4))

        def forward(self, x):
            return self.inner(self.fc1(x))

    model = lk.apply_lora(Outer(), lk.LoraConfig(rank=2), ["re:fc1"])  # only the top-level fc1
    lk.save_adapters(model, tmp_path)
    fresh = lk.load_adapters(Outer(), tmp_path)
    assert sorted(lk.lora_layers(fresh)) == ["fc1"]
    assert io.read_adapter_config(tmp_path).targets == ["re:fc1"]


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def test_written_files_get_the_permissions_open_gives(umask, tmp_path):
    """Adapters, layer files, task files, checkpoints, metrics, plots and JSON: mode 0o666 & ~umask, not 0600."""
    from torch.utils.data import DataLoader, TensorDataset

    from lorakit.hf.models import write_task_file
    from lorakit.train import TrainConfig, Trainer

    model = trained()
    lk.save_adapters(model, tmp_path / "adapter")
    write_task_file(tmp_path / "adapter", "causal-lm")
    lk.lora_layers(model)["fc1"].save_adapter(tmp_path / "layer")
    mlp = lk.apply_lora(nn.Sequential(nn.Linear(4, 4)), lk.LoraConfig(rank=2), ["0"])
    data = DataLoader(TensorDataset(torch.randn(8, 4), torch.randn(8, 4)), batch_size=4)
    Trainer(mlp, TrainConfig(epochs=1, device="cpu"), loss_fn=nn.functional.mse_loss,
            artifact_dir=tmp_path / "run").fit(data, data)
    modes = {p.relative_to(tmp_path).as_posix(): oct(p.stat().st_mode & 0o777)
             for p in tmp_path.rglob("*") if p.is_file()}
    assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json", "adapter/lorakit_task.json",
            "layer.safetensors", "run/checkpoint.safetensors", "run/config.json", "run/metrics.jsonl",
            "run/loss.png", "run/adapter/adapter_model.safetensors",
            "run/best_adapter/adapter_config.json"} <= modes.keys()
    assert modes == dict.fromkeys(modes, oct(0o666 & ~umask))


def _marked(alpha: float) -> nn.Module:
    """A LoRA model whose every adapter weight equals its alpha: a load pairs config and weights right iff they agree."""
    model = lk.apply_lora(nn.Sequential(nn.Linear(8, 8)), lk.LoraConfig(rank=2, alpha=alpha), ["0"])
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.fill_(alpha)
    return model


def _load_whole(directory) -> float:
    """Load the adapter in `directory`; its weights must come from the same save as its config."""
    layer = lk.lora_layers(lk.load_adapters(nn.Sequential(nn.Linear(8, 8)), directory))["0"]
    values = torch.cat([layer.lora_A.flatten(), layer.lora_B.flatten()]).unique().tolist()
    assert values == [layer.config.alpha], f"weights {values} loaded with the config of alpha {layer.config.alpha}"
    return layer.config.alpha


SAVER = r"""
import sys, torch, lorakit as lk
from torch import nn
directory, alpha, rounds = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
model = lk.apply_lora(nn.Sequential(nn.Linear(8, 8)), lk.LoraConfig(rank=2, alpha=alpha), ["0"])
with torch.no_grad():
    for p in model.parameters():
        if p.requires_grad:
            p.fill_(alpha)
print("ready", flush=True)
sys.stdin.readline()  # start when the parent says so, together with the other saver
for _ in range(rounds):
    lk.save_adapters(model, directory)
"""
ROUNDS = 100


@pytest.mark.parametrize("how", ["threads", "processes"])
def test_concurrent_saves_never_pair_one_adapters_weights_with_anothers_config(how, tmp_path):
    """Two savers write different adapters into one directory while a reader loads it, over and over."""
    import subprocess
    import sys
    import threading

    lk.save_adapters(_marked(1.0), tmp_path)
    seen = set()
    if how == "threads":
        start, errors = threading.Barrier(3), []

        def save(alpha):
            model = _marked(alpha)
            start.wait()
            try:
                for _ in range(ROUNDS):
                    lk.save_adapters(model, tmp_path)
            except BaseException as e:  # noqa: BLE001 - reported by the main thread
                errors.append(e)

        savers = [threading.Thread(target=save, args=(a,)) for a in (2.0, 3.0)]
        for t in savers:
            t.start()
        start.wait()
        while any(t.is_alive() for t in savers):
            seen.add(_load_whole(tmp_path))
        for t in savers:
            t.join()
        assert not errors, errors
    else:
        savers = [subprocess.Popen([sys.executable, "-c", SAVER, str(tmp_path), str(a), str(ROUNDS)],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for a in (2.0, 3.0)]
        try:
            assert [p.stdout.readline() for p in savers] == ["ready\n"] * 2
            for p in savers:
                p.stdin.write("go\n")
                p.stdin.flush()
            while any(p.poll() is None for p in savers):
                seen.add(_load_whole(tmp_path))
        finally:
            for p in savers:
                p.kill() if p.poll() is None else None
                p.wait()
        assert [p.returncode for p in savers] == [0, 0]
    seen.add(_load_whole(tmp_path))
    assert seen <= {1.0, 2.0, 3.0} and seen & {2.0, 3.0}


KILLED = r"""
import os, sys, torch, lorakit as lk
from torch import nn
directory, point = sys.argv[1], sys.argv[2]
model = lk.apply_lora(nn.Sequential(nn.Linear(256, 256)), lk.LoraConfig(rank=64), ["0"])


def save(version):
    with torch.no_grad():
        lk.lora_layers(model)["0"].lora_B.fill_(float(version))
    lk.save_adapters(model, directory)


def stop_here():
    print("stopped", flush=True)
    sys.stdin.readline()  # the parent SIGKILLs this process now


real_fsync, real_replace = os.fsync, os.replace


def fsync(fd):  # the weights are written, not yet renamed into place
    if point.endswith("before-rename") and "adapter_model.safetensors" in os.readlink(f"/proc/self/fd/{fd}"):
        stop_here()
    real_fsync(fd)


def replace(src, dst):  # the weights are in place, the config not yet
    real_replace(src, dst)
    if point == "after-rename" and str(dst).endswith("adapter_model.safetensors"):
        stop_here()


if not point.startswith("first-save"):
    save(1)
os.fsync, os.replace = fsync, replace
save(2)
print("finished without stopping", flush=True)
"""


@pytest.mark.parametrize("point,version", [("first-save-before-rename", None), ("before-rename", 1.0),
                                           ("after-rename", 2.0)])
def test_writer_killed_mid_save_leaves_the_old_adapter_or_the_new_one(point, version, tmp_path):
    """SIGKILL a saving process at a known point of its save: on disk is the old adapter or the new one, whole.

    The child stops itself (in a patched os.fsync / os.replace) and says so on stdout; then it is killed.
    A writer that wrote the target in place would leave the new bytes where the old adapter is expected.
    """
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(tmp_path), point], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line == "stopped\n", (line, proc.stderr.read()[-3000:] if proc.poll() is not None else "")
    finally:
        proc.kill()
        proc.wait()
    names = sorted(p.name for p in tmp_path.iterdir())
    temps = [n for n in names if n.startswith(".adapter_model.safetensors.") and n.endswith(".tmp")]
    assert len(temps) == (0 if point == "after-rename" else 1), names
    if version is None:  # killed during the very first save: no adapter at all, not a broken one
        assert names == temps
        return
    assert set(names) - set(temps) == {"adapter_config.json", "adapter_model.safetensors"}
    model = lk.load_adapters(nn.Sequential(nn.Linear(256, 256)), tmp_path)
    assert torch.all(lk.lora_layers(model)["0"].lora_B == version)
