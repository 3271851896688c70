"""`lorakit inspect`'s provenance block: the base an adapter was saved for, and, given
`--model DIR`, whether that base is the one in DIR (a separate block from inspect's own description)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..files import provenance
from ..hf import models as hf
from .common import inputs


def provenance_info(args: argparse.Namespace) -> dict[str, Any]:
    """{"provenance": ...} for `inspect --json`: None for an adapter without lorakit.json."""
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
    model_dir = getattr(args, "model", None)
    if model_dir:
        from ..fingerprint import fingerprint_like

        task, id2label = inputs(hf.read_task, directory)
        model = inputs(hf.load_model, model_dir, task, id2label=id2label if task == "seq-cls" else None)
        differences = provenance.compare(base, fingerprint_like(model, sidecar))
        info.update(model=str(model_dir), matches=not differences, differences=differences)
    return {"provenance": info}


def render(info: dict[str, Any]) -> str:
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
