"""Sequence packing for causal-LM fine-tuning: several examples per row, so a batch carries little padding.

    rows = pack(prepared.train, max_length=256)          # best-fit decreasing: deterministic
    loader = DataLoader(rows, batch_size=8, collate_fn=functools.partial(collate, pad_id=tok.pad_token_id))

Each packed row is the concatenation of whole examples (no example is split; `data.encode` has already
truncated every example to `max_length`), with `position_ids` that restart at 0 where an example starts.
The batch carries no `attention_mask` and `use_cache=False`: transformers then reads the restarts of
`position_ids` as example boundaries (`masking_utils.find_packed_sequence_indices`) and builds a causal mask
that never crosses one. A KV cache switches that detection off (with `use_cache` left to the config's
default True, Llama and GPT-2 silently attend across examples), hence `use_cache=False` in every batch. Not
every architecture honours it (OPT derives its positions from the attention mask and ignores
`position_ids`), so `check_model` runs a probe on the model itself and refuses the ones that leak.

Labels: the first token of each example is -100, so the last token of one example is never trained to
predict the first token of the next; padding is -100 too. The loss of a packed batch is then the mean over
exactly the labelled tokens an unpacked batch of the same examples would average over (the first label of
an unpacked example is never a target either: causal-LM labels are shifted by one).

`lorakit finetune --pack` packs the training rows only. Validation stays unpacked, so its loss (and
perplexity) is exactly an unpacked run's. The training loss changes meaning a little: each batch is still
the mean over its labelled tokens, but a packed batch holds more examples, so an epoch has fewer, bigger
steps and its loss curve is not step-for-step comparable to an unpacked run's. The trainer's tokens/s counts
a packed batch's positions, padding included (a packed batch has no attention_mask to count from).
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..ui.progress import Progress, quiet
from .batches import padded_length
from .prepared import IGNORE_INDEX, Encoded, Rows

if TYPE_CHECKING:
    from transformers import PreTrainedModel

PROBE_LENGTHS = (5, 4)  # the probe packs two examples of these lengths and compares against each run alone


def plan(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Rows of example indices, each row's lengths summing to at most `max_length` (best-fit decreasing).

    Examples go longest first (ties by index) into the fullest row that still has room, or a new row.

    Examples:
        >>> plan([3, 5, 2, 4], max_length=7)
        [[1, 2], [3, 0]]
    """
    if max_length < 1:
        raise ValueError(f"max_length={max_length} is invalid: expected an int >= 1")
    too_long = [(i, n) for i, n in enumerate(lengths) if n > max_length or n < 1]
    if too_long:
        i, n = too_long[0]
        raise ValueError(f"example {i} has {n} tokens: expected 1 to max_length={max_length} (truncate first)")
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (space left, row index), sorted: the fullest row that fits comes first
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        n = lengths[i]
        k = bisect.bisect_left(room, (n, -1))
        if k == len(room):
            rows.append([i])
            left, row = max_length - n, len(rows) - 1
        else:
            left, row = room.pop(k)
            rows[row].append(i)
            left -= n
        if left > 0:
            bisect.insort(room, (left, row))
    return rows


def pack(examples: Rows, max_length: int, progress: Progress | None = None) -> Rows:
    """Packed rows `{"input_ids", "labels", "position_ids"}` holding every example exactly once.

    A list of examples gives a list of rows; examples read on access (a data directory's Arrow rows,
    `ondisk`) give `PackedRows`, which builds each row when it is read: only the plan stays in memory.

    Examples:
        >>> rows = pack([{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}, {"input_ids": [4, 5], "labels": [-100, 5]}], 8)
        >>> rows[0]["input_ids"], rows[0]["labels"], rows[0]["position_ids"]
        ([1, 2, 3, 4, 5], [-100, 2, 3, -100, 5], [0, 1, 2, 0, 1])
    """
    _check_token_labels(examples)
    groups = plan(lengths(examples), max_length)
    if not isinstance(examples, list):
        return PackedRows(examples, groups)
    rows: list[Encoded] = []
    with (progress or quiet()).task("packing", total=len(examples), unit="examples") as task:
        for group in groups:
            rows.append(_packed([examples[i] for i in group]))
            task.advance(len(group))
    return rows


def _packed(examples: Sequence[Encoded]) -> Encoded:
    """One packed row from the examples planned into it."""
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for ex in examples:
        ids += ex["input_ids"]
        labels += [IGNORE_INDEX] + list(ex["labels"][1:])  # nothing predicts across a boundary
        positions += range(len(ex["input_ids"]))
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


class PackedRows(Sequence[Encoded]):
    """Packed rows built on access from examples read on access: the plan (`groups`) is all it holds."""

    def __init__(self, examples: Rows, groups: list[list[int]]) -> None:
        self.examples, self.groups = examples, groups

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: Any) -> Any:  # Sequence's overloads; rows are read by int index
        return _packed([self.examples[j] for j in self.groups[i]])


def lengths(examples: Rows) -> list[int]:
    """Each example's token count; for an Arrow dataset from its column, without reading the tokens into Python."""
    if hasattr(examples, "with_format"):  # datasets.Dataset (ondisk)
        import pyarrow.compute as pc

        return pc.list_value_length(examples.with_format("arrow")["input_ids"]).to_pylist()
    return [len(examples[i]["input_ids"]) for i in range(len(examples))]


