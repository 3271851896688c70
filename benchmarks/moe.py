"""LoRA on mixture-of-experts weights: lorakit vs PEFT `target_parameters` vs the frozen bound, in one run.

    .venv/bin/python benchmarks/moe.py                      # writes benchmarks/RESULTS-moe.md (minutes on 1 thread)
    .venv/bin/python benchmarks/moe.py --quick --out /tmp/r.md   # a tiny model, seconds (the test uses this)
    .venv/bin/python benchmarks/moe.py --profile lorakit     # torch.profiler's table of one lorakit step

Model: a Qwen3-MoE (transformers `Qwen3MoeForCausalLM` from a config, random weights, seeded, fp32): 8 experts,
top-2, hidden 512, 4 layers. LoRA r=8 (alpha 16, dropout 0: PEFT refuses dropout on expert parameters) on the
attention projections (q/k/v/o, modules) and on every expert weight (gate_up_proj and down_proj, parameters).
lorakit and PEFT get the same base weights, the same A/B and the same inputs; every case runs once per round,
rounds interleave and rotate, ratios are medians of same-round ratios (benchmarks/harness.py).

The frozen bound is run.py's: the same model with every weight frozen, the token embeddings an input that requires
grad, so its backward covers the same activations as the LoRA steps and they differ only by the LoRA branches.
Peak memory is each case's peak resident set size (VmHWM, reset after the model is built) over two training steps,
each case in a fresh process of its own (`--rss-case`), so one case's allocations cannot count for another.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from moe_report import report  # noqa: E402
from run import TrainCase, frozen, rss_step  # noqa: E402
from run_ops import profile_delta  # noqa: E402

from lorakit.variants.quant import quantize_base  # noqa: E402
from lorakit.variants.quant_experts import expert_layers  # noqa: E402

HERE = Path(__file__).resolve().parent
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
TRAIN = ("frozen bound", "PEFT", "lorakit", "lorakit NF4")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--moe-intermediate", type=int, default=512)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: the issue's numbers)")
    p.add_argument("--rounds", type=int, default=9, help="interleaved rounds of the training cases")
    p.add_argument("--cases", default=",".join(TRAIN), help="comma-separated training cases to run")
    p.add_argument("--no-rss", action="store_true", help="skip the per-case peak-RSS subprocesses")
    p.add_argument("--quick", action="store_true", help="a tiny model and few rounds (for tests)")
    p.add_argument("--profile", metavar="CASE", help="print torch.profiler's table of CASE's step and exit")
    p.add_argument("--out", type=Path, default=HERE / "RESULTS-moe.md")
    p.add_argument("--rss-case", help=argparse.SUPPRESS)  # internal: one case's peak RSS, in a fresh process
    a = p.parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)
    a.cases = [c.strip() for c in a.cases.split(",") if c.strip()]
    unknown = [c for c in a.cases if c not in TRAIN]
    if unknown:
        p.error(f"--cases: unknown {unknown}; expected some of {list(TRAIN)}")
    if a.quick:
        a.hidden, a.moe_intermediate, a.experts, a.layers, a.heads, a.vocab = 64, 32, 4, 2, 4, 256
        a.batch, a.seq, a.rounds = 2, 16, 3
    return a


def build_base(a: argparse.Namespace) -> torch.nn.Module:
    """The Qwen3-MoE of the benchmark: random weights (seed 0), fp32, transformers' default experts kernel."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(
        hidden_size=a.hidden,
        intermediate_size=4 * a.moe_intermediate,  # unused: every layer is sparse (no dense MLP layers)
        moe_intermediate_size=a.moe_intermediate,
        num_experts=a.experts,
        num_experts_per_tok=a.top_k,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.heads,
        head_dim=a.hidden // a.heads,
        vocab_size=a.vocab,
        max_position_embeddings=max(2048, a.seq),
        tie_word_embeddings=False,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    )
    torch.manual_seed(0)
    return Qwen3MoeForCausalLM(cfg).float()


