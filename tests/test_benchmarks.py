"""The benchmark suite runs end to end on a tiny model and writes a RESULTS-style report (to a tmp dir)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

RUN = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"


def load_run():
    spec = importlib.util.spec_from_file_location("lorakit_benchmarks_run", RUN)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_quick_run_writes_a_report(tmp_path):
    out = tmp_path / "RESULTS.md"
    threads = torch.get_num_threads()
    try:
        assert load_run().main(["--quick", "--out", str(out)]) == out
    finally:
        torch.set_num_threads(threads)  # the run pins threads; leave the session as it was
    text = out.read_text()
    for heading in ("## Targets", "## Training step", "## Memory", "## Inference forward", "## Adapter operations"):
        assert heading in text
    assert "Machine: " in text and "torch " in text and "peft " in text
    for case in ("lorakit p=0", "PEFT p=0.1", "frozen bound", "full fine-tuning", "lorakit unmerged", "merged"):
        assert f"| {case} |" in text
    for op in ("save", "load-and-activate (hot swap)", "merge", "unmerge"):
        assert f"| {op} |" in text
    targets = [line for line in text.splitlines() if line.startswith("| ") and line.endswith(("| met |", "| **missed** |"))]
    assert len(targets) == 7  # every target is judged, met or missed
    assert "nan" not in text.lower().replace("nanogpt", "")


def test_lorakit_bench_subcommand_is_wired():
    from lorakit import cli

    args = cli.build_parser().parse_args(["bench", "--quick", "--threads", "2", "--out", "x.md"])
    assert args.run is cli.bench and args.quick and args.threads == 2 and str(args.out) == "x.md"


def test_variants_suite_runs_quick():
    """benchmarks/variants.py end to end on a tiny model (a name clash once broke it while all.sh said 'wrote')."""
    import subprocess

    script = RUN.parent / "variants.py"
    r = subprocess.run([sys.executable, str(script), "--quick", "--threads", "1"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| dora | lorakit DoRA |" in r.stdout and "DoRA row norm" in r.stdout


# -- benchmarks/checkpointing.py (gradient checkpointing and packing) ---------------------------------

def test_checkpointing_suite_runs_quick(tmp_path):
    """The suite end to end on a tiny model: both tables, every case, checkpointing keeping less for backward."""
    import subprocess

    out = tmp_path / "RESULTS-checkpointing.md"
    r = subprocess.run([sys.executable, str(RUN.parent / "checkpointing.py"), "--quick", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    text = out.read_text()
    assert "Machine: " in text and "torch " in text and "nan" not in text.lower()
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in text.splitlines() if line.startswith("| ")}
    assert {"plain", "gradient checkpointing", "unpacked", "packed"} <= rows.keys()
    mib = [float(rows[c][4].split()[0]) for c in ("plain", "gradient checkpointing")]  # saved for backward
    assert mib[1] < mib[0]
    padding = [float(rows[c][3].rstrip("%")) for c in ("unpacked", "packed")]
    assert padding[1] < padding[0]


# -- benchmarks/serve.py (the serving engine under load) ----------------------------------------------

def test_serve_suite_runs_quick(tmp_path):
    """The suite end to end on a tiny model: every configuration and target judged, the llama.cpp note."""
    import subprocess

    out = tmp_path / "RESULTS-serve.md"
    r = subprocess.run([sys.executable, str(RUN.parent / "serve.py"), "--quick", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    text = out.read_text()
    assert "Machine: " in text and "torch " in text and "nan" not in text.lower()
    throughput = text.split("## Throughput and latency", 1)[1].split("\n## ", 1)[0]
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in throughput.splitlines() if line.startswith("| ")}
    assert {"base", "1 adapter", "4 adapters", "one at a time"} <= rows.keys()
    assert all(float(rows[c][2].replace(",", "")) > 0 for c in ("base", "1 adapter", "4 adapters", "one at a time"))
    targets = [line for line in text.splitlines() if line.endswith(("| met |", "| **missed** |"))]
    assert len(targets) == 3
    assert "llama.cpp" in text and "not run" in text
