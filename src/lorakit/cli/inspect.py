"""`lorakit inspect`: what an adapter holds (files.inspect), the base it was saved for (its lorakit.json and,
with `--model DIR`, whether DIR holds that base), and with `--target` what each runtime refuses (portability)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..files import provenance
from ..hf import models as hf
from .common import add_model_flags, inputs, model_dir


def inspect(args: argparse.Namespace) -> int:
    """Run `lorakit inspect`."""
    from ..files import inspect as adapter_info

    info = inputs(adapter_info.describe, args.adapter)
    base = model_dir(args) if args.model else None  # a hub id resolved to its directory
    if info["kind"] == adapter_info.MODEL_ADAPTER_KIND:  # the base it was saved for; with --model, whether DIR holds it
        info.update(provenance_info(args, base))
    # -- portability report: --target, and with --model the base's config.json too ----------
    found = None
    if args.target:
        from ..export import portability

        model = inputs(portability.read_model_config, base) if base else None
        found = portability.check(info, list(dict.fromkeys(args.target)), model)
        info["portability"] = {t: [f.to_json() for f in fs] for t, fs in found.items()}
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        text = adapter_info.render(info) + (render_provenance(info) if "provenance" in info else "")
        print(text + ("\n\n" + portability.render(found) if found else ""))
    return 0


def provenance_info(args: argparse.Namespace, base_dir: Path | None = None) -> dict[str, Any]:
    """{"provenance": ...} for `inspect --json`: None for an adapter without lorakit.json; with `base_dir` (--model
    resolved), whether that model is the base."""
    path = Path(args.adapter)
    directory = path if path.is_dir() else path.parent
    sidecar = inputs(provenance.read, directory)
    if sidecar is None:
        return {"provenance": None}
    base = sidecar.base
    info: dict[str, Any] = {
        "sidecar": sidecar.path,
        "base_path": base.get("path"),
        "base_config_sha256": base.get("config_sha256"),
        "base_class": base.get("class"),
        "base_config": base.get("config", {}),
        "fingerprint": provenance.fingerprint_id(base),
        "modules": len(base["modules"]),
        "tensors": len(base.get("tensors", {})),  # the rest of the base (none in a format-1 sidecar)
        "quantized": sorted({m["quantized"] for m in base["modules"].values() if "quantized" in m}),
    }
    if base_dir is not None:
        from ..fingerprint import fingerprint_like

        task, id2label = inputs(hf.read_task, directory)
        model = inputs(hf.load_model, base_dir, task, id2label=id2label if task == "seq-cls" else None)
        differences = provenance.compare(base, fingerprint_like(model, sidecar))
        info.update(model=str(args.model), matches=not differences, differences=differences)
    return {"provenance": info}


def render_provenance(info: dict[str, Any]) -> str:
    """The provenance block as text lines (empty where there is none to show)."""
    p = info.get("provenance")
    if p is None:
        return "\nprovenance: no lorakit.json (a PEFT-made or older adapter): its base cannot be checked"
    lines = [
        "",
        f"provenance      {p['sidecar']}",
        f"  base          {p['base_path'] or '(not a directory when saved)'} ({p['base_class']})",
        f"  fingerprint   {p['fingerprint']} over {p['modules']} modules and {p['tensors']} other base tensors"
        + (f" (source of a {'/'.join(p['quantized'])}-quantised base)" if p["quantized"] else ""),
    ]
    if p.get("base_config_sha256"):
        lines.append(f"  config.json   sha256 {p['base_config_sha256'][:16]}")
    if "matches" in p:
        verdict = "matches" if p["matches"] else f"does NOT match ({len(p['differences'])} differences)"
        lines.append(f"  --model       {p['model']}: {verdict}")
        lines += [f"    {d}" for d in p["differences"][:8]]
    return "\n".join(lines)


def add_inspect(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Flags of `lorakit inspect`."""
    p = subparsers.add_parser(
        "inspect",
        help="show what an adapter holds (lorakit- or PEFT-made)",
        description="Show an adapter's config, targets, per-module shapes and ranks, parameter count, file size "
        "and the base weight shapes it expects. Reads only JSON and safetensors.",
    )
    p.add_argument("adapter", help="adapter directory, its adapter_model.safetensors, or a lorakit layer .safetensors")
    p.add_argument("--json", action="store_true", help="print the description as JSON")
    p.add_argument(
        "--target",
        action="append",
        choices=("vllm", "llama.cpp", "onnx", "peft", "sglang"),
        help="report what this runtime refuses or computes differently for the adapter, and what fixes it "
        "(repeatable); docs/export.md lists the rules and their sources",
    )
    add_model_flags(
        p,
        required=False,
        help="a base model: say whether the adapter was saved for it (and with --target, check its config.json "
        "for the runtime too)",
    )
    p.set_defaults(run=inspect)
