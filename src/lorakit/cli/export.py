"""`lorakit export`: the fine-tuned model in an edge runtime's format, proven by reloading it there.

    lorakit export --model DIR --adapter DIR --format onnx|gguf|gguf-adapter --out DIR [--dtype ...]

prints the proof (max |Δlogit|, argmax and greedy-token agreement against lorakit's unmerged model, the
tolerance, the verdict), writes it as OUT/proof.json beside the artefact, and ends with one line naming the
artefact. Exit 1 when a proof fails (nothing is written at --out), 2 for bad input. With --no-proof the
file is written unproven (no runtime needed to prove it): proof.json says why, and a NOT PROVEN line is printed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import LoraFileError
from ..ui.progress import Progress
from .common import (
    BadInput,
    add_base_mismatch_flag,
    add_model_flags,
    base_check,
    inputs,
    model_dir,
    new_or_empty,
    quiet_transformers,
)

if TYPE_CHECKING:
    from ..export.prepare import Exported

FORMATS = ("onnx", "gguf", "gguf-adapter")
DTYPES = ("f32", "f16", "bf16", "q8_0")
RUNTIME = {"onnx": "onnxruntime", "gguf": "llama.cpp", "gguf-adapter": "llama.cpp"}  # where each format's proof runs


def _dtype(args: argparse.Namespace) -> str:
    """The export's dtype (--dtype, or the format's default); BadInput for a format or dtype it cannot write."""
    from ..export import onnx

    if args.format not in FORMATS:
        raise BadInput(f"--format {args.format!r} is not supported; expected one of {', '.join(FORMATS)}")
    dtype = args.dtype or ("f32" if args.format == "onnx" else "f16")
    if args.format == "onnx" and dtype in onnx.REFUSED:  # bf16: refused with onnxruntime's reason
        raise BadInput(f"--dtype {dtype} is refused for --format onnx: {onnx.REFUSED[dtype]}")
    allowed = onnx.DTYPES if args.format == "onnx" else DTYPES
    if dtype not in allowed:
        raise BadInput(f"--dtype {dtype} is not supported for --format {args.format}; expected one of {allowed}")
    return dtype


def _check_gguf(args: argparse.Namespace, model: Path, adapters: list[Path]) -> None:
    """BadInput for what llama.cpp's GGUF cannot express in the model or (gguf-adapter) the one adapter."""
    from ..export.gguf_adapter import check_adapter
    from ..export.gguf_model import check_model

    inputs(check_model, model)
    if args.format == "gguf-adapter":
        if len(adapters) != 1:
            raise BadInput(
                f"--format gguf-adapter writes one adapter, got {len(adapters)}: export each (llama.cpp takes "
                "several --lora files) or merge them into the model with --format gguf"
            )
        try:
            check_adapter(adapters[0], model)
        except LoraFileError as e:
            raise BadInput(_flags(e)) from None


def export(args: argparse.Namespace) -> int:
    """Run `lorakit export`."""
    from ..export import prepare

    quiet_transformers()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    dtype = _dtype(args)
    if not args.adapter:
        raise BadInput("--adapter DIR is required (repeat it to merge several)")
    unproven = _unproven(args, dtype)  # before anything is written or loaded: what is missing, and the remedies
    new_or_empty(args.out, "choose a new --out")
    model_path = inputs(prepare.check_exportable, model_dir(args))
    adapters = [Path(a) for a in args.adapter]
    for a in adapters:
        if not a.is_dir():
            raise BadInput(f"--adapter {a}: no such directory")
        inputs(prepare.check_adapter_base, model_path, a)  # which base it belongs to, before any format's checks
    if args.format != "onnx":  # before the model is loaded: what llama.cpp's GGUF cannot express
        _check_gguf(args, model_path, adapters)
    texts = args.text or prepare.PROOF_TEXTS
    if any(t == "" for t in texts):  # after the model, task and adapter checks: those say more
        raise BadInput("--text '': a proof input needs at least one character")
    progress = Progress()
    model, tok, task = inputs(prepare.load_unmerged, model_path, adapters, **base_check(args), progress=progress)
    try:
        done = _write(args, (model, tok, task), model_path, adapters, texts, dtype, unproven, progress)
    except prepare.ProofFailed as e:
        print(json.dumps(e.proof.to_json(), indent=2))
        print(f"{_flags(e)}; nothing written at {args.out}")
        return 1
    except (LoraFileError, prepare.ExportInputError) as e:  # what the writers refuse (the reason is in e)
        raise BadInput(_flags(e)) from None
    _print_done(done, dtype)
    return 0


def _unproven(args: argparse.Namespace, dtype: str) -> str | None:
    """Why the export will not be proven (--no-proof), or None; BadInput naming what is missing and the remedies."""
    try:
        _require(args.format, dtype, prove=False)  # what writes the file: --no-proof cannot do without it
    except ImportError as e:
        raise BadInput(str(e)) from None
    try:
        _require(args.format, dtype, prove=True)
    except ImportError as e:
        if not args.no_proof:
            raise BadInput(f"{e}; or pass --no-proof to write the file without a proof (proof.json says so)") from None
        return f"no runtime ran the file: {e}"
    return f"--no-proof: the file was not run in {RUNTIME[args.format]}" if args.no_proof else None


