"""`lorakit export` in every format and dtype, with its proof: writes benchmarks/RESULTS-export.md.

    python benchmarks/export.py                          # a Llama of the benchmark's size (about 2 minutes)
    python benchmarks/export.py --quick --out /tmp/e.md  # a tiny one, seconds (the test uses this)

The model is a Llama-style causal LM (hidden 512, intermediate 1376, 4 layers, 8 heads, 4 key/value heads; the
quick one hidden 32, 2 layers) with a byte-level BPE vocabulary trained on the text below, saved as a transformers
directory; the adapter is rsLoRA rank 8 (rank 12 on one layer's q_proj, alpha 3 on v_proj) on every projection,
the embeddings and the untied head, with random factors of std 0.02: every scale llama.cpp's one global alpha
would get wrong. Each row is one export through the library (what `lorakit export` runs), its proof as the proof
reports it (the largest |Δlogit| over every position against lorakit's unmerged model, the stated tolerance,
argmax and greedy-token agreement), the artefact's size and the export's wall time (one run each: the time is
indicative, the proof figures are exact for this machine's kernels).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import lorakit as lk  # noqa: E402
from lorakit.export import gguf, onnx, prepare  # noqa: E402

HERE = Path(__file__).resolve().parent
TEXT = [
    "Edge devices run small language models close to their users.",
    "A low-rank adapter changes a few matrices beside each layer and leaves the base as it was.",
    "The exported file must compute what the trained model computed, token for token.",
    "Quantised weights trade a little accuracy for a smaller file and faster loads.",
    "llama.cpp reads GGUF files; ONNX Runtime reads ONNX graphs.",
] * 4
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head"]


def build(root: Path, quick: bool) -> tuple[Path, Path]:
    """(model dir, adapter dir): the Llama with its byte-level BPE tokenizer, and the rsLoRA adapter."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(TEXT, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    size = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    if not quick:
        size = dict(
            hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4
        )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(fast), max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0, **size
    )
    model_dir, adapter_dir = root / "model", root / "adapter"
    base = LlamaForCausalLM(config)
    base.save_pretrained(model_dir)
    fast.save_pretrained(model_dir)
    lora = lk.LoraConfig(
        rank=8, alpha=16, use_rslora=True, rank_pattern={"layers.1.self_attn.q_proj": 12}, alpha_pattern={"v_proj": 3}
    )
    model = lk.apply_lora(base, lora, TARGETS)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    lk.save_adapters(model, adapter_dir)
    return model_dir, adapter_dir


def main(argv: list[str] | None = None) -> Path:
    """Run every export, write the report, return its path."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny model (seconds)")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS-export.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir, adapter_dir = build(root, args.quick)
        cases = [("onnx", d) for d in onnx.DTYPES]
        cases += [(f, d) for f in ("gguf", "gguf-adapter") for d in ("f32", "f16", "bf16", "q8_0")]
        for i, (fmt, dtype) in enumerate(cases):
            out = root / f"out{i}"
            start = time.perf_counter()
            model, tok, task = prepare.load_unmerged(model_dir, [adapter_dir])
            if fmt == "onnx":
                done = onnx.export_loaded(model, tok, task, out, dtype=dtype)
            else:
                adapter_only = fmt == "gguf-adapter"
                done = gguf.export_gguf(
                    model, tok, task, model_dir, [adapter_dir], out, dtype=dtype, adapter_only=adapter_only
                )
            seconds = time.perf_counter() - start
            size = sum(f.stat().st_size for f in out.iterdir() if f.name != "proof.json" and f.suffix != ".json")
            for p in done.proofs:
                greedy = f"{p.greedy_agree}/{p.greedy_tokens}" if p.greedy_tokens is not None else "—"
                rows.append(
                    [
                        fmt,
                        dtype,
                        p.what or "merged",
                        f"{p.max_abs_diff:.2g}",
                        f"{p.tolerance:.2g}",
                        f"{p.argmax_agree}/{p.positions}",
                        greedy,
                        "passed" if p.passed else "FAILED",
                        harness.fmt_bytes(size),
                        f"{seconds:.1f} s",
                    ]
                )
            print(rows[-1], flush=True)
    header = ["format", "dtype", "run", "max abs dlogit", "tolerance", "argmax", "greedy", "proof", "files", "time"]
    model = "tiny Llama (hidden 32, 2 layers)" if args.quick else "Llama hidden 512, 4 layers, 8/4 heads"
    text = (
        "# `lorakit export`: every format and dtype, proven in its runtime\n\n"
        f"`python benchmarks/export.py{' --quick' if args.quick else ''}` on {harness.machine('cpu', 2)}.\n"
        f"Model: {model}, byte-level BPE vocabulary; adapter: rsLoRA r8 with rank/alpha patterns on every "
        "projection, the embeddings and the head. `files`: everything the export wrote but the proof (a "
        "gguf-adapter export holds the base GGUF too). The proof's figures are computed over every position of "
        "the proof texts (4 sentences and one of the special tokens); greedy = tokens a greedy continuation chose as "
        "lorakit did.\n\n" + harness.table(header, rows) + "\n"
    )
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}")
    return args.out


if __name__ == "__main__":
    main()
