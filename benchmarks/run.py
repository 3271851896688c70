"""lorakit vs PEFT vs the cost floor, side by side, in one process: writes benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/run.py                # the default model (about 5 minutes on 2 CPU cores)
    .venv/bin/python benchmarks/run.py --quick --out /tmp/r.md   # a tiny model, seconds (the test uses this)
    .venv/bin/python benchmarks/run.py --device cuda --threads 8

Model: a Llama-style transformers model built from a config (random weights, seeded), LoRA on all seven
projections. lorakit and PEFT get the same base weights, the same A/B and the same inputs; every case runs
once per round, rounds interleave and rotate, and ratios are medians of same-round ratios.

Fairness of the frozen bound: the three LoRA-shaped training cases (lorakit, PEFT, frozen) take the token
embeddings as an input that requires grad, so all three back-propagate through exactly the same
activations down to layer 0; a LoRA step then differs from the frozen step only by its LoRA branches
(with token ids as input a LoRA step would skip layer 0's q/k/v input gradients, which would flatter it).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from harness import TARGETS  # noqa: E402  (the suites import it from here)
from run_ops import adapter_ops, inference_cases, inputs, profile_delta  # noqa: E402
from run_report import report, step_report  # noqa: E402

HERE = Path(__file__).resolve().parent


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The benchmark model's size and LoRA rank (the Llama-style default of the issue), shared by every suite."""
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1376)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--rank", type=int, default=8)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--dropout", type=float, default=0.1, help="the non-zero dropout case")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 matches the issue's numbers)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=9, help="interleaved rounds of the training cases")
    p.add_argument("--fast-rounds", type=int, default=15, help="rounds of inference and adapter cases")
    p.add_argument("--no-rss", action="store_true", help="skip the per-case peak-RSS subprocesses")
    p.add_argument(
        "--cases",
        choices=("all", "classic", "step"),
        default="all",
        help="all: every case, 'lorakit fast' included; classic: without it; step: only the training steps of "
        "lorakit p=0, 'lorakit fast' and the frozen bound (minutes, no memory or adapter sections)",
    )
    p.add_argument("--quick", action="store_true", help="a tiny model and few rounds (for tests)")
    p.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    p.add_argument("--rss-case", help=argparse.SUPPRESS)  # internal: one case's peak RSS, in a fresh process
    a = p.parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)
    if a.quick:
        a.hidden, a.intermediate, a.layers, a.heads, a.vocab, a.batch, a.seq = 32, 64, 2, 2, 128, 2, 16
        a.rounds, a.fast_rounds, a.no_rss = 3, 3, True
    return a


def build_base(a: argparse.Namespace) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=a.hidden,
        intermediate_size=a.intermediate,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.heads,
        vocab_size=a.vocab,
        max_position_embeddings=max(2048, a.seq),
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(a.device)


def build_lorakit(a, base, dropout: float):
    import lorakit as lk

    model = lk.apply_lora(copy.deepcopy(base), lk.LoraConfig(rank=a.rank, alpha=2.0 * a.rank, dropout=dropout), TARGETS)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B = 0 at init; give it values so outputs and gradients really flow through it
        for layer in lk.lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.02)
    return model


def build_peft(a, base, lorakit_model, dropout: float):
    """PEFT on a copy of the same base, with lorakit_model's A and B copied in."""
    import peft

    import lorakit as lk

    cfg = peft.LoraConfig(r=a.rank, lora_alpha=2 * a.rank, lora_dropout=dropout, target_modules=TARGETS)
    model = peft.get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():
        for name, layer in lk.lora_layers(lorakit_model).items():
            pl = model.base_model.model.get_submodule(name)
            pl.lora_A["default"].weight.copy_(layer.lora_A)
            pl.lora_B["default"].weight.copy_(layer.lora_B)
    return model


