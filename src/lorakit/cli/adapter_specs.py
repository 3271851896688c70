"""Several adapters on one command line: `--adapter [NAME=]DIR` (repeatable), `--weight NAME=W`, and how
they combine (`--combine`, `--combine-rank`); shared by merge, generate, eval and serve."""

from __future__ import annotations

import argparse
from pathlib import Path

from torch import nn

from ..adapters import COMBINE_METHODS, CombineReport
from .common import BadInput, inputs


def adapter_specs(values: list[str]) -> list[tuple[str, Path]]:
    """[(name, dir)] from `--adapter DIR` or `--adapter NAME=DIR` (repeatable); names default to the folder's."""
    from ..layers import check_adapter_name

    specs: list[tuple[str, Path]] = []
    for value in values:
        name, sep, d = value.partition("=")
        name, d = (name, d) if sep else (Path(value).name.replace(".", "_") or "adapter", value)
        try:
            check_adapter_name(name)
        except ValueError as e:
            raise BadInput(f"--adapter {value!r}: {e}") from None
        if name in dict(specs):
            raise BadInput(f"--adapter: the name {name!r} is given twice; write NAME=DIR to tell them apart")
        specs.append((name, Path(d)))
    return specs


def parse_weights(values: list[str] | None) -> dict[str, float]:
    """{name: weight} from `--weight NAME=W` (repeatable)."""
    out = {}
    for value in values or []:
        name, sep, w = value.partition("=")
        try:
            out[name] = float(w) if sep else float("nan")
        except ValueError:
            out[name] = float("nan")
        if out[name] != out[name]:
            raise BadInput(f"--weight {value!r} is invalid: expected NAME=NUMBER")
    return out


def weights_for(specs: list[tuple[str, Path]], weights: dict[str, float]) -> dict[str, float]:
    """{name: weight} for every --adapter (1 where no --weight names it); unknown --weight names are BadInput."""
    unknown = sorted(set(weights) - {n for n, _ in specs})
    if unknown:
        raise BadInput(f"--weight names {unknown} match no --adapter; adapters: {[n for n, _ in specs]}")
    return {n: weights.get(n, 1.0) for n, _ in specs}


def combine(
    model: nn.Module, specs: list[tuple[str, Path]], weights: dict[str, float], method: str, rank: int | None
) -> CombineReport:
    """Combine the named adapters into one active adapter "combined"; the originals are dropped."""
    from .. import adapters

    report = inputs(adapters.combine_adapters, model, weights_for(specs, weights), "combined", method=method, rank=rank)
    adapters.set_adapter(model, "combined")
    for name, _ in specs:
        adapters.delete_adapter(model, name)
    return report


def add_combine_flags(p: argparse.ArgumentParser) -> None:
    """--weight, --combine, --combine-rank: how several adapters combine (merge and generate)."""
    p.add_argument(
        "--weight",
        action="append",
        metavar="NAME=W",
        help="weight of adapter NAME in a combination (default 1 for each); repeatable",
    )
    p.add_argument(
        "--combine",
        choices=COMBINE_METHODS,
        default="cat",
        help="how several adapters combine: cat (exact, ranks add up; default), svd (to --combine-rank), "
        "linear (equal ranks, approximate)",
    )
    p.add_argument("--combine-rank", type=int, help="the rank of an svd combination")
