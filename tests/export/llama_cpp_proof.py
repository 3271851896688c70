"""The proof through llama.cpp itself (llama-cpp-python), for when the CI installs it: not collected by pytest.

Writes a tiny byte-level-BPE Llama as GGUF (f32), an rsLoRA + alpha/rank_pattern adapter as llama.cpp's LoRA
GGUF, and compares llama.cpp's logits (base; base + adapter via `lora_path`; the merged model) with
transformers + lorakit's. Run: `PYTHONPATH=src python tests/export/llama_cpp_proof.py` (prints max |Δlogit|).
"""

import copy
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import lorakit as lk
from lorakit.export.gguf_adapter import write_gguf_adapter
from lorakit.export.gguf_model import write_gguf_model

sys.path.insert(0, str(Path(__file__).parent))
from test_gguf_model import save_bpe_llama  # noqa: E402

TOL = 1e-5  # f32 weights and KV cache: llama.cpp's CPU kernels against torch's (measured ~1.5e-7)


def llama_cpp_logits(model_path, ids, lora_path=None):
    from llama_cpp import Llama  # installed by the CI step that runs this proof, not a lorakit dependency

    # type_k/type_v 0 = GGML_TYPE_F32: llama.cpp's default f16 KV cache alone costs ~1e-4 on these logits
    llm = Llama(model_path=str(model_path), lora_path=str(lora_path) if lora_path else None, logits_all=True,
                n_ctx=64, n_batch=64, n_threads=2, verbose=False, type_k=0, type_v=0)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float64)


def main():
    from transformers import AutoModelForCausalLM

    tmp = Path(tempfile.mkdtemp())
    base_dir = save_bpe_llama(tmp / "base")
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    cfg = lk.LoraConfig(rank=4, alpha=8, use_rslora=True, rank_pattern={"layers.1.self_attn.q_proj": 6},
                        alpha_pattern={"v_proj": 3})
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj", "embed_tokens", "lm_head"]
    model = lk.apply_lora(copy.deepcopy(base), cfg, targets)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    lk.save_adapters(model, tmp / "adapter")
    merged = lk.merge(copy.deepcopy(model))
    merged.save_pretrained(tmp / "merged")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp / "merged" / f).write_bytes((base_dir / f).read_bytes())
    write_gguf_model(base_dir, tmp / "base.gguf", dtype="f32")
    write_gguf_model(tmp / "merged", tmp / "merged.gguf", dtype="f32")
    write_gguf_adapter(tmp / "adapter", base_dir, tmp / "adapter.gguf")
    ids = list(range(3, 19))
    with torch.no_grad():
        want_base = base(torch.tensor([ids])).logits[0].double().numpy()
        want_lora = model(torch.tensor([ids])).logits[0].double().numpy()
    worst = 0.0
    for what, got, want in (
        ("base", llama_cpp_logits(tmp / "base.gguf", ids), want_base),
        ("base + adapter.gguf", llama_cpp_logits(tmp / "base.gguf", ids, tmp / "adapter.gguf"), want_lora),
        ("merged", llama_cpp_logits(tmp / "merged.gguf", ids), want_lora),
    ):
        d = float(np.abs(got - want).max())
        agree = float((got.argmax(-1) == want.argmax(-1)).mean())
        print(f"{what}: max |dlogit| {d:.2e}, argmax agreement {agree:.0%}")
        worst = max(worst, d)
    print(f"adapter effect: max |dlogit| {float(np.abs(want_lora - want_base).max()):.2e}")
    sys.exit(0 if worst <= TOL else 1)


if __name__ == "__main__":
    main()
