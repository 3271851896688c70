"""`lorakit export`: the model with its adapter(s) merged, in an edge runtime's format, proven by reloading it there.

    lorakit export --model DIR --adapter DIR --format onnx --out DIR

prints the proof (max |Δlogit| and argmax agreement against lorakit's unmerged model, the tolerance, the verdict)
and writes it as OUT/proof.json. Exit 1 when the proof fails (nothing is written at --out), 2 for bad input.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict
from pathlib import Path

from ..train.progress import Progress
from .common import BadInput, inputs, new_or_empty, quiet_transformers

FORMATS = ("onnx",)  # E2 adds gguf and gguf-adapter


def export(args: argparse.Namespace) -> int:
    """Run `lorakit export`."""
    from ..export import onnx

    quiet_transformers()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    if args.format not in FORMATS:
        raise BadInput(f"--format {args.format!r} is not supported; expected one of {', '.join(FORMATS)}")
    if args.dtype != "f32":
        raise BadInput(f"--dtype {args.dtype} is not supported for --format onnx yet; expected f32")
    if not args.adapter:
        raise BadInput("--adapter DIR is required (repeat it to merge several)")
    try:
        onnx.require_runtime()
    except ImportError as e:
        raise BadInput(str(e)) from None
    new_or_empty(args.out, "choose a new --out")
    inputs(onnx.check_exportable, args.model)
    adapters = [Path(a) for a in args.adapter]
    for a in adapters:
        if not a.is_dir():
            raise BadInput(f"--adapter {a}: no such directory")
    texts = args.text or onnx.PROOF_TEXTS
    progress = Progress()
    model, tok, task = inputs(onnx.load_unmerged, args.model, adapters, progress=progress)
    try:
        done = onnx.export_loaded(model, tok, task, args.out, texts=texts, progress=progress)
    except onnx.ProofFailed as e:
        print(json.dumps(asdict(e.proof), indent=2))
        print(f"{e}; nothing written at {args.out}")
        return 1
    print(json.dumps(asdict(done.proof), indent=2))
    print(f"exported {done.task} model to {done.onnx_file}; proof {done.proof.summary()}")
    return 0


def add_export(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Flags of `lorakit export`."""
    p = subparsers.add_parser(
        "export",
        help="export the model with its adapter(s) merged to ONNX, proven in onnxruntime",
        description="Merge the adapter(s) into the base, export the forward logits (seq-cls or causal-lm) with "
        "torch's ONNX exporter, reload the file in onnxruntime and compare its logits with lorakit's on the same "
        "inputs. Writes OUT/model.onnx, the tokenizer, config.json and OUT/proof.json; fails (exit 1, nothing "
        "written) when the logits differ by more than the stated tolerance or an argmax disagrees.",
    )
    p.add_argument("--model", required=True, metavar="DIR", help="the base model directory (transformers)")
    p.add_argument(
        "--adapter",
        action="append",
        metavar="DIR",
        help="the adapter directory (lorakit or PEFT); repeat to merge several (causal-lm, summed exactly)",
    )
    p.add_argument("--format", default="onnx", help=f"what to write: {', '.join(FORMATS)} (default onnx)")
    p.add_argument("--out", required=True, metavar="DIR", help="where to write the export (new or empty)")
    p.add_argument("--dtype", default="f32", choices=["f32"], help="the exported weights' dtype (default f32)")
    p.add_argument(
        "--text", action="append", metavar="TEXT", help="a proof input (repeatable; default: a few fixed sentences)"
    )
    p.set_defaults(run=export)
