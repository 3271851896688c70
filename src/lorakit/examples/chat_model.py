"""The embedded chat model of `lorakit example chat`: a tiny Llama and a byte-level BPE tokenizer, both built here
(nothing downloaded), with a ChatML template; its tokenizer is Qwen2's kind, so llama.cpp's GGUF can hold it.

    model_dir = build_chat_model(Path("artifacts/example-chat/base"), corpus)   # random weights, tokenizer
    pretrain(model_dir, "next.jsonl", callbacks)     # all its weights trained on the base skill, saved again

The vocabulary is trained on the example's own prompts (`corpus`), so each digit is a token of its own (Qwen2's
split) and every task word is one token: a small model then learns the tasks in seconds.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader

from ..export.gguf_vocab import QWEN2_REGEX
from ..hf import batches, data
from ..hf import models as hf
from ..train import TrainConfig, Trainer
from ..train.trainer import Callback
from ..ui.progress import Progress

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
ROLE_WORDS = ("system", "user", "assistant")
VOCAB_SIZE = 320  # the 256 bytes, the specials and a few dozen merges: whole words of the corpus
HIDDEN, LAYERS, HEADS, KV_HEADS = 64, 2, 4, 2


def build_tokenizer(corpus: Sequence[str]) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (Qwen2's split: digits one at a time) trained on `corpus`, with ChatML."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_REGEX), "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([*corpus, *ROLE_WORDS] * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",  # a chat turn ends the answer (as Qwen's instruct models do)
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHATML
    return fast


def build_chat_model(directory: Path, corpus: Sequence[str], seed: int = 0) -> Path:
    """Save a tiny random Llama (hidden 64, 2 layers) and `build_tokenizer(corpus)` to `directory`."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer(corpus)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=256,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def pretrain(
    model_dir: Path, rows: Path, config: TrainConfig, callbacks: Sequence[Callback], progress: Progress
) -> float:
    """Train every weight of the model in `model_dir` on the chat rows in `rows`, save it back; its last loss.

    This stands in for the pre-training and instruction tuning a real chat model has had: afterwards the base
    follows the chat template and has one skill, which the adapters then change.
    """
    tok = hf.load_tokenizer(model_dir)
    prepared = data.prepare(
        rows, "causal-lm", tok, valid_fraction=0.1, seed=config.seed, max_length=32, progress=progress
    )
    collate = functools.partial(batches.collate, pad_id=tok.pad_token_id)
    shuffle = torch.Generator().manual_seed(config.seed)
    # a list is a map-style dataset to DataLoader; torch's stubs ask for a Dataset subclass
    train: DataLoader[data.Encoded] = DataLoader(
        prepared.train,  # type: ignore[arg-type]
        batch_size=32,
        shuffle=True,
        generator=shuffle,
        collate_fn=collate,
    )
    valid: DataLoader[data.Encoded] = DataLoader(prepared.valid, batch_size=32, collate_fn=collate)  # type: ignore[arg-type]
    model = hf.load_model(model_dir, "causal-lm")
    result = Trainer(model, config, callbacks=list(callbacks)).fit(train, valid)
    model.save_pretrained(model_dir)
    assert result.valid_loss is not None  # fit() evaluated the valid loader
    return result.valid_loss