def frozen(model):
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class TrainCase:
    """One training step: forward with embeddings that require grad, backward, AdamW on what trains.

    Every case steps the optimizer lorakit's trainer builds (`lorakit.train.schedule.adamw`: torch's fused
    AdamW), PEFT and full fine-tuning included, so the cases differ only by the model.
    """

    def __init__(self, model, embed, ids, labels, use_ids: bool = False):
        from lorakit.train.schedule import adamw

        self.model, self.embed, self.ids, self.labels, self.use_ids = model.train(), embed, ids, labels, use_ids
        params = [p for p in model.parameters() if p.requires_grad]
        self.opt = adamw([{"params": params}], 1e-4, (0.9, 0.999), 0.01) if params else None

    def forward(self):
        if self.use_ids:
            return self.model(input_ids=self.ids, labels=self.labels).loss
        x = self.embed(self.ids).detach().requires_grad_(True)  # (B, T, d): the graph starts at layer 0
        return self.model(inputs_embeds=x, labels=self.labels).loss

    def __call__(self):
        self.forward().backward()
        if self.opt is not None:
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)


class FastCase(TrainCase):
    """'lorakit fast': the LoRA model with fused frozen blocks, compiled blocks and the chunked loss (never the
    full logits): the decoder's hidden states and the lm_head weight go to chunked_cross_entropy, shifted as
    transformers' loss shifts them."""

    def forward(self):
        from lorakit.train.chunked_ce import chunked_cross_entropy

        x = self.embed(self.ids).detach().requires_grad_(True)
        hidden = self.model.get_decoder()(inputs_embeds=x).last_hidden_state[:, :-1]
        labels = self.labels[:, 1:]
        head = self.model.get_output_embeddings()
        return chunked_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), head.weight, labels.reshape(-1))


def fast_case(a, base, embed, ids, labels) -> FastCase:
    """The fast path's case (lorakit.hf.fuse, lorakit.train.compile, lorakit.train.chunked_ce: imported here
    so the other cases run without them); its compile facts land in a.fast_info."""
    from lorakit.hf.fuse import fuse_frozen_blocks
    from lorakit.train.compile import compile_blocks

    model = build_lorakit(a, base, 0.0)
    fused = fuse_frozen_blocks(model)
    compiled = compile_blocks(model)
    a.fast_info = {"fused": len(fused), "compiled": compiled}  # compile_s/recompiles read after the run
    return FastCase(model, embed, ids, labels)


def train_cases(a, base):
    """{name: TrainCase} for both dropouts; the frozen bound and full fine-tuning once; 'lorakit fast' unless
    --cases classic; only lorakit p=0, 'lorakit fast' and the frozen bound with --cases step."""
    ids, labels = inputs(a)
    embed = base.get_input_embeddings()
    if getattr(a, "cases", "classic") == "step":
        fast = fast_case(a, base, embed, ids, labels)
        cases = {"lorakit p=0": TrainCase(build_lorakit(a, base, 0.0), embed, ids, labels), "lorakit fast": fast}
        return {**cases, "frozen bound": TrainCase(frozen(copy.deepcopy(base)), embed, ids, labels)}
    cases = {}
    for p in (0.0, a.dropout):
        lkm = build_lorakit(a, base, p)
        cases[f"lorakit p={p:g}"] = TrainCase(lkm, embed, ids, labels)
        cases[f"PEFT p={p:g}"] = TrainCase(build_peft(a, base, lkm, p), embed, ids, labels)
    cases["frozen bound"] = TrainCase(frozen(copy.deepcopy(base)), embed, ids, labels)
    full = copy.deepcopy(base)
    for prm in full.parameters():
        prm.requires_grad_(True)
    cases["full fine-tuning"] = TrainCase(full, embed, ids, labels, use_ids=True)
    if getattr(a, "cases", "classic") == "all":
        cases["lorakit fast"] = fast_case(a, base, embed, ids, labels)
    return cases


# -- measurements -------------------------------------------------------------------------------------


