"""`POST /v1/embeddings` and `POST /classify`: an encoder model (e.g. all-MiniLM-L6-v2) and its seq-cls adapters.

Embeddings are what sentence-transformers computes for such a model: the last hidden states mean-pooled over
the real tokens (attention mask), then L2-normalised; texts are cut at the model's `max_seq_length`
(sentence_bert_config.json) as sentence-transformers cuts them. `"model"` picks the base or an adapter: an
adapter's embeddings come from the encoder with its LoRA applied. `/classify` needs a seq-cls adapter (its
classification head): it answers each text's label and the probabilities of every label.

A seq-cls adapter trains its own head, which cannot sit beside another's on one model, so each adapter gets
its own copy of the encoder (small models: MiniLM is 90 MB). No engine: a forward per request batch, run in
FastAPI's worker threads (inference only; no model is changed while requests read it).
"""

from __future__ import annotations

import base64
import json
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from fastapi import APIRouter, Request

from ..errors import LoraFileError
from ..hf import models as hf
from . import lineage, schemas
from .access_log import record_of
from .limits import Limits
from .metrics import Metrics, label
from .protocol import APIError, ClassifyRequest, EmbeddingRequest
from .registry import Registry

if TYPE_CHECKING:
    from collections.abc import Callable

    from torch import nn
    from transformers import PreTrainedTokenizerBase

BATCH = 32  # texts per forward


def max_seq_length(model_dir: Path, config_limit: int) -> int:
    """sentence-transformers' max_seq_length of the model directory, else the model's own limit."""
    path = model_dir / "sentence_bert_config.json"
    try:
        limit = int(json.loads(path.read_text(encoding="utf-8"))["max_seq_length"])
    except (OSError, ValueError, KeyError, TypeError):
        return config_limit
    return min(limit, config_limit)


