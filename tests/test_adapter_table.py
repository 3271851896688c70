"""Fixed adapter slots (lorakit.adapter_table): copied in at load, zeroed at unload, a batch only picks slots."""

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import lorakit as lk


def _mlp(adapters: int, rank: int = 2) -> nn.Module:
    """Two LoRA linears, adapters a0..a{n-1} of one rank, each with its own non-zero B."""
    torch.manual_seed(0)
    model = lk.apply_lora(
        nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)),
        lk.LoraConfig(rank=rank, alpha=2),
        ["0", "2"],
        adapter_name="a0",
    )
    for i in range(1, adapters):
        lk.combine_adapters(model, {"a0": 1.0}, f"a{i}")
    with torch.no_grad():
        for layer in lk.lora_layers(model).values():
            for n in layer.adapters.names():
                layer.adapters.tensors(n)["lora_B"].normal_()
    return model


def _rows_alone(model, x, rows):
    out = []
    for i, n in enumerate(rows):
        if n is None:
            with lk.disable_adapters(model):
                out.append(model(x[i : i + 1]))
        else:
            with lk.use_adapter(model, n):
                out.append(model(x[i : i + 1]))
    return torch.cat(out)


class _Ops(TorchFunctionMode):
    """Every torch function and tensor method called inside the block, by name."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.ops.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def _entering(model, table, rows) -> list[str]:
    """The torch calls that entering and leaving a batch of `rows` makes."""
    with _Ops() as seen, table.batch(rows):
        pass
    return seen.ops


def test_entering_a_batch_copies_no_adapter_and_keeps_the_stacks():
    """Regression: mixed_batch restacked (or re-validated) every adapter on every layer each time it was entered
    (15 ms with 16 adapters), so the engine had to hold it open across decode steps."""
    x = torch.randn(16, 8)
    ops = {}
    for n in (2, 16):
        model = _mlp(n)
        rows = [f"a{i % n}" for i in range(15)] + [None]
        with torch.no_grad(), lk.AdapterTable(model, capacity=n) as table:
            for i in range(n):
                table.load(f"a{i}")
            stacks = {m: (layer.slot_stacks.A, layer.slot_stacks.B) for m, layer in lk.lora_layers(model).items()}
            ptrs = {m: (A.data_ptr(), B.data_ptr()) for m, (A, B) in stacks.items()}
            ops[n] = _entering(model, table, list(reversed(rows)))
            with table.batch(rows):
                got = model(x)
            with table.batch(list(reversed(rows))):
                model(x)
            for m, layer in lk.lora_layers(model).items():  # the same tensors, never rebuilt
                assert layer.slot_stacks.A is stacks[m][0] and layer.slot_stacks.B is stacks[m][1]
                assert (layer.slot_stacks.A.data_ptr(), layer.slot_stacks.B.data_ptr()) == ptrs[m]
                assert layer.mixed is None
            torch.testing.assert_close(got, _rows_alone(model, x, rows), rtol=1e-5, atol=1e-6)
        assert all(layer.slot_stacks is None for layer in lk.lora_layers(model).values())  # closed: as before
    assert ops[16] == ops[2]  # the same work with 16 adapters as with 2: only the rows' index is made
    assert not {"copy_", "zeros", "zero_", "cat", "stack", "__setitem__", "__getitem__"} & set(ops[16]), ops[16]


def test_unload_zeroes_the_slot_and_a_reused_slot_runs_the_new_adapter():
    model = _mlp(3)
    x = torch.randn(3, 8)
    with torch.no_grad(), lk.AdapterTable(model, capacity=2) as table:
        assert (table.load("a0"), table.load("a1")) == (1, 2)
        table.unload("a0")
        for layer in lk.lora_layers(model).values():
            assert not layer.slot_stacks.A[1].any() and not layer.slot_stacks.B[1].any()
        with pytest.raises(lk.LoraAdapterNotFound, match=r"adapters \['a0'\] are not in the table"):
            table.batch(["a0"]).__enter__()
        assert table.load("a2") == 1  # the freed slot
        rows = ["a2", "a1", None]
        with table.batch(rows):
            got = model(x)
    with torch.no_grad(), lk.mixed_batch(model, rows):  # its own table: slots a2 -> 1, a1 -> 2, as above
        assert torch.equal(got, model(x))
    with torch.no_grad():
        torch.testing.assert_close(got, _rows_alone(model, x, rows), rtol=1e-5, atol=1e-6)


def test_the_table_grows_and_syncs_with_the_model():
    """Loading past the capacity grows the stacks; sync() reloads changed factors and drops deleted adapters."""
    model = _mlp(3)
    x = torch.randn(4, 8)
    rows = ["a0", "a1", "a2", None]
    with torch.no_grad(), lk.AdapterTable(model, capacity=1) as table:
        table.sync()
        assert table.slots == {"a0": 1, "a1": 2, "a2": 3} and model[0].slot_stacks.capacity >= 3
        model[0].adapters.tensors("a1")["lora_B"].mul_(3)
        table.sync()
        with table.batch(rows):
            got = model(x)
        torch.testing.assert_close(got, _rows_alone(model, x, rows), rtol=1e-5, atol=1e-6)
        with table.batch(rows), pytest.raises(lk.LoraStateError, match="inside a mixed_batch"):
            table.unload("a2")
        lk.delete_adapter(model, "a2")
        table.sync()
        assert table.slots == {"a0": 1, "a1": 2}
        with pytest.raises(lk.LoraStateError, match="another AdapterTable"):
            lk.AdapterTable(model)
