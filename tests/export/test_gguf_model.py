"""The merged-model GGUF: read back with gguf's reader, every tensor against the transformers checkpoint."""

import copy
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import lorakit as lk
from lorakit.export.gguf_adapter import GgufExportError
from lorakit.export.gguf_model import write_gguf_model

sys.path.insert(0, str(Path(__file__).parent.parent))
from _hf_models import save_tiny  # noqa: E402

pytestmark = pytest.mark.slow  # subprocesses, servers or export runtimes: not in the fast set

PER_LAYER = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


SENTENCES = [
    "the cat sat on the mat",
    "a dog ran in the park",
    "lorakit exports models to llama.cpp",
    "small models run on small devices",
    "héllo wörld ✓",
]


def bpe_tokenizer():
    """A byte-level BPE tokenizer trained on SENTENCES (<pad>, <s>, </s> = 0, 1, 2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        SENTENCES,
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<pad>", "<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def save_bpe_llama(directory, tie=False):
    """A tiny random Llama (hidden 32, 4/2 heads, 2 layers) with a byte-level BPE tokenizer, saved to `directory`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    fast = bpe_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=tie,
    )
    LlamaForCausalLM(cfg).save_pretrained(directory)
    fast.save_pretrained(directory)
    return Path(directory)


def permute(w, n_head):
    """convert_hf_to_gguf.py's LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def expected_tensors(model):
    """{GGUF name: numpy array} that llama.cpp's converter would write for the tiny Llama (4 heads, 2 kv heads)."""
    sd = {k: v.detach().double().numpy() for k, v in model.state_dict().items()}
    out = {
        "token_embd.weight": sd["model.embed_tokens.weight"],
        "output_norm.weight": sd["model.norm.weight"],
        "output.weight": sd["lm_head.weight"],
    }
    for i in range(2):
        for hf, gg in PER_LAYER.items():
            w = sd[f"model.layers.{i}.{hf}.weight"]
            w = permute(w, 4) if hf.endswith("q_proj") else permute(w, 2) if hf.endswith("k_proj") else w
            out[f"blk.{i}.{gg}.weight"] = w
    return out


def read(path):
    reader = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {
        t.name: (np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float64), t.tensor_type.name)
        for t in reader.tensors
    }
    return meta, tensors


def test_merged_model_gguf_holds_every_weight_in_llama_cpp_order(tmp_path):
    from transformers import AutoModelForCausalLM

    base = save_bpe_llama(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(base)
    lora = lk.apply_lora(copy.deepcopy(model), lk.LoraConfig(rank=2, alpha=4, use_rslora=True), ["q_proj", "k_proj"])
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.1)
    merged = lk.merge(lora)
    merged.save_pretrained(tmp_path / "merged")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "merged" / f).write_bytes((base / f).read_bytes())
    write_gguf_model(tmp_path / "merged", tmp_path / "m.gguf", dtype="f32")
    meta, tensors = read(tmp_path / "m.gguf")
    assert meta["general.architecture"] == "llama"
    assert meta["llama.block_count"] == 2 and meta["llama.attention.head_count_kv"] == 2
    assert meta["llama.embedding_length"] == 32 and meta["llama.rope.dimension_count"] == 8
    assert meta["tokenizer.ggml.model"] == "gpt2"
    assert len(meta["tokenizer.ggml.tokens"]) == merged.config.vocab_size
    assert meta["tokenizer.ggml.bos_token_id"] == 1 and meta["tokenizer.ggml.eos_token_id"] == 2
    assert len(meta["tokenizer.ggml.merges"]) > 0
    want = expected_tensors(merged)
    assert sorted(tensors) == sorted(want)
    for name, w in want.items():
        np.testing.assert_array_equal(tensors[name][0], w, err_msg=name)
        assert tensors[name][1] == "F32"


@pytest.mark.parametrize("dtype,two_d", [("f16", "F16"), ("bf16", "BF16"), ("q8_0", "Q8_0")])
def test_dtypes_keep_norms_f32(dtype, two_d, tmp_path):
    base = save_bpe_llama(tmp_path / "base")
    write_gguf_model(base, tmp_path / "m.gguf", dtype=dtype)
    _, tensors = read(tmp_path / "m.gguf")
    assert {t for n, (a, t) in tensors.items() if a.ndim == 1} == {"F32"}
    assert {t for n, (a, t) in tensors.items() if a.ndim == 2} == {two_d}


def test_tied_head_writes_no_output_tensor(tmp_path):
    write_gguf_model(save_bpe_llama(tmp_path / "tied", tie=True), tmp_path / "m.gguf", dtype="f32")
    _, tensors = read(tmp_path / "m.gguf")
    assert "output.weight" not in tensors and "token_embd.weight" in tensors


def test_word_level_tokenizer_refused(tmp_path):
    base = save_tiny("llama", tmp_path / "base")
    with pytest.raises(GgufExportError, match="WordLevel tokenizer.*byte-level BPE"):
        write_gguf_model(base, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_scaled_rope_refused_and_nothing_written(tmp_path):
    base = save_bpe_llama(tmp_path / "base")
    cfg = (base / "config.json").read_text()
    (base / "config.json").write_text(cfg.replace('"rope_type": "default"', '"rope_type": "linear", "factor": 2.0'))
    with pytest.raises(GgufExportError, match="rope_type 'linear'"):
        write_gguf_model(base, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()
