"""The tokenizer as llama.cpp's byte-level BPE ("gpt2") vocabulary, with the pre-tokenizer llama.cpp must run.

llama.cpp does not read a tokenizer's pre-tokenizer from the file: it runs one of its own, chosen by the GGUF key
`tokenizer.ggml.pre` (`src/llama-vocab.cpp`); a name it does not know, or "default", runs a splitter no Hugging Face
tokenizer uses (`don't` → `don`,`'`,`t`). llama.cpp's `convert_hf_to_gguf.py` picks the name by hashing the token
ids of a check string against a table of known checkpoints (`get_vocab_base_pre`); a vocabulary trained anew (a
tiny one, a custom one) matches no hash. lorakit maps the tokenizer's own definition instead, in tokenizer.json:
the split regex (or GPT-2's built-in one), the ByteLevel step and the BPE flags llama.cpp's choice implies. A
tokenizer it cannot map is refused, naming its pre-tokenizer; the export's proof then checks llama.cpp's
tokenisation of a fixed check set (`TOKENIZER_CHECK`) against transformers'.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .gguf_adapter import GgufExportError, read_json_object

# Hugging Face pre-tokenizer regexes (as tokenizer.json writes them) and the llama.cpp pre-tokenizer that runs the
# same split, with the `ignore_merges` llama.cpp sets for it (llama-vocab.cpp, `llama_vocab::impl::load`).
GPT2_BUILTIN = "ByteLevel(use_regex=true)"  # GPT-2's regex, built into the ByteLevel pre-tokenizer
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)"
    r"|\s+"
)
QWEN2_REGEX = LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")  # digits one at a time
PRE_TOKENIZERS: dict[str, tuple[str, bool]] = {
    GPT2_BUILTIN: ("gpt-2", False),
    LLAMA3_REGEX: ("llama-bpe", True),  # llama.cpp's LLAMA3 regex is this one, the (?i:...) group spelt out
    QWEN2_REGEX: ("qwen2", False),  # Qwen2, Qwen2.5
}
NORMALIZERS = (None, "NFC")  # llama.cpp normalises nothing; NFC leaves NFC text (the usual kind) as it is

# Tokenised by llama.cpp and by transformers in every GGUF proof, besides the proof texts: digits, contractions,
# punctuation runs, code, newlines and tabs, emoji and several scripts; the last is llama.cpp's own check string
# (convert_hf_to_gguf.py, `get_vocab_base_pre`).
TOKENIZER_CHECK = (
    "I don't know, it's fine. We'Ve a'lL SEEN 'EM; they'd've said so.",
    "12345 + 3.14159 = 1e-3? Call 555-0100 or 2026-12-07, 1,000,000 times.",
    "Wait...!!! ?!? --- === ((nested)) [brackets] {braces} <tags> ''' ``` \"\"\"",
    'def f(x):\n\treturn x ** 2  # square\n\nif __name__ == "__main__":\n    print(f(3))\n',
    "línea\r\nnueva   with   spaces \n\n\n trailing  ",
    "Grüße, café, naïve — 日本語のテキスト、中文句子。한국어 문장. Привет, мир! مرحبا",
    "emoji 🚀🦙 😶\u200d🌫️ ✅ 👍🏽 flags 🇫🇷",
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 "
    "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= "
    "нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure "
    "I'll make it, 'D you like some tea? We'Ve a'lL",
)


def pre_tokenizer(path: Path) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for the tokenizer.json at `path`; GgufExportError naming what cannot map.

    Examples:
        >>> import tempfile, json
        >>> d = Path(tempfile.mkdtemp())
        >>> bpe = {"type": "BPE", "ignore_merges": False, "vocab": {}, "merges": []}
        >>> pre = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
        >>> _ = (d / "tokenizer.json").write_text(json.dumps({"model": bpe, "pre_tokenizer": pre}))
        >>> pre_tokenizer(d / "tokenizer.json")
        'gpt-2'
    """
    tj = _read(path)
    model = tj.get("model") or {}
    pre = tj.get("pre_tokenizer")
    shown = json.dumps(pre)[:200]
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(pre):
        raise GgufExportError(
            f"{path}: a {model.get('type')} tokenizer with pre_tokenizer {shown}: lorakit writes llama.cpp's "
            'byte-level BPE ("gpt2") vocabulary only (SentencePiece and word-level vocabularies are not exported yet)'
        )
    split = _split_regex(pre)
    if split is None or split not in PRE_TOKENIZERS:
        known = ", ".join(name for name, _ in PRE_TOKENIZERS.values())
        raise GgufExportError(
            f"{path}: pre_tokenizer {shown}: llama.cpp runs its own pre-tokenizer, chosen by name "
            f"(tokenizer.ggml.pre), and lorakit maps only those whose split it reproduces exactly ({known}); "
            "this one would tokenise text differently in llama.cpp than in training"
        )
    name, ignore_merges = PRE_TOKENIZERS[split]
    normalizer = (tj.get("normalizer") or {}).get("type")
    if normalizer not in NORMALIZERS:
        raise GgufExportError(
            f"{path}: normalizer {json.dumps(tj.get('normalizer'))[:120]}: llama.cpp normalises no text "
            f"(pre-tokenizer {name!r}); lorakit exports tokenizers without a normalizer (or NFC) only"
        )
    flags = {k: model.get(k) for k in ("byte_fallback", "continuing_subword_prefix", "end_of_word_suffix", "dropout")}
    if any(flags.values()):
        raise GgufExportError(f"{path}: BPE model with {flags}: llama.cpp's byte-level BPE has none of these")
    if bool(model.get("ignore_merges", False)) != ignore_merges:
        raise GgufExportError(
            f"{path}: ignore_merges={bool(model.get('ignore_merges', False))}, but llama.cpp's {name!r} "
            f"pre-tokenizer runs with ignore_merges={ignore_merges}: it would tokenise some words differently"
        )
    return name


