"""What export refuses, and what it no longer refuses, before any file is written.

- a Mistral base whose `sliding_window` is shorter than its context: llama.cpp's llama graph has no window, so it
  would compute another model past it (a short proof would pass). Refused, naming `sliding_window`.
- a PEFT adapter with LoRA on the embeddings, saved with PEFT's defaults (`save_embedding_layers="auto"` writes the
  unchanged base embedding table beside A and B): accepted by gguf-adapter and proven in llama.cpp when the copy
  equals the base; refused when it differs (a full weight an adapter GGUF cannot hold).
- an adapter put on a base of another architecture: the message names the base its lorakit.json records.
"""

import json
import sys
import warnings
from pathlib import Path

import llama_cpp  # noqa: F401  (the export extra: a missing runtime fails here, never skips)
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import lorakit as lk
from lorakit.cli import main

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))
import _hf_models  # noqa: E402
from test_gguf_model import save_bpe_llama  # noqa: E402

pytestmark = pytest.mark.slow  # subprocesses, servers or export runtimes: not in the fast set


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_bpe_llama(tmp_path_factory.mktemp("checks") / "base")


def _export(capsys, *args):
    code = main(["export", *map(str, args)])
    printed = capsys.readouterr()
    return code, printed.out, printed.err


def test_a_sliding_window_shorter_than_the_context_is_refused_naming_it(base, tmp_path, capsys):
    from transformers import MistralConfig, MistralForCausalLM

    config = json.loads((base / "config.json").read_text())
    mistral = tmp_path / "mistral"
    torch.manual_seed(0)
    MistralForCausalLM(
        MistralConfig(
            vocab_size=config["vocab_size"],
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            sliding_window=16,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
    ).save_pretrained(mistral)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (mistral / f).write_bytes((base / f).read_bytes())
    model = lk.apply_lora(AutoModelForCausalLM.from_pretrained(mistral), lk.LoraConfig(rank=2), ["q_proj"])
    lk.save_adapters(model, tmp_path / "adapter")
    for fmt in ("gguf", "gguf-adapter"):
        code, _, err = _export(
            capsys, "--model", mistral, "--adapter", tmp_path / "adapter", "--format", fmt, "--out", tmp_path / fmt
        )
        assert code == 2 and "sliding_window=16" in err and "128" in err, err
        assert not (tmp_path / fmt).exists()


def _peft_embedding_adapter(base, out):
    """LoRA on embed_tokens and q_proj, saved by PEFT with its defaults (the embedding table copied whole)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(r=2, lora_alpha=4, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Setting save_embedding_layers to True": the default under test
        model.save_pretrained(out)
    assert any(k.endswith("embed_tokens.base_layer.weight") for k in load_file(out / "adapter_model.safetensors"))
    return out


def test_a_peft_embedding_adapter_with_an_unchanged_base_copy_is_exported_and_proven(base, tmp_path, capsys):
    adapter = _peft_embedding_adapter(base, tmp_path / "peft")
    code, out, err = _export(
        capsys,
        "--model",
        base,
        "--adapter",
        adapter,
        "--format",
        "gguf-adapter",
        "--dtype",
        "f32",
        "--out",
        tmp_path / "out",
    )
    assert code == 0, out + err
    proofs = json.loads((tmp_path / "out" / "proof.json").read_text())["proofs"]
    assert [p["passed"] for p in proofs] == [True, True] and proofs[1]["adapter_effect"] > 1e-2


def test_a_peft_embedding_adapter_whose_base_copy_differs_is_refused(base, tmp_path, capsys):
    adapter = _peft_embedding_adapter(base, tmp_path / "peft")
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in tensors if k.endswith("embed_tokens.base_layer.weight"))
    tensors[key] = tensors[key].clone()
    tensors[key][5, 0] += 0.5  # one trained row: a full weight now
    save_file(tensors, weights)
    code, _, err = _export(
        capsys, "--model", base, "--adapter", adapter, "--format", "gguf-adapter", "--out", tmp_path / "out"
    )
    assert code == 2 and key in err and "differs" in err and "--format gguf" in err, err
    assert not (tmp_path / "out").exists()


def test_an_adapter_exported_onto_another_architecture_names_the_base_it_belongs_to(base, tmp_path, capsys):
    gpt2 = _hf_models.save_tiny("gpt2", tmp_path / "gpt2")
    model = lk.apply_lora(AutoModelForCausalLM.from_pretrained(gpt2), lk.LoraConfig(rank=2), ["c_attn"])
    lk.save_adapters(model, tmp_path / "adapter")
    for fmt in ("onnx", "gguf", "gguf-adapter"):
        code, _, err = _export(
            capsys, "--model", base, "--adapter", tmp_path / "adapter", "--format", fmt, "--out", tmp_path / fmt
        )
        assert code == 2, err
        assert (
            "saved for a GPT2LMHeadModel base" in err
            and "adapter" in err
            and str(gpt2) in err
            and "LlamaForCausalLM" in err
        ), err
        assert "matches no module" not in err
        assert not (tmp_path / fmt).exists()


def test_an_adapter_config_edited_since_saving_is_refused_by_gguf_adapter(base, tmp_path, capsys):
    """lorakit.json records the config fields that change the computation; an edited lora_alpha would change what
    llama.cpp computes, so the adapter GGUF is refused naming the field, by the CLI and by the writer's own check
    (which a library caller meets without the CLI's load)."""
    from lorakit.errors import LoraFileChanged
    from lorakit.export.gguf_adapter import check_adapter

    model = lk.apply_lora(AutoModelForCausalLM.from_pretrained(base), lk.LoraConfig(rank=2, alpha=8.0), ["q_proj"])
    lk.save_adapters(model, tmp_path / "adapter")
    check_adapter(tmp_path / "adapter", base)  # as saved: writable
    cfg_path = tmp_path / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["lora_alpha"] = 80
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(LoraFileChanged, match="lora_alpha 8.0 saved, 80 now"):
        check_adapter(tmp_path / "adapter", base)
    code, _, err = _export(
        capsys,
        "--model",
        base,
        "--adapter",
        tmp_path / "adapter",
        "--format",
        "gguf-adapter",
        "--out",
        tmp_path / "out",
    )
    assert code == 2 and "lora_alpha" in err and "80" in err, err
    assert not (tmp_path / "out").exists()