def pooled(model: nn.Module, enc: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean-pooled, L2-normalised last hidden states (B, H) of the encoder inside `model`."""
    encoder = getattr(model, "base_model", model)  # a seq-cls model's encoder (with its LoRA), or the bare model
    hidden = encoder(**enc).last_hidden_state.float()  # (B, T, H)
    mask = enc["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
    mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (B, H)
    return torch.nn.functional.normalize(mean, p=2, dim=1)


@dataclass
class EncoderService:
    """The base encoder, one seq-cls model per adapter, and the two endpoints."""

    model_dir: Path
    base: nn.Module
    tokenizer: PreTrainedTokenizerBase
    metrics: Metrics
    resolve: Callable[[str], str | None]  # a request's "model" -> adapter name (None: the base); APIError 404
    registry: Registry = field(init=False)
    adapters: dict[str, tuple[nn.Module, dict[int, str]]] = field(default_factory=dict)
    allow_base_mismatch: bool = False  # adapters load even onto a base other than their lorakit.json records
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        self.base.eval()
        limit = int(getattr(self.base.config, "max_position_embeddings", 512))
        self.max_length = max_seq_length(self.model_dir, limit)
        self._lock = threading.Lock()

    def load(self, name: str, path: Path) -> dict[str, Any]:
        """Load a seq-cls adapter (strictly, with its head) into its own copy of the base; its lineage."""
        task, labels = hf.read_task(path)
        if task != "seq-cls":
            raise ValueError(f"{path} is a {task} adapter; an encoder model serves seq-cls adapters")
        model, _, _ = hf.load_with_adapter(
            self.model_dir, path, task="seq-cls", allow_base_mismatch=self.allow_base_mismatch
        )
        model.eval()
        known: Any = labels or model.config.id2label
        id2label = {int(i): str(v) for i, v in known.items()}
        classes = int(getattr(model.config, "num_labels", len(id2label)))
        if sorted(id2label) != list(range(classes)):
            raise LoraFileError(
                f"{path}: id2label has the class ids {sorted(id2label)[:10]}, but the classification head has "
                f"{classes} classes: expected the ids 0..{classes - 1}"
            )
        with self._lock:
            self.adapters[name] = (model, id2label)
            self.metrics.loaded.set(len(self.adapters))
        return lineage.describe(model, path)  # its copy is the served base it runs on

    def unload(self, name: str) -> None:
        """Drop an adapter's model."""
        with self._lock:
            self.adapters.pop(name, None)
            self.metrics.loaded.set(len(self.adapters))

    def _model(self, adapter: str | None) -> tuple[nn.Module, dict[int, str] | None]:
        """The model serving `adapter` (the base for None) and its labels."""
        if adapter is None:
            return self.base, None
        with self._lock:
            return self.adapters[adapter]

    def _batches(self, texts: list[str]) -> list[dict[str, torch.Tensor]]:
        """Tokenized batches of texts, truncated at max_seq_length."""
        if not texts or any(not isinstance(t, str) for t in texts):
            raise APIError(400, "input must be a non-empty string or a non-empty list of strings", param="input")
        return [
            dict(
                self.tokenizer(
                    texts[i : i + BATCH], padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
                )
            )
            for i in range(0, len(texts), BATCH)
        ]

    def embed(self, adapter: str | None, texts: list[str]) -> tuple[list[list[float]], int]:
        """(one normalised embedding per text, tokens read)."""
        model, _ = self._model(adapter)
        out, tokens = [], 0
        with torch.inference_mode():
            for enc in self._batches(texts):
                out += pooled(model, enc).tolist()
                tokens += int(enc["attention_mask"].sum())
        return out, tokens

    def classify(self, adapter: str | None, texts: list[str]) -> tuple[list[dict[str, Any]], int]:
        """({"label", "probabilities"} per text, tokens read); APIError 400 for the base (it has no head)."""
        model, id2label = self._model(adapter)
        if id2label is None:
            raise APIError(
                400, "/classify needs a seq-cls adapter as 'model'; the base model has no head", param="model"
            )
        names = [id2label[i] for i in range(len(id2label))]
        out, tokens = [], 0
        with torch.inference_mode():
            for enc in self._batches(texts):
                probs = torch.softmax(model(**enc).logits.float(), dim=-1)  # (B, C)
                for p in probs:
                    out.append(
                        {"label": names[int(p.argmax())], "probabilities": dict(zip(names, p.tolist(), strict=True))}
                    )
                tokens += int(enc["attention_mask"].sum())
        return out, tokens

    def _held(self, name: str, fn: Callable[[str | None, list[str]], Any], texts: list[str], request: Request) -> Any:
        """Run fn for the model `name` names, holding its adapter meanwhile."""
        self.limits.check_texts(texts)
        adapter = self.resolve(name)
        record_of(request).adapter = label(adapter)
        if adapter is not None:
            self.registry.acquire(adapter)
        try:
            return fn(adapter, texts)
        finally:
            if adapter is not None:
                self.registry.release(adapter)

    def routes(self) -> APIRouter:
        """The router with both endpoints (sync handlers: FastAPI runs them in worker threads)."""
        router = APIRouter()

        @router.post("/v1/embeddings", responses=schemas.responses(schemas.Embeddings))
        def embeddings(body: EmbeddingRequest, request: Request) -> dict[str, Any]:
            """OpenAI's embeddings."""
            size = int(getattr(self.base.config, "hidden_size", 0))
            if body.dimensions is not None and body.dimensions != size:
                raise APIError(
                    400,
                    f"dimensions={body.dimensions}: this model's embeddings have {size} dimensions, and it was not "
                    "trained to be cut shorter (leave dimensions out, or give {size})".replace("{size}", str(size)),
                    param="dimensions",
                )
            vectors, tokens = self._held(body.model, self.embed, body.texts(), request)
            record_of(request).prompt_tokens = tokens
            self.metrics.finished(self.resolve(body.model), "stop", tokens, 0)
            if body.encoding_format == "base64":
                vectors = [base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode("ascii") for v in vectors]
            data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]
            usage = {"prompt_tokens": tokens, "total_tokens": tokens}
            return {"object": "list", "data": data, "model": body.model, "usage": usage}

        @router.post("/classify", responses=schemas.responses(schemas.Classifications))
        def classify(body: ClassifyRequest, request: Request) -> dict[str, Any]:
            """Labels and probabilities of each text (a seq-cls adapter)."""
            results, tokens = self._held(body.model, self.classify, body.texts(), request)
            record_of(request).prompt_tokens = tokens
            self.metrics.finished(self.resolve(body.model), "stop", tokens, 0)
            data = [{"index": i, **r} for i, r in enumerate(results)]
            usage = {"prompt_tokens": tokens, "total_tokens": tokens}
            return {"object": "list", "data": data, "model": body.model, "usage": usage}

        return router