def _split_regex(pre: Any) -> str | None:
    """The one regex a byte-level pre-tokenizer splits with (GPT2_BUILTIN for ByteLevel's own); None if other."""
    steps = pre.get("pretokenizers", []) if isinstance(pre, dict) and pre.get("type") == "Sequence" else [pre]
    if not steps or not all(isinstance(s, dict) for s in steps):
        return None
    *head, last = steps
    if last.get("type") != "ByteLevel" or last.get("add_prefix_space"):
        return None  # llama.cpp adds no prefix space to byte-level BPE
    if not head:
        return GPT2_BUILTIN if last.get("use_regex", True) else None
    if len(head) != 1 or last.get("use_regex", True):
        return None
    split = head[0]
    pattern = split.get("pattern") or {}
    if split.get("type") != "Split" or split.get("behavior") != "Isolated" or split.get("invert"):
        return None
    if "Regex" not in pattern:
        return None
    return str(pattern["Regex"])


def _read(path: Path) -> dict[str, Any]:
    """tokenizer.json as a dict, or GgufExportError naming the file."""
    return read_json_object(path, "the GGUF carries the vocabulary; a fast tokenizer is needed", GgufExportError)


def write_vocab(gguf: Any, writer: Any, model_dir: Path, vocab_size: int) -> None:
    """The tokenizer as llama.cpp's "gpt2" vocabulary (convert_hf_to_gguf's get_vocab_base / _set_vocab_gpt2).

    Special added tokens are CONTROL, other added tokens USER_DEFINED (llama.cpp matches both whole, as
    transformers does); whether BOS/EOS are added is read from what the tokenizer does, not guessed.
    """
    from transformers import AutoTokenizer

    pre = pre_tokenizer(model_dir / "tokenizer.json")
    tok = AutoTokenizer.from_pretrained(model_dir)
    reverse = {i: t for t, i in tok.get_vocab().items()}
    added = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(reverse[i])
        if i in added:
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True)
    ids = tok("a")["input_ids"]
    special.add_special_token["bos"] = tok.bos_token_id is not None and ids[:1] == [tok.bos_token_id]
    special.add_special_token["eos"] = tok.eos_token_id is not None and ids[-1:] == [tok.eos_token_id]
    special.add_to_gguf(writer, quiet=True)
