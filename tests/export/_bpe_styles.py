"""Byte-level BPE tokenizers in the styles of GPT-2, Llama 3 and Qwen2, trained in the test (no downloads), on tiny
random Llamas saved with them.

Each style is what the real tokenizer.json holds: GPT-2's ByteLevel pre-tokenizer with its built-in regex; Llama 3's
and Qwen2's Split regex (Isolated) before a ByteLevel without regex, Llama 3 with `ignore_merges` and a BOS added by
its post-processor, Qwen2 with an NFC normalizer and the ChatML template. The regexes are copied from those files,
not from lorakit, so they are the oracle's.
"""

from pathlib import Path

import torch

LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|begin_of_text|>", "<|im_start|>", "<|im_end|>"]
ADDED = ["<tool_call>"]  # an added token that is not special
CORPUS = [
    "the cat sat on the mat",
    "a dog ran in the park",
    "I don't know, it's fine. I'm sure they'll say we've done it.",
    "12345 67890 2026 3.14159 1,000,000 555-0100",
    "Wait... what?! --- === ((x)) [y] {z} ''' ``` \"\"\"",
    'def f(x):\n\treturn x ** 2  # square\n\nif __name__ == "__main__":\n    print(f(3))\n',
    "Grüße café naïve 日本語 中文 한국어 Привет мир مرحبا",
    "emoji 🚀🦙 ✅ 👍🏽",
    "We'Ve a'lL 'RE 'M 'D",
    "\n \n\n \t \t\t  \n   \n    spaces   and\r\nlines",
]


def build(style: str):
    """A transformers fast tokenizer in `style` ("gpt2", "llama3", "qwen2")."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(ignore_merges=style == "llama3"))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=style == "gpt2")
    if style == "gpt2":
        tok.pre_tokenizer = byte_level
    else:
        regex = LLAMA3_REGEX if style == "llama3" else QWEN2_REGEX
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), "isolated"), byte_level])
    if style == "qwen2":
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 3, trainer)
    if style == "llama3":
        bos = tok.token_to_id("<|begin_of_text|>")
        tok.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A",
            pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
            special_tokens=[("<|begin_of_text|>", bos)],
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        bos_token="<|begin_of_text|>" if style == "llama3" else None,
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.add_tokens(ADDED)
    if style == "qwen2":
        fast.chat_template = CHATML
    return fast


def save_styled_llama(directory, style: str) -> Path:
    """A tiny random Llama (hidden 32, 2 layers) with a `style` tokenizer, saved to `directory`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    fast = build(style)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        bos_token_id=fast.bos_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(directory)
    fast.save_pretrained(directory)
    return Path(directory)