def saved_bytes(case: TrainCase) -> int:
    """Bytes of distinct storages saved for backward by one forward (parameters excluded)."""
    skip = {p.untyped_storage().data_ptr() for p in case.model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = case.forward()
    del loss
    return sum(seen.values())


def rss_case(a, name: str) -> dict:
    """In a fresh process: RSS before a training step and the peak over two steps (bytes)."""
    base = build_base(a)
    cases = {k: v for k, v in train_cases(a, base).items() if k == name}
    return rss_step(cases[name], a.device)


def rss_step(case, device: str) -> dict:
    """Resident memory before `case` and its peak over two calls (bytes; on CUDA, allocated memory instead)."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        case(), case()
        return {"before": before, "peak": torch.cuda.max_memory_allocated()}
    before = _rss("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM so the build's peak does not count
        peak_key = "VmHWM"
    except OSError:
        peak_key = None
    case(), case()
    peak = _rss(peak_key) if peak_key else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"before": before, "peak": peak}


def _rss(key: str) -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(key + ":"))
    return int(line.split()[1]) * 1024


def peak_rss(a, names: list[str]) -> dict[str, dict]:
    flags = [
        f"--hidden={a.hidden}",
        f"--intermediate={a.intermediate}",
        f"--layers={a.layers}",
        f"--heads={a.heads}",
        f"--vocab={a.vocab}",
        f"--rank={a.rank}",
        f"--batch={a.batch}",
        f"--seq={a.seq}",
        f"--dropout={a.dropout}",
        f"--threads={a.threads}",
        f"--device={a.device}",
        f"--cases={a.cases}",
    ]
    out = {}
    for n in names:
        r = subprocess.run([sys.executable, __file__, *flags, "--rss-case", n], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"peak-RSS subprocess for {n!r} failed:\n{r.stderr[-2000:]}")
        out[n] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


def log(*m: object) -> None:
    """Progress on stderr (stdout carries --rss-case's JSON)."""
    print(*m, file=sys.stderr, flush=True)


def peft_diff(a, cases) -> float:
    """Max |logits| difference of lorakit p=0 and PEFT p=0 before any step (AdamW amplifies rounding later)."""
    ids, _ = inputs(a)
    with torch.no_grad():
        lkm, pm = cases["lorakit p=0"].model.eval(), cases["PEFT p=0"].model.eval()
        diff0 = (lkm(input_ids=ids).logits - pm(input_ids=ids).logits).abs().max().item()
        lkm.train(), pm.train()
    return diff0


def main(argv: list[str] | None = None) -> Path | None:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.rss_case:
        print(json.dumps(rss_case(a, a.rss_case)))
        return None
    t0 = time.perf_counter()
    a.load_start = os.getloadavg()[0]
    base = build_base(a)
    cases = train_cases(a, base)
    p = f"{a.dropout:g}"

    diff0 = peft_diff(a, cases) if a.cases != "step" else 0.0
    log(f"training steps: {a.rounds} rounds of {len(cases)} cases")
    train = harness.interleaved(cases, a.rounds, 1, a.device)  # the warm-up round holds the fast case's compile
    if a.cases == "step":
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(step_report(a, train, time.perf_counter() - t0))
        log(f"wrote {a.out} in {time.perf_counter() - t0:.0f} s")
        return a.out

    prof = {n: profile_delta(cases, n, "frozen bound") for n in ("lorakit p=0", f"lorakit p={p}")}

    log("bytes saved for backward")
    saved = {n: saved_bytes(c) for n, c in cases.items()}
    rss = None if a.no_rss else peak_rss(a, list(cases))

    log("inference")
    lk0, pf0 = cases["lorakit p=0"].model, cases["PEFT p=0"].model
    inf_cases, diffs = inference_cases(a, base, lk0, pf0)
    diffs = {"lorakit vs PEFT (same factors, before training)": diff0, **diffs}
    inf = harness.interleaved(inf_cases, a.fast_rounds, 1, a.device)

    log("adapter operations")
    with tempfile.TemporaryDirectory() as tmp:
        ops = adapter_ops(a, base, lk0, pf0, Path(tmp))

    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(report(a, train, saved, rss, inf, ops, diffs, prof, time.perf_counter() - t0))
    log(f"wrote {a.out} in {time.perf_counter() - t0:.0f} s")
    return a.out


if __name__ == "__main__":
    main()
