"""Regional compilation: `torch.compile` each instance of a model's repeated block (a transformer's decoder layer)
in place, so one compiled code serves every layer and the rest of the model (embeddings, the loss) stays eager.

This is how transformers and torchtune compile for training: compiling the block instead of the whole model
keeps compile time to one layer's worth, and the LoRA op (`lorakit.ops_linear`'s autograd Function) is traced
inside the block's graph (tests/train/test_compile.py checks there is no graph break).

Dropout masks equal eager's: inductor is asked for `fallback_random` on each compile call (its own RNG would draw
different masks), so a compiled run trains on the same masks, and resumes to the same bytes, as an eager one.

Recompiles: dynamo keys a compiled graph on its input shapes and on whether the input needs a gradient (the
first layer's input, from the frozen embeddings, does not; the others' do), so one length gives two graphs.
With `dynamic=None` (the default) the first new length compiles a graph over symbolic lengths and later lengths
reuse it; with `dynamic=False` every distinct length compiles again and dynamo falls back to eager past its
recompile limit (8 per code) — measured: the fourth distinct length already did. `Compiled.recompiles` counts
them (process-wide dynamo counters since `compile_blocks`; torch keeps no per-module count).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from ..bases import is_quantized

COMPILE_PAD_MULTIPLE = 8  # finetune pads batches to a multiple of this when compiling (see docs/finetuning.md)


def _dynamo_totals() -> tuple[int, float]:
    """Dynamo's process-wide count of compiled graphs and the seconds spent compiling them (forward and backward)."""
    from torch._dynamo.utils import compilation_time_metrics, counters

    graphs = counters["stats"]["unique_graphs"]
    # a frame's compile (dynamo trace + AOT + the backend's forward) and the backward compiled at first backward
    keys = [k for k in compilation_time_metrics if k == "_compile.compile_inner" or "bw_compiler" in k]
    return graphs, sum(sum(compilation_time_metrics[k]) for k in keys)


@dataclass
class Compiled:
    """What `compile_blocks` compiled, and (live) what compiling has cost since.

    Attributes:
        modules: the dotted names of the compiled modules ("" for the whole model).
        block: the class name of the compiled block.
        backend: the torch.compile backend.
    """

    modules: tuple[str, ...]
    block: str
    backend: str
    _graphs0: int = field(default=0, repr=False)
    _seconds0: float = field(default=0.0, repr=False)
    _first: int | None = field(default=None, repr=False)  # graphs the first forward compiled

    def first_forward_done(self) -> None:
        """Note the graphs the first forward compiled (one per variant of the block's input): later ones recompile."""
        if self._first is None:
            self._first = self.graphs

    @property
    def graphs(self) -> int:
        """Graphs compiled since `compile_blocks` (one per input variant: shapes, gradient needs, grad mode)."""
        return _dynamo_totals()[0] - self._graphs0

    @property
    def recompiles(self) -> int:
        """Graphs compiled after the first forward (new lengths, evaluation's no-grad mode); 0 before it ends."""
        return 0 if self._first is None else self.graphs - self._first

    @property
    def compile_s(self) -> float:
        """Seconds spent compiling since `compile_blocks` (dynamo's own records, forward and backward graphs)."""
        return _dynamo_totals()[1] - self._seconds0


def block_names(model: nn.Module) -> tuple[str, tuple[str, ...]]:
    """The repeated block's class name and the dotted names of its instances; ("", ("",)) for none found."""
    declared = set(getattr(model, "_no_split_modules", None) or ())
    named = [(n, m) for n, m in model.named_modules() if type(m).__name__ in declared]
    if named:
        return type(named[0][1]).__name__, tuple(n for n, _ in named)
    counts: Counter[type] = Counter()
    for m in model.modules():
        if isinstance(m, nn.ModuleList):
            counts.update(type(child) for child in m)
    if counts:
        cls, n = counts.most_common(1)[0]
        if n > 1:
            in_lists = {id(c) for m in model.modules() if isinstance(m, nn.ModuleList) for c in m}
            return cls.__name__, tuple(n for n, m in model.named_modules() if type(m) is cls and id(m) in in_lists)
    return type(model).__name__, ("",)


def compile_blocks(model: nn.Module, *, backend: str = "inductor", dynamic: bool | None = None) -> Compiled:
    """Compile each instance of `model`'s repeated block in place (`module.compile`): regional compilation.

    The block is the class named by transformers' `model._no_split_modules` when present, else the class
    repeated most inside an `nn.ModuleList`, else the whole model. Every instance gets the same options, so
    dynamo reuses one compiled code for all of them; a block compiled already is left as it is (so a caller may
    compile with another backend before the Trainer's `compile` option does). Under inductor, random ops fall
    back to eager's (`fallback_random`, per call), so dropout masks are the ones an eager run draws.

    Args:
        model: the model (LoRA applied, on its device); changed in place, parameters and state_dict untouched.
        backend: a torch.compile backend ("inductor"; "aot_eager" traces without generating code).
        dynamic: torch.compile's `dynamic`: None compiles a length-generic graph at the first new length,
            False compiles each distinct shape (bounded only by padding to few lengths), True from the start.

    Returns:
        A `Compiled` naming the compiled modules, with live `compile_s` and `recompiles`.

    Examples:
        >>> net = nn.Sequential(nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)]))
        >>> compile_blocks(net, backend="eager").modules
        ('0.0', '0.1')
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"compile_blocks needs an nn.Module, got {type(model).__name__}")
    block, names = block_names(model)
    options = {"fallback_random": True} if backend == "inductor" else None
    graphs, seconds = _dynamo_totals()
    for name in names:
        module = model.get_submodule(name)
        if getattr(module, "_compiled_call_impl", None) is None:  # compiled already: keeps its backend and options
            module.compile(backend=backend, dynamic=dynamic, options=options)
    compiled = Compiled(names, block, backend, graphs, seconds)
    if names != ("",):  # the model's own forward stays eager: its end marks the first batch's graphs

        def first_forward(*_: object) -> None:
            compiled.first_forward_done()
            handle.remove()

        handle = model.register_forward_hook(first_forward)
    return compiled


def compile_unsupported(model: nn.Module, device: torch.device | str) -> str | None:
    """Why compiling `model`'s training on `device` is not offered (None: it is): MPS, a quantised base, or
    gradient checkpointing (torch.utils.checkpoint runs with dynamo disabled inside it, so a checkpointed block
    would run eager whatever was compiled: measured, tests/train/test_compile.py).

    Examples:
        >>> compile_unsupported(nn.Linear(2, 2), "mps")
        'compiled training is not supported on MPS'
    """
    if torch.device(device).type == "mps":
        return "compiled training is not supported on MPS"
    quantised = [type(m).__name__ for m in model.modules() if is_quantized(m) or hasattr(m, "quant_state")]
    if quantised or getattr(model, "is_quantized", False):
        return f"the base is quantised ({', '.join(sorted(set(quantised))) or 'is_quantized'}): not proven to trace"
    if any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules()):
        return "gradient checkpointing is on: torch.utils.checkpoint runs its blocks with torch.compile disabled"
    return None