def _require(fmt: str, dtype: str, *, prove: bool) -> None:
    """ImportError naming what to install unless the format's writer (and, to `prove`, its runtime) import."""
    from ..export import gguf, onnx

    if fmt == "onnx":
        onnx.require_runtime(prove=prove, dtype=dtype)
    else:
        gguf.require_runtime(prove=prove)


def _write(
    args: argparse.Namespace,
    loaded: tuple[Any, Any, str],
    model_path: Path,
    adapters: list[Path],
    texts: tuple[str, ...] | list[str],
    dtype: str,
    unproven: str | None,
    progress: Progress,
) -> Exported:
    """The export asked for: proven (texts) in its runtime, or written unproven when `unproven` says why."""
    from ..export import gguf, onnx

    model, tok, task = loaded
    if args.format == "onnx" and unproven:
        return onnx.export_unproven(model, tok, task, args.out, reason=unproven, dtype=dtype, progress=progress)
    if args.format == "onnx":
        return onnx.export_loaded(model, tok, task, args.out, texts=texts, dtype=dtype, progress=progress)
    only = args.format == "gguf-adapter"
    if unproven:
        return gguf.export_gguf_unproven(
            model,
            tok,
            task,
            model_path,
            adapters,
            args.out,
            reason=unproven,
            dtype=dtype,
            adapter_only=only,
            progress=progress,
        )
    return gguf.export_gguf(
        model,
        tok,
        task,
        model_path,
        adapters,
        args.out,
        dtype=dtype,
        adapter_only=only,
        texts=texts,
        progress=progress,
    )


def _print_done(done: Exported, dtype: str) -> None:
    """The proofs' summaries and the artefact; for an unproven export, a loud NOT PROVEN line on stderr too."""
    for p in done.proofs:
        print(f"proof: {p.summary()}")
    proof_file = done.out / "proof.json"
    if done.unproven:
        print(
            f"lorakit export: warning: NOT PROVEN: {done.artefact} was written but never run, so nothing shows it "
            f"computes what lorakit does ({done.unproven})",
            file=sys.stderr,
        )
        print(f"exported {done.task} model to {done.artefact} ({dtype}); NOT PROVEN (why: {proof_file})")
        return
    print(f"exported {done.task} model to {done.artefact} ({dtype}); proof in {proof_file}")


def _flags(e: BaseException) -> str:
    """The library's message with the remedy worded in this command's flags."""
    words = {
        '(format "gguf")': "(--format gguf)",
        "(task causal-lm)": "(--task causal-lm)",
        "export it in f32": "export it with --dtype f32",
        "texts where the adapter acts more": "texts where the adapter acts more (--text)",
    }
    text = str(e)
    for library, flags in words.items():
        text = text.replace(library, flags)
    return text


def add_export(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Flags of `lorakit export`."""
    p = subparsers.add_parser(
        "export",
        help="export the fine-tuned model to ONNX or llama.cpp GGUF, proven by running it there",
        description="Export the base with its adapter(s) for an edge runtime and prove it: onnx writes the merged "
        "model's logits graph (torch's exporter) and runs it in onnxruntime; gguf writes the merged Llama-family "
        "model for llama.cpp; gguf-adapter writes the adapter alone in llama.cpp's LoRA layout (with the base as "
        "GGUF beside it). Each proof runs the same inputs through the runtime and through lorakit's unmerged model "
        "and compares every logit; it fails (exit 1, nothing written) past the tolerance it states.",
    )
    add_model_flags(p)
    p.add_argument(
        "--adapter",
        action="append",
        metavar="DIR",
        help="the adapter directory (lorakit or PEFT); repeat to merge several (causal-lm, summed exactly)",
    )
    p.add_argument("--format", default="onnx", help=f"what to write: {', '.join(FORMATS)} (default onnx)")
    p.add_argument("--out", required=True, metavar="DIR", help="where to write the export (new or empty)")
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        help="the exported weights' type (default: f32 for onnx, f16 for gguf and gguf-adapter); for onnx: f32, f16 "
        "or q8_0 (ONNX Runtime's weight-only int8, MatMulNBits in blocks of 32: q8_0's scheme, not GGUF's bytes); "
        "bf16 is refused for onnx (onnxruntime's CPU provider has no bfloat16 Add/Mul kernels)",
    )
    p.add_argument(
        "--text", action="append", metavar="TEXT", help="a proof input (repeatable; default: a few fixed sentences)"
    )
    p.add_argument(
        "--no-proof",
        action="store_true",
        help="write the file without running it in its runtime (when llama-cpp-python or onnxruntime is not "
        'installed): proof.json says {"passed": null, "reason": ...} and the command prints NOT PROVEN',
    )
    add_base_mismatch_flag(p)
    p.set_defaults(run=export)
