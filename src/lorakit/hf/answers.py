"""Generated answers scored against the rows' reference answers: `lorakit eval --metric` and, at every evaluation
of a run, `lorakit finetune --eval-metric` (an `AnswerProbe`).

    rows = answer_rows(examples, tokenizer, metrics)             # the prompt and reference answer of each row
    scored = generate_and_score(model, tokenizer, rows, metrics)  # greedy, batched (predict.complete)
    scored.means                                                  # {"exact_match": 0.75, ...}

Each data row gives a prompt and a reference answer, as it gives them to training:

    {"prompt": P, "completion": C}         prompt P, reference C
    {"instruction", "input"?, "output"}    the Alpaca prompt (examples.alpaca_prompt), reference the output
    {"messages": [..., assistant A]}       the turns before the last, rendered with the chat template and the
                                           assistant's header (as `predict` renders chats), reference A's content;
                                           a conversation that ends on another role is all prompt, no reference
    {"text": T}                            no prompt/answer split: refused for every metric

Generation is greedy, through `predict.complete` (left-padded batches of the one decoder, stopping at EOS and
the template's end of turn), so an answer here is what `lorakit predict` gives for the same prompt.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..train.evaluation import ProbeResult
from . import chat
from .answer_metrics import AnswerMetric, MetricError
from .data import holdout
from .examples import Example, example, validate
from .predict import Request, complete
from .rows import MAX_LINE_BYTES, BadRow, read_records
from .sources import Source, sources

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import PreTrainedTokenizerBase

    from ..ui.progress import Progress

MAX_NEW_TOKENS = 64  # an answer longer than this is cut (and scored as cut)
SAMPLES = 3  # rows shown with their generations at each evaluation of a run
SHOWN_ROWS = 5  # rows named in an error


class UnlistedValidationError(MetricError):
    """Answer metrics on a data directory without validation rows of its own; `detail` says why."""

    param = "valid_path"

    def __init__(self, data: str | Path) -> None:
        self.detail = (
            f"{data}: the validation rows of a data directory are held out as it is read, so they cannot be "
            "listed for answer metrics"
        )
        super().__init__(f"{self.detail}; give the validation rows a file or directory of their own (valid_path)")


@dataclass(frozen=True)
class AnswerRow:
    """One row to answer: where it is (`file:line`), the prompt to generate from, and its reference answer."""

    where: str
    line: int
    prompt: str
    chat: bool  # rendered from messages: the template wrote the special tokens already
    reference: str | None  # None: a conversation ending on a user turn (only metrics without a reference score it)


def answer_row(ex: Example, tokenizer: PreTrainedTokenizerBase) -> AnswerRow:
    """The prompt and reference answer of one validated row; MetricError naming it when it has no prompt."""
    if ex.messages is not None:
        turns, reference = ex.messages, None
        if turns[-1].role == "assistant":
            turns, reference = turns[:-1], turns[-1].content
        prompt = chat.render(tokenizer, turns, add_generation_prompt=True)
        return AnswerRow(ex.where, ex.line, prompt, True, reference)
    if ex.completion is None:
        raise MetricError(
            f"{ex.where}: a 'text' row has no prompt and reference answer to score; answer metrics need "
            "prompt/completion, instruction/output or messages rows"
        )
    if not ex.text.strip():
        raise MetricError(f"{ex.where}: the prompt is empty; there is nothing to answer")
    return AnswerRow(ex.where, ex.line, ex.text, False, ex.completion)


def answer_rows(
    examples: Iterable[Example],
    tokenizer: PreTrainedTokenizerBase,
    metrics: Sequence[AnswerMetric],
    *,
    bad_rows: Sequence[BadRow] = (),
    limit: int | None = None,
) -> list[AnswerRow]:
    """The answer rows of `examples` (those among `bad_rows` left out, at most `limit`), checked for `metrics`.

    Raises MetricError naming the rows that cannot be scored: a text row, or a row without a reference answer
    for a metric that needs one.
    """
    bad = {(b.path, b.line) for b in bad_rows}
    rows: list[AnswerRow] = []
    for ex in examples:
        if limit is not None and len(rows) >= limit:
            break
        if (ex.path, ex.line) not in bad:
            rows.append(answer_row(ex, tokenizer))
    check_references(rows, metrics)
    return rows


def check_references(rows: Sequence[AnswerRow], metrics: Sequence[AnswerMetric]) -> None:
    """MetricError naming the rows without a reference answer when a metric needs one."""
    needing = [m.name for m in metrics if m.needs_reference]
    missing = [r.where for r in rows if r.reference is None]
    if needing and missing:
        shown = ", ".join(missing[:SHOWN_ROWS]) + (
            f" and {len(missing) - SHOWN_ROWS} more" if len(missing) > SHOWN_ROWS else ""
        )
        raise MetricError(
            f"{shown}: no reference answer (the conversation does not end with an assistant message), and "
            f"{', '.join(needing)} compare(s) the generation with it; end each conversation with the expected "
            "assistant answer, or use metrics without a reference (regex:PATTERN, json_valid)"
        )


def check_task(metrics: Sequence[AnswerMetric], task: str) -> None:
    """MetricError unless the task generates text (causal-lm) when metrics are asked for."""
    if metrics and task != "causal-lm":
        names = ", ".join(m.name for m in metrics)
        raise MetricError(f"answer metrics ({names}) score generated text: they need task causal-lm, not {task}")


def file_answer_rows(
    path: str | Path,
    task: str,
    tokenizer: PreTrainedTokenizerBase,
    metrics: Sequence[AnswerMetric],
    *,
    bad_rows: Sequence[BadRow] = (),
    max_line_bytes: int = MAX_LINE_BYTES,
) -> list[AnswerRow]:
    """The answer rows of every usable row of a data file (`lorakit eval`): the rows `data.encode_file` scores."""
    records, _ = read_records(path, max_line_bytes=max_line_bytes)
    examples, _ = validate(path, records, task)
    return answer_rows([e for e in examples if isinstance(e, Example)], tokenizer, metrics, bad_rows=bad_rows)


def _examples(found: Sequence[Source], task: str) -> Iterator[Example]:
    """The valid examples of the sources, read lazily (a big directory is read only as far as needed)."""
    for src in found:
        for line, row in src.records:
            try:
                ex = example(src.path, line, row, task, None, src.unit)
            except ValueError:
                continue  # a bad row: data.prepare reported (or refused) it already
            if isinstance(ex, Example):  # answer metrics score the model tasks' rows
                yield ex


def validation_answer_rows(
    data: str | Path,
    valid: str | Path | None,
    tokenizer: PreTrainedTokenizerBase,
    metrics: Sequence[AnswerMetric],
    *,
    valid_fraction: float,
    seed: int,
    limit: int,
    bad_rows: Sequence[BadRow] = (),
    max_line_bytes: int = MAX_LINE_BYTES,
) -> list[AnswerRow]:
    """The first `limit` validation rows of a fine-tuning run (`valid`, else the rows `data.prepare` held out of
    the `data` file with `valid_fraction` and `seed`) as answer rows, checked for `metrics`."""
    if valid is not None:
        examples: Iterable[Example] = _examples(sources(valid, max_line_bytes=max_line_bytes), "causal-lm")
    elif Path(data).is_dir():
        raise UnlistedValidationError(data)
    else:
        every = list(_examples(sources(data, max_line_bytes=max_line_bytes), "causal-lm"))
        examples = holdout(every, valid_fraction, seed)[1] if len(every) >= 2 else []
    rows = answer_rows(examples, tokenizer, metrics, bad_rows=bad_rows, limit=limit)
    if not rows:
        raise MetricError(f"{valid or data}: no validation rows to answer")
    return rows


@dataclass(frozen=True)
class Scored:
    """Each row's generation and scores, and each metric's mean over the rows."""

    generations: list[str]
    scores: list[dict[str, float]]  # per row: metric name -> 0.0 or 1.0
    means: dict[str, float]

    def samples(self, rows: Sequence[AnswerRow], n: int = SAMPLES) -> list[dict[str, Any]]:
        """The first `n` rows as JSON objects: where, prompt, reference, generation and scores."""
        return [
            {"row": r.where, "prompt": r.prompt, "reference": r.reference, "generation": g, "scores": s}
            for r, g, s in list(zip(rows, self.generations, self.scores, strict=True))[:n]
        ]


def generate_and_score(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[AnswerRow],
    metrics: Sequence[AnswerMetric],
    *,
    max_new_tokens: int = MAX_NEW_TOKENS,
    batch_size: int = 8,
    progress: Progress | None = None,
) -> Scored:
    """Generate each row's answer (greedy, batched: `predict.complete`) and score it with every metric."""
    if not rows:
        raise ValueError("no rows to answer")
    requests = [Request(r.line, r.prompt, chat=r.chat) for r in rows]
    generations = complete(
        model, tokenizer, requests, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress
    )
    scores = [{m.name: m.score(g, r.reference) for m in metrics} for r, g in zip(rows, generations, strict=True)]
    means = {m.name: sum(s[m.name] for s in scores) / len(scores) for m in metrics}
    return Scored(generations, scores, means)


@dataclass(frozen=True)
class AnswerProbe:
    """The answer metrics as a training probe (train.evaluation.Probe): at each evaluation, generate the rows'
    answers, report each metric's mean and the first `samples` rows; the model's mode is left as found."""

    tokenizer: PreTrainedTokenizerBase
    rows: Sequence[AnswerRow]
    metrics: Sequence[AnswerMetric]
    max_new_tokens: int = MAX_NEW_TOKENS
    batch_size: int = 8
    samples: int = SAMPLES

    def measure(self, model: nn.Module, device: torch.device) -> ProbeResult:
        """The metrics' means over the rows and the first rows' generations, generated on `device`."""
        was_training = model.training
        model.to(device)
        try:
            scored = generate_and_score(
                model,
                self.tokenizer,
                self.rows,
                self.metrics,
                max_new_tokens=self.max_new_tokens,
                batch_size=self.batch_size,
            )
        finally:
            model.train(was_training)
        return ProbeResult(scored.means, tuple(scored.samples(self.rows, self.samples)))
