"""The benchmark suite runs end to end on a tiny model and writes a RESULTS-style report (to a tmp dir)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # subprocesses, servers or export runtimes: not in the fast set

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
        assert load_run().main(["--quick", "--cases", "classic", "--out", str(out)]) == out
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
    targets = [
        line for line in text.splitlines() if line.startswith("| ") and line.endswith(("| met |", "| **missed** |"))
    ]
    assert len(targets) == 7  # every target is judged, met or missed
    assert "nan" not in text.lower().replace("nanogpt", "")


def test_quick_step_cases_time_the_fast_path_against_the_frozen_bound(tmp_path):
    """--cases step: lorakit p=0, 'lorakit fast' (fused + compiled blocks + chunked loss) and the frozen bound."""
    out = tmp_path / "RESULTS-step.md"
    threads = torch.get_num_threads()
    try:
        assert load_run().main(["--quick", "--cases", "step", "--rounds", "2", "--out", str(out)]) == out
    finally:
        torch.set_num_threads(threads)
    text = out.read_text()
    assert "Machine: " in text and "AVX" in text and "nan" not in text.lower()
    for case in ("lorakit p=0", "lorakit fast", "frozen bound"):
        assert f"| {case} |" in text
    assert "| training step ≤ 1.0× frozen bound (uncompiled), lorakit fast |" in text


def test_lorakit_bench_subcommand_is_wired():
    from lorakit import cli

    args = cli.build_parser().parse_args(["bench", "--quick", "--threads", "2", "--out", "x.md"])
    assert args.run is cli.bench and args.quick and args.threads == 2 and str(args.out) == "x.md"


def test_variants_suite_runs_quick():
    """benchmarks/variants.py end to end on a tiny model (a name clash once broke it while all.sh said 'wrote')."""
    import subprocess

    script = RUN.parent / "variants.py"
    r = subprocess.run(
        [sys.executable, str(script), "--quick", "--threads", "1"], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| dora | lorakit DoRA |" in r.stdout and "DoRA row norm" in r.stdout


# -- benchmarks/checkpointing.py (gradient checkpointing and packing) ---------------------------------


def test_checkpointing_suite_runs_quick(tmp_path):
    """The suite end to end on a tiny model: both tables, every case, checkpointing keeping less for backward."""
    import subprocess

    out = tmp_path / "RESULTS-checkpointing.md"
    r = subprocess.run(
        [sys.executable, str(RUN.parent / "checkpointing.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    text = out.read_text()
    assert "Machine: " in text and "torch " in text and "nan" not in text.lower()
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in text.splitlines() if line.startswith("| ")}
    assert {"plain", "gradient checkpointing", "unpacked", "packed"} <= rows.keys()
    mib = [float(rows[c][4].split()[0]) for c in ("plain", "gradient checkpointing")]  # saved for backward
    assert mib[1] < mib[0]
    padding = [float(rows[c][3].rstrip("%")) for c in ("unpacked", "packed")]
    assert padding[1] < padding[0]


def test_chunked_ce_suite_runs_quick(tmp_path):
    """benchmarks/chunked_ce.py on a tiny model: a row per vocabulary, both losses timed and their memory measured."""
    import subprocess

    out = tmp_path / "RESULTS-chunked-ce.md"
    script = RUN.parent / "chunked_ce.py"
    r = subprocess.run([sys.executable, str(script), "--quick", "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    text = out.read_text()
    assert "Machine: " in text and "CHUNKED_LOSS_MIN_VOCAB" in text and "nan" not in text.lower()
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [row[0][2:] for row in rows] == ["512", "2,048"] and all(row[3].endswith("×") for row in rows)


# -- benchmarks/serve.py (the serving engine under load) ----------------------------------------------


def test_serve_suite_runs_quick(tmp_path):
    """The suite end to end on a tiny model: every configuration and target judged, the llama.cpp note."""
    import subprocess

    out = tmp_path / "RESULTS-serve.md"
    r = subprocess.run(
        [sys.executable, str(RUN.parent / "serve.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
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


# -- benchmarks/e2e.py, scale.py, gpu.sh (issue #16: end to end, scale curves, GPU readiness) -----------------


def _table_rows(text: str, section: str) -> dict[str, list[str]]:
    part = text.split(section, 1)[1].split("\n## ", 1)[0]
    return {line.split(" | ")[0][2:]: line.split(" | ") for line in part.splitlines() if line.startswith("| ")}


def test_e2e_suite_runs_quick(tmp_path):
    """lorakit finetune (the real CLI) and Trainer + PEFT each train in their own process; both are measured."""
    import subprocess

    out = tmp_path / "RESULTS-e2e.md"
    r = subprocess.run(
        [sys.executable, str(RUN.parent / "e2e.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    text = out.read_text()
    assert "Machine: " in text and "Load average" in text and "nan" not in text.lower()
    assert ("AVX" in text or "DEFAULT" in text) and "torch kernels: " in text  # the CPU's ISA is named
    rows = _table_rows(text, "## Variant base")
    for side in ("lorakit finetune", "Trainer + PEFT"):
        tokens_per_s, tokens, rss = (float(rows[side][i].split()[0].replace(",", "")) for i in (1, 4, 5))
        assert tokens_per_s > 0 and rss > 100  # MiB: a process that imported torch
        # the 4 counted steps of batch 2, at most max-length 32 real tokens a row (+1 a logged interval: lorakit's
        # tokens are its rows' throughput x interval, rounded)
        assert 0 < tokens <= 4 * 2 * 32 + 2
    assert rows["lorakit finetune / Trainer + PEFT"][1].split("×")[0].replace(".", "").isdigit()  # paired ratio
    targets = [line for line in text.splitlines() if line.endswith(("| met |", "| **missed** |"))]
    assert len(targets) == 1  # --quick runs the eager sides on base: the compiled and vocab32k targets say so
    assert text.count("| not run (") == 2


def test_scale_suite_runs_quick(tmp_path):
    """Both curves at every point, the adapter-load curve judged against its target, three PNG plots."""
    import subprocess

    out = tmp_path / "RESULTS-scale.md"
    r = subprocess.run(
        [sys.executable, str(RUN.parent / "scale.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    text = out.read_text()
    assert "Machine: " in text and "Load average" in text and "nan" not in text.lower()
    assert {"16", "32"} <= _table_rows(text, "## Sequence length").keys()
    assert {"32", "64"} <= _table_rows(text, "## Hidden size").keys()
    loads = _table_rows(text, "## Adapter loads")
    assert {"1", "12"} <= loads.keys() and loads["12"][3] == "—"  # PEFT stops at 6 in --quick
    per_adapter = loads["resident memory per loaded adapter"]  # a number per library (tiny here, either sign)
    assert all(float(cell.split()[0]) == float(cell.split()[0]) and "MiB" in cell for cell in per_adapter[1:3])
    targets = [line for line in text.splitlines() if line.endswith(("| met |", "| **missed** |"))]
    assert len(targets) == 1
    for kind in ("seq", "hidden", "adapters"):
        png = tmp_path / f"scale-{kind}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"(scale-{kind}.png)" in text


def test_gpu_script_parses_and_every_flag_it_passes_is_accepted():
    """gpu.sh cannot run without a GPU; its syntax and each script's parse of the flags it passes are checked."""
    import shlex
    import subprocess

    script = RUN.parent / "gpu.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    env = {**__import__("os").environ, "GPU_SH_DRY": "1", "PYTHON": sys.executable}
    r = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    commands = [shlex.split(line)[1:] for line in r.stdout.splitlines()]
    assert {Path(c[0]).name for c in commands} == {"run.py", "adapters.py", "e2e.py", "scale.py", "serve.py"}
    e2e = [c for c in commands if Path(c[0]).name == "e2e.py"]
    spec = importlib.util.spec_from_file_location("lorakit_benchmarks_e2e", RUN.parent / "e2e.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    parsed = [module.parse_args(c[1:]) for c in e2e]  # the real parser: variant and side names checked too
    assert all(a.precision == "bf16" and a.device == "cuda" and a.reps == 2 for a in parsed)
    assert parsed[0].variant_names == ["base", "vocab32k", "long"] and "hf-compile" in parsed[0].side_keys
    assert parsed[1].variant_names == ["long"] and parsed[1].side_keys == ["lk", "lk-offload"]
    # each script's own parser, stopped right after parsing (one process for all: the imports are shared);
    # unknown flags or bad values exit 2
    check = (
        "import argparse, json, runpy, sys\n"
        "def parse(self, args=None, namespace=None):\n"
        "    ns, extra = self.parse_known_args(args, namespace)\n"
        "    if extra: self.error('unrecognized arguments: ' + ' '.join(extra))\n"
        "    print('parsed', sys.argv[0], ns.device); raise SystemExit(0)\n"
        "argparse.ArgumentParser.parse_args = parse\n"
        "for c in json.loads(sys.argv[1]):\n"
        "    sys.argv = c\n"
        "    try: runpy.run_path(c[0], run_name='__main__')\n"
        "    except SystemExit as e:\n"
        "        if e.code: raise\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", check, __import__("json").dumps(commands)],
        capture_output=True,
        text=True,
        cwd=RUN.parents[1],
        timeout=120,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert [line for line in p.stdout.splitlines() if line.startswith("parsed ")] == [
        f"parsed {c[0]} cuda" for c in commands
    ]


def test_export_suite_runs_quick(tmp_path):
    """Every format and dtype exported and proven on a tiny Llama: a row per proof, every proof passed."""
    import subprocess

    out = tmp_path / "RESULTS-export.md"
    r = subprocess.run(
        [sys.executable, str(RUN.parent / "export.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [line.split(" | ") for line in out.read_text().splitlines() if line.startswith(("| onnx", "| gguf"))]
    assert len(rows) == 3 + 4 + 2 * 4  # onnx f32/f16/q8_0; gguf 4 dtypes; gguf-adapter 4 dtypes x (base, adapter)
    assert all(row[7] == "passed" for row in rows), rows


def test_fingerprint_suite_runs_quick(tmp_path):
    """The whole-base fingerprint benchmark on a tiny Llama: every row written, the first-load figure stated."""
    import subprocess

    out = tmp_path / "RESULTS-fingerprint.md"
    r = subprocess.run(
        [sys.executable, str(RUN.parent / "fingerprint.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    text = out.read_text()
    assert text.count("**what a first load adds**") == 2 and "every byte of every tensor is hashed" in text.lower()


# -- benchmarks/moe.py (LoRA on mixture-of-experts weights) ---------------------------------------------


def test_moe_suite_runs_quick(tmp_path):
    """The MoE suite end to end on a tiny Qwen3-MoE, in this process: every case timed, every target judged,
    lorakit and PEFT agreeing on the same factors."""
    spec = importlib.util.spec_from_file_location("lorakit_benchmarks_moe", RUN.parent / "moe.py")
    moe = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = moe
    spec.loader.exec_module(moe)
    out = tmp_path / "RESULTS-moe.md"
    threads = torch.get_num_threads()
    try:
        assert moe.main(["--quick", "--no-rss", "--out", str(out)]) == out
    finally:
        torch.set_num_threads(threads)  # the run pins threads; leave the session as it was
    text = out.read_text()
    assert "Machine: " in text and "Qwen3-MoE" in text and "nan" not in text.lower()
    rows = _table_rows(text, "## Training step")
    assert {"frozen bound", "PEFT", "lorakit", "lorakit NF4"} <= rows.keys()
    assert all(float(rows[c][1].split()[0].replace(",", "")) > 0 for c in ("frozen bound", "PEFT", "lorakit"))
    params = {c: int(rows[c][5].rstrip(" |").replace(",", "")) for c in ("frozen bound", "PEFT", "lorakit")}
    assert params["frozen bound"] == 0 and params["lorakit"] == params["PEFT"] > 0
    targets = [line for line in text.splitlines() if line.endswith(("| met |", "| **missed** |"))]
    assert len(targets) == 2  # step vs frozen bound, step vs PEFT (peak memory needs the RSS processes)
    agreement = float(text.split("max |logit difference| ")[1].split(".\n")[0])
    assert agreement < 1e-4
    ratio = float(text.split("## QLoRA: NF4 expert weights")[1].split(" fp32 (")[1].split("×")[0])
    assert 0.1 < ratio < 0.2  # NF4 expert bytes against fp32


def test_moe_mixed_suite_runs_quick(tmp_path):
    """The mixed-batch MoE benchmark end to end on a tiny Qwen3-MoE: the mixed batch agrees with each row alone
    before anything is timed, every case is timed, the target is judged."""
    spec = importlib.util.spec_from_file_location("lorakit_benchmarks_moe_mixed", RUN.parent / "moe_mixed.py")
    mixed = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mixed
    spec.loader.exec_module(mixed)
    out = tmp_path / "RESULTS-moe-mixed.md"
    threads = torch.get_num_threads()
    try:
        assert mixed.main(["--quick", "--out", str(out)]) == out
    finally:
        torch.set_num_threads(threads)
    text = out.read_text()
    assert "Machine: " in text and "Qwen3-MoE" in text and "nan" not in text.lower()
    times = [line for line in text.splitlines() if line.startswith("| ") and " ms |" in line]
    assert [t.split(" | ")[0] for t in times] == ["| base (adapters disabled)", "| one adapter", "| mixed"]
    assert "met." in text or "**missed**." in text
    assert float(text.split("adapter to ")[1].split(" ")[0]) < 1e-4


# -- benchmarks/preference.py (DPO and GRPO against TRL + PEFT) ---------------------------------------


def test_preference_suite_runs_quick(tmp_path):
    """DPO and GRPO against TRL + PEFT on a tiny Llama, the training sides in this process: every side measured,
    every target without peak RSS judged."""
    spec = importlib.util.spec_from_file_location("lorakit_benchmarks_preference", RUN.parent / "preference.py")
    preference = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = preference
    spec.loader.exec_module(preference)
    out = tmp_path / "RESULTS-preference.md"
    threads = torch.get_num_threads()
    try:
        assert preference.main(["--quick", "--no-rss", "--out", str(out)]) == out
    finally:
        torch.set_num_threads(threads)  # the run pins threads; leave the session as it was
    text = out.read_text()
    assert "Machine: " in text and "trl " in text and "nan" not in text.lower()
    dpo = _table_rows(text, "## DPO")
    assert all(
        float(dpo[s][1].replace(",", "")) > 0
        for s in ("lorakit DPOObjective (reference cached)", "TRL DPOTrainer + PEFT")
    )
    rollouts = _table_rows(text, "### Rollouts")
    assert all(float(rollouts[s][1].replace(",", "")) > 0 for s in ("lorakit EngineSampler", "TRL generate"))
    steps = _table_rows(text, "### Whole step")
    assert {"lorakit GRPOObjective (EngineSampler)", "TRL GRPOTrainer + PEFT (generate)"} <= steps.keys()
    targets = [line for line in text.splitlines() if line.endswith(("| met |", "| **missed** |"))]
    assert len(targets) == 3  # DPO tokens/s, rollout tokens/s, GRPO step (peak RSS needs the processes)


def test_cpu_choices_suite_runs_quick(tmp_path):
    """Each CPU choice of the LoRA linear timed both ways; the page names the CPU, its ISA and the code's plan."""
    spec = importlib.util.spec_from_file_location("lorakit_benchmarks_cpu_choices", RUN.parent / "cpu_choices.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    threads = torch.get_num_threads()
    try:
        out = mod.main(["--quick", "--out", str(tmp_path / "RESULTS-cpu-choices.md")])
    finally:
        torch.set_num_threads(threads)
    text = out.read_text()
    assert "Machine: " in text and "get_cpu_capability() = " in text and "GemmPlan(rank_r='wide'" in text
    for heading in ("## Rank-r GEMM orientation", "## Rank-r orientation in the whole layer", "## Folding"):
        assert heading in text