def _check_token_labels(examples: Rows) -> None:
    """ValueError if the examples carry class labels (seq-cls) rather than labels per token."""
    schema = getattr(getattr(examples, "data", None), "schema", None)
    if schema is not None:  # an Arrow dataset (ondisk): its schema says
        import pyarrow as pa

        if not pa.types.is_list(schema.field("labels").type):
            raise ValueError("the examples have class labels: packing is for causal-lm rows (labels per token)")
        return
    for i in range(len(examples)):
        if not isinstance(examples[i]["labels"], list):
            raise ValueError(f"example {i} has a class label: packing is for causal-lm rows (labels per token)")


def collate(batch: Sequence[Encoded], pad_id: int, pad_multiple: int = 1) -> dict[str, Any]:
    """Right-pad packed rows: input_ids, labels (-100 padding), position_ids (B, T); no attention_mask.

    The padding is a segment of its own (its positions restart at 0), so it attends to nothing real; T is the
    longest row rounded up to a multiple of `pad_multiple` (batches.collate).
    """
    T = padded_length(max(len(b["input_ids"]) for b in batch), pad_multiple)
    ids = torch.full((len(batch), T), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(batch), T), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    positions = torch.zeros((len(batch), T), dtype=torch.long)  # (B, T)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        ids[i, :n] = torch.tensor(b["input_ids"])
        labels[i, :n] = torch.tensor(b["labels"])
        positions[i, :n] = torch.tensor(b["position_ids"])
        positions[i, n:] = torch.arange(T - n)
    # no attention_mask and no cache: transformers finds the examples from the position_ids (module docstring)
    return {"input_ids": ids, "labels": labels, "position_ids": positions, "use_cache": False}


def padding_fraction(lengths: Sequence[int], batch_size: int, seed: int = 0) -> float:
    """Padding tokens / all tokens when rows of these lengths, in a seeded random order, are batched
    `batch_size` at a time and each batch is padded to its longest row (as `collate` does).

    Examples:
        >>> padding_fraction([4, 2], batch_size=2)
        0.25
    """
    order = list(lengths)
    random.Random(seed).shuffle(order)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    padded = sum(max(b) * len(b) for b in batches)
    return (padded - sum(order)) / padded if padded else 0.0


def summary(examples: Rows, rows: Rows, batch_size: int, seed: int) -> dict[str, Any]:
    """What packing saved, for the run report: rows and padding fractions before and after."""
    before = lengths(examples)
    if isinstance(rows, PackedRows):
        after = [sum(before[i] for i in group) for group in rows.groups]
    else:
        after = [len(rows[i]["input_ids"]) for i in range(len(rows))]
    return {
        "rows_before": len(before),
        "rows_after": len(after),
        "tokens": sum(before),
        "padding_fraction_unpacked": padding_fraction(before, batch_size, seed),
        "padding_fraction_packed": padding_fraction(after, batch_size, seed),
    }


def padding_effect(examples: Rows, max_length: int, batch_size: int, seed: int = 0) -> tuple[float, float] | None:
    """(unpacked, packed) padding fractions of `examples`, from their token counts alone (no row is built):
    what packing does to the padding, known before training. None if the examples cannot be packed.

    Examples:
        >>> padding_effect([{"input_ids": [1] * 4}] * 3, max_length=8, batch_size=2)  # two rows of 8 and 4 tokens
        (0.0, 0.25)
    """
    before = lengths(examples)
    try:
        groups = plan(before, max_length)
    except ValueError:  # an empty or over-long example: `pack` refuses these with its own message
        return None
    after = [sum(before[i] for i in group) for group in groups]
    return padding_fraction(before, batch_size, seed), padding_fraction(after, batch_size, seed)


def check_model(model: PreTrainedModel) -> None:
    """Refuse (ValueError naming the model type) a model whose attention crosses packed examples' boundaries.

    A probe: two short examples packed in one row must give the logits each gives alone.
    """
    embeddings: Any = model.get_input_embeddings()
    vocab = int(getattr(embeddings, "num_embeddings", 0) or model.config.vocab_size)
    a, b = (torch.arange(n).add(3 + 7 * k) % vocab for k, n in enumerate(PROBE_LENGTHS))
    ids = torch.cat([a, b]).unsqueeze(0)  # (1, Ta + Tb)
    positions = torch.cat([torch.arange(len(a)), torch.arange(len(b))]).unsqueeze(0)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            alone = [model(input_ids=x.unsqueeze(0).to(device), use_cache=False).logits.float() for x in (a, b)]
            packed = model(input_ids=ids.to(device), position_ids=positions.to(device), use_cache=False).logits
    finally:
        model.train(was_training)
    want = torch.cat(alone, dim=1)
    worst = (packed.float() - want).abs().max().item()
    scale = max(want.abs().max().item(), 1.0)
    tolerance = 1e-3 if packed.dtype == torch.float32 else 5e-2  # half precision rounds differently per shape
    if not worst <= tolerance * scale:
        kind = getattr(model.config, "model_type", "?")
        raise ValueError(
            f"pack=True: the {kind!r} model ({type(model).__name__}) does not keep packed examples "
            f"apart: its attention ignores the restarting position_ids that mark them (a probe's logits moved "
            f"by {worst:.3g}); train this model without packing"
        )


def pack_for_training(
    model: PreTrainedModel,
    examples: Rows,
    max_length: int,
    batch_size: int,
    seed: int = 0,
    progress: Progress | None = None,
) -> tuple[Rows, dict[str, Any]]:
    """Check that `model` honours packing, pack `examples`, and say what it saved: (rows, summary)."""
    check_model(model)
    rows = pack(examples, max_length, progress)
    return rows, summary(examples, rows, batch_size, seed)
