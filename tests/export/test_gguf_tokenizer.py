"""A GGUF names the pre-tokenizer llama.cpp must run (`tokenizer.ggml.pre`); oracle: llama.cpp's own tokenizer.

llama.cpp does not read a pre-tokenizer from the file, it runs its own, chosen by that name. For GPT-2-, Llama-3-
and Qwen2-style byte-level BPE tokenizers built here (no downloads), llama.cpp (llama-cpp-python, vocabulary only)
must tokenise the fixed check set, the proof texts, a rendered chat and every special and added token exactly as
transformers does on the exported file. A pre-tokenizer lorakit cannot map is refused, naming it.
"""

import json
import sys
from pathlib import Path

import gguf
import llama_cpp  # the export extra: a missing runtime fails here, never skips
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import lorakit as lk
from lorakit.cli import main
from lorakit.export import prepare
from lorakit.export.gguf_adapter import GgufExportError
from lorakit.export.gguf_model import write_gguf_model
from lorakit.export.gguf_vocab import TOKENIZER_CHECK

sys.path.insert(0, str(Path(__file__).parent))
from _bpe_styles import save_styled_llama  # noqa: E402

pytestmark = pytest.mark.slow  # subprocesses, servers or export runtimes: not in the fast set

STYLES = {"gpt2": "gpt-2", "llama3": "llama-bpe", "qwen2": "qwen2"}  # style -> llama.cpp's name for it
OWN_CHECKS = ["I don't know, it's fine.", "12345", "x = [1, 2, 3]\n\tprint(x)  # done", "Ünïcödé, ДА, 中文。"]


@pytest.fixture(scope="module")
def styled(tmp_path_factory):
    root = tmp_path_factory.mktemp("bpe-styles")
    return {s: save_styled_llama(root / s, s) for s in STYLES}


def _llama_tokens(path, text):
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    return list(llm.tokenize(text.encode("utf-8"), add_bos=True, special=True))


@pytest.mark.parametrize("style", STYLES)
def test_llama_cpp_tokenises_the_check_set_as_transformers_does(styled, style, tmp_path):
    base = styled[style]
    write_gguf_model(base, tmp_path / "m.gguf", dtype="f32")
    tok = AutoTokenizer.from_pretrained(base)
    texts = [*OWN_CHECKS, *TOKENIZER_CHECK, *prepare.proof_texts(tok, prepare.PROOF_TEXTS)]
    assert any("<|im_end|>" in t for t in texts) and any("<tool_call>" in t for t in texts)
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), vocab_only=True, verbose=False)
    differ = [
        t for t in texts if list(llm.tokenize(t.encode("utf-8"), add_bos=True, special=True)) != tok(t)["input_ids"]
    ]
    assert differ == []
    assert gguf.GGUFReader(tmp_path / "m.gguf").fields["tokenizer.ggml.pre"].contents() == STYLES[style]
    # the check set is not trivially tokenised: digits and contractions are split by the style's own rule
    assert len(tok("I don't know, it's fine.")["input_ids"]) > 3


def test_a_gpt2_style_export_is_proven_on_a_sentence_with_contractions(styled, tmp_path, capsys):
    """Before: tokenizer.ggml.pre = "default" split `don't` as `don`,`'`,`t`: the proof failed on this --text."""
    base = styled["gpt2"]
    model = lk.apply_lora(AutoModelForCausalLM.from_pretrained(base), lk.LoraConfig(rank=2), ["q_proj", "v_proj"])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.2)
    lk.save_adapters(model, tmp_path / "adapter")
    out = tmp_path / "out"
    code = main(
        [
            "export",
            "--model",
            str(base),
            "--adapter",
            str(tmp_path / "adapter"),
            "--format",
            "gguf",
            "--dtype",
            "f32",
            "--text",
            "I don't know, it's fine.",
            "--out",
            str(out),
        ]
    )
    printed = capsys.readouterr()
    assert code == 0, printed.out + printed.err
    (proof,) = json.loads((out / "proof.json").read_text())["proofs"]
    assert proof["tokenizer_agrees"] is True and proof["tokenizer_texts"] >= len(TOKENIZER_CHECK) + 1
    assert proof["passed"] and proof["max_abs_diff"] < 1e-5


def _retokenised(base, tmp_path, pre_tokenizer):
    """A copy of `base` whose tokenizer.json has another pre_tokenizer."""
    other = tmp_path / "other"
    other.mkdir()
    for f in base.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    tj = json.loads((other / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = pre_tokenizer
    (other / "tokenizer.json").write_text(json.dumps(tj))
    return other


@pytest.mark.parametrize(
    "pre,named",
    [
        (
            {
                "type": "Sequence",
                "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": r"\w+|[^\w\s]+"}, "behavior": "Isolated", "invert": False},
                    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
                ],
            },
            r"\\w+",
        ),
        ({"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}, "add_prefix_space"),
    ],
)
def test_a_pre_tokenizer_llama_cpp_cannot_run_is_refused_naming_it(styled, tmp_path, capsys, pre, named):
    other = _retokenised(styled["gpt2"], tmp_path, pre)
    with pytest.raises(GgufExportError, match="pre_tokenizer"):
        write_gguf_model(other, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()
    model = lk.apply_lora(AutoModelForCausalLM.from_pretrained(other), lk.LoraConfig(rank=2), ["q_proj"])
    lk.save_adapters(model, tmp_path / "adapter")
    code = main(
        [
            "export",
            "--model",
            str(other),
            "--adapter",
            str(tmp_path / "adapter"),
            "--format",
            "gguf",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "pre_tokenizer" in err and named in err and "llama.cpp" in err
    assert not (tmp_path / "out").exists()
