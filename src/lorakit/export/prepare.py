"""What every export starts from: the base with its adapter(s) loaded unmerged, checked for what export cannot take.

The unmerged model is the reference: each format's proof compares the artefact's logits with this model's on the
same inputs, so a mistake in merging is caught too, not only one in writing the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import LoraError
from ..hf import models as hf
from ..ui.progress import Progress, quiet
from .proof import Proof

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# Held-out proof inputs of different lengths, so padding and the attention mask are exercised too.
PROOF_TEXTS = (
    "The film was a delight from start to finish.",
    "I would not recommend this product to anyone.",
    "Edge devices run small models.",
    "ok",
)
# A conversation rendered with the model's chat template (when it has one) is proven too: the template's own tokens
# (`<|im_start|>`, `<|im_end|>`, ...) are what a chat user's every prompt reads.
CHAT = (
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3 + 3?"},
)
SPECIAL_PER_TEXT = 32  # special and added tokens per proof text (a 256-token reserve becomes 8 short texts)


class ExportInputError(LoraError, ValueError):
    """The model or adapter cannot be exported as asked (a quantised base, an unsupported task, ...)."""


class ProofFailed(LoraError, RuntimeError):
    """The exported artefact does not compute what lorakit does, within the stated tolerance."""

    def __init__(self, proof: Proof) -> None:
        super().__init__(f"the proof failed: {proof.summary()}")
        self.proof = proof


@dataclass(frozen=True)
class Exported:
    """What an export wrote: the output directory, the artefact in it, the task and the proof(s).

    An export written without a proof (`--no-proof`) has no proofs and says why in `unproven`.
    """

    out: Path
    artefact: Path
    task: str
    proofs: tuple[Proof, ...]
    unproven: str | None = None

    @property
    def proof(self) -> Proof:
        """The proof of the artefact itself (the last one: a GGUF adapter's base is proven first)."""
        return self.proofs[-1]


def proof_texts(tok: PreTrainedTokenizerBase, texts: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """What every proof runs: `texts`, the chat template rendered (if any), and every special and added token.

    A proof reads only the embedding rows of the tokens it runs, so a token it never runs (a corrupted
    `<|im_end|>` row, say) would pass unseen; the special and added tokens go in texts of `SPECIAL_PER_TEXT`.
    """
    out = [*texts]
    if getattr(tok, "chat_template", None):
        try:
            out.append(str(tok.apply_chat_template(list(CHAT), tokenize=False, add_generation_prompt=True)))
        except Exception as e:  # jinja2's errors: the template is the user's
            raise ExportInputError(f"the tokenizer's chat template cannot render a plain conversation: {e}") from None
    special = {i: t.content for i, t in tok.added_tokens_decoder.items()}
    special.update({int(tok.convert_tokens_to_ids(t)): t for t in tok.all_special_tokens})  # type: ignore[arg-type]
    contents = [special[i] for i in sorted(special)]
    out += ["".join(contents[i : i + SPECIAL_PER_TEXT]) for i in range(0, len(contents), SPECIAL_PER_TEXT)]
    return tuple(out)


def check_exportable(model_dir: str | Path) -> Path:
    """The model directory, checked for what export cannot take (a quantised base)."""
    path = hf.check_model_dir(model_dir)
    config_file = path / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "?")
        raise ExportInputError(
            f"{config_file}: the base is quantised ({method}); export needs full-precision weights: "
            "export from the unquantised base model"
        )
    return path


def check_adapter_base(model_dir: str | Path, adapter_dir: str | Path) -> None:
    """ExportInputError naming the base an adapter was saved for (its lorakit.json), if `model_dir` is another kind.

    Run before loading: an adapter put on another architecture would otherwise fail at its first target ("matches
    no module") without saying which base it belongs to. Same-kind bases are compared weight by weight at load.
    """
    from ..files import provenance

    sidecar = provenance.read(adapter_dir)
    config_file = Path(model_dir) / "config.json"
    if sidecar is None or not config_file.is_file():
        return
    config = json.loads(config_file.read_text(encoding="utf-8"))
    archs = config.get("architectures") or ["(no architectures in config.json)"]
    saved_type = (sidecar.base.get("config") or {}).get("model_type")
    if saved_type is not None and config.get("model_type") is not None and saved_type != config["model_type"]:
        raise ExportInputError(  # the class may differ by its head alone (a classifier on a BertModel): not compared
            f"the adapter {adapter_dir} was saved for a {sidecar.base.get('class')} base (model_type {saved_type!r}, "
            f"{sidecar.base.get('path', 'path not recorded')}; {sidecar.path}), but {model_dir} is a {archs[0]} "
            f"(model_type {config['model_type']!r}): export it with the base it was trained on"
        )


def load_unmerged(
    model_dir: str | Path,
    adapter_dirs: list[Path],
    *,
    allow_base_mismatch: bool = False,
    progress: Progress | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    """(model, tokenizer, task): the base with its adapter(s) loaded, unmerged; several are combined exactly ("cat").

    Each adapter is checked against the base it was saved for (its lorakit.json) unless `allow_base_mismatch`.
    """
    from .. import adapters
    from ..loading import load_adapters

    progress = progress or quiet()
    check_exportable(model_dir)
    for d in adapter_dirs:
        check_adapter_base(model_dir, d)
    if len(adapter_dirs) == 1:
        model, tok, task = hf.load_with_adapter(
            model_dir, adapter_dirs[0], allow_base_mismatch=allow_base_mismatch, progress=progress
        )
    else:
        tasks = {hf.read_task(d)[0] for d in adapter_dirs}
        if len(tasks) != 1 or "seq-cls" in tasks:
            raise ExportInputError(
                f"several adapters combine only for one causal-lm task; these are {sorted(tasks)}: export one at a time"
            )
        task = tasks.pop()
        with progress.task(f"loading the model {model_dir}"):
            model, tok = hf.load(model_dir, task)
        names = [f"adapter{i}" for i in range(len(adapter_dirs))]
        for name, d in zip(names, adapter_dirs, strict=True):
            with progress.task(f"loading the adapter {d}"):
                load_adapters(model, d, name=name, allow_base_mismatch=allow_base_mismatch)
        adapters.combine_adapters(model, dict.fromkeys(names, 1.0), "combined")
        adapters.set_adapter(model, "combined")
        for name in names:
            adapters.delete_adapter(model, name)
    if task not in ("seq-cls", "causal-lm"):
        raise ExportInputError(f"task {task!r}: export covers seq-cls and causal-lm")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model.eval(), tok, task