def inputs(a: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, a.vocab, (a.batch, a.seq), generator=g)
    return ids, ids.clone()  # labels: HF shifts them inside the loss


def build_lorakit(a: argparse.Namespace, base: torch.nn.Module) -> torch.nn.Module:
    """lorakit on a copy of `base`: LoRA on the attention modules and the expert parameters, B random (not 0)."""
    import lorakit as lk

    cfg = lk.LoraConfig(rank=a.rank, alpha=2.0 * a.rank)
    model = lk.apply_lora(copy.deepcopy(base), cfg, ATTENTION, target_parameters=EXPERTS)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B = 0 at init; give it values so outputs and gradients really flow through it
        for layer in lk.lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.02)
    return model


def _owner_key(name: str, suffix: str, param: str | None) -> tuple[str, str | None]:
    """A nested parameter wrapper's (owner module path, parameter name): the path without the nesting suffixes."""
    while name.endswith(suffix):
        name = name[: -len(suffix)]
    return name, param


def peft_factors(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """lorakit's factors in PEFT's (>= 0.19) tensors: 3-D A (E, r, in) -> (E*r, in) (row e*r+j is A_e[j]);
    B (E, out, r) -> (out, r*E) (column j*E+e is B_e[:, j]); 2-D factors as they are."""
    if A.dim() == 2:
        return A, B
    experts, out, r = B.shape
    return A.reshape(experts * r, A.shape[-1]), B.permute(1, 2, 0).reshape(out, r * experts)


def build_peft(a: argparse.Namespace, base: torch.nn.Module, lorakit_model: torch.nn.Module | None):
    """PEFT on a copy of `base` with the same targets; lorakit_model's A and B copied in where it is given."""
    import peft

    import lorakit as lk

    cfg = peft.LoraConfig(r=a.rank, lora_alpha=2 * a.rank, target_modules=ATTENTION, target_parameters=EXPERTS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(copy.deepcopy(base), cfg)
    inner = model.base_model.model
    theirs = {
        _owner_key(n, ".base_layer", getattr(m, "parameter_name", None)): m
        for n, m in inner.named_modules()
        if isinstance(m, peft.tuners.lora.LoraLayer)
    }
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        if lorakit_model is None:  # no lorakit arm in this run: random B of the same scale
            for m in theirs.values():
                w = m.lora_B["default"].weight
                w.copy_(torch.randn(w.shape, generator=gen) * 0.02)
            return model
        ours = lk.lora_layers(lorakit_model)
        if len(ours) != len(theirs):
            raise RuntimeError(f"lorakit adapted {len(ours)} modules/parameters, PEFT {len(theirs)}")
        for name, layer in ours.items():
            pm = theirs[_owner_key(name, ".base", getattr(layer, "param_name", None))]
            A, B = peft_factors(layer.lora_A, layer.lora_B)
            pm.lora_A["default"].weight.copy_(A)
            pm.lora_B["default"].weight.copy_(B)
    return model


def train_cases(a: argparse.Namespace, base: torch.nn.Module, names: list[str]) -> dict[str, TrainCase]:
    """{name: TrainCase} for the cases `names` (each over its own copy of `base`, embeddings requiring grad)."""
    ids, labels = inputs(a)
    embed = base.get_input_embeddings()
    cases: dict[str, TrainCase] = {}
    lkm = build_lorakit(a, base) if "lorakit" in names else None
    if "frozen bound" in names:
        cases["frozen bound"] = TrainCase(frozen(copy.deepcopy(base)), embed, ids, labels)
    if "PEFT" in names:
        cases["PEFT"] = TrainCase(build_peft(a, base, lkm), embed, ids, labels)
    if lkm is not None:
        cases["lorakit"] = TrainCase(lkm, embed, ids, labels)
    if "lorakit NF4" in names:  # QLoRA: the same LoRA over NF4 expert and attention weights
        qlora = quantize_base(copy.deepcopy(lkm) if lkm is not None else build_lorakit(a, base), "nf4")
        cases["lorakit NF4"] = TrainCase(qlora, embed, ids, labels)
    return cases


def expert_bytes(cases: dict[str, TrainCase]) -> tuple[int, int] | None:
    """Bytes of the adapted expert weights in fp32 and as NF4 (None without the NF4 case)."""
    if "lorakit NF4" not in cases:
        return None
    layers = expert_layers(cases["lorakit NF4"].model).values()
    fp32 = sum(math.prod(layer.param.shape) * 4 for layer in layers)
    return fp32, sum(layer.quantized.weight_bytes() for layer in layers if layer.quantized is not None)


def agreement(cases: dict[str, TrainCase], a: argparse.Namespace) -> float | None:
    """Largest |logit difference| between lorakit and PEFT with the same factors, before any step (None: one
    of them is not in this run)."""
    if not {"lorakit", "PEFT"} <= cases.keys():
        return None
    ids, _ = inputs(a)
    lkm, pm = cases["lorakit"].model.eval(), cases["PEFT"].model.eval()
    with torch.no_grad():
        diff = (lkm(input_ids=ids).logits - pm(input_ids=ids).logits).abs().max().item()
    lkm.train(), pm.train()
    return diff


def rss_case(a: argparse.Namespace, name: str) -> dict:
    """In a fresh process: RSS before a training step and the peak over two steps (bytes)."""
    case = train_cases(a, build_base(a), [name])[name]
    return rss_step(case, "cpu")


def peak_rss(a: argparse.Namespace, names: list[str]) -> dict[str, dict]:
    """Each case's peak RSS from its own subprocess (this script with --rss-case)."""
    sizes = ("hidden", "moe_intermediate", "experts", "top_k", "layers", "heads", "vocab", "rank", "batch", "seq")
    keep = [f"--{k.replace('_', '-')}={getattr(a, k)}" for k in (*sizes, "threads")]
    out = {}
    for n in names:
        r = subprocess.run([sys.executable, __file__, *keep, "--rss-case", n], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"peak-RSS subprocess for {n!r} failed:\n{r.stderr[-2000:]}")
        out[n] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


def parameter_counts(cases: dict[str, TrainCase]) -> dict[str, int]:
    """Trainable parameters of each case (the LoRA factors; 0 for the frozen bound)."""
    return {n: sum(p.numel() for p in c.model.parameters() if p.requires_grad) for n, c in cases.items()}


def log(*m: object) -> None:
    """Progress on stderr (stdout carries --rss-case's JSON)."""
    print(*m, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> Path | None:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.rss_case:
        print(json.dumps(rss_case(a, a.rss_case)))
        return None
    base = build_base(a)
    if a.profile:
        cases = train_cases(a, base, [a.profile, "frozen bound"])
        for op, mine, ref in profile_delta(cases, a.profile, "frozen bound", top=20):
            print(f"{op:60s} {mine:10.1f} {ref:10.1f} {mine - ref:+10.1f}")
        return None
    t0, a.load_start = time.perf_counter(), os.getloadavg()[0]
    cases = train_cases(a, base, a.cases)
    diff = agreement(cases, a)
    log(f"training steps: {a.rounds} rounds of {len(cases)} cases")
    train = harness.interleaved(cases, a.rounds, 1, "cpu")
    prof = profile_delta(cases, "lorakit", "frozen bound") if {"lorakit", "frozen bound"} <= cases.keys() else None
    counts = parameter_counts(cases)
    rss = None if a.no_rss else peak_rss(a, list(cases))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    sizes = expert_bytes(cases)
    a.out.write_text(report(a, base, train, rss, counts, diff, prof, sizes, time.perf_counter() - t0))
    log(f"wrote {a.out} in {time.perf_counter() - t0:.0f} s")
    return a.out


if __name__ == "__main__":
    main()
