"""The proof that an exported artefact computes what lorakit does: the same inputs through both, compared.

A Proof records the runtime, the largest |Δlogit| over the real (unpadded) positions, how many argmax predictions
agree (per row for seq-cls, per position for causal-lm: the greedy next token), the tolerance and the verdict.
It is written as JSON beside the artefact and printed by the CLI.

A tolerance on the logits alone can pass an artefact that lost the adapter: at a lossy dtype it scales with the
largest logit, and an adapter's effect may be smaller than that. So every proof of an adapted model also checks
the adapter's own effect (`adapter_effect`): what the runtime's adapter adds (runtime with adapter − runtime base)
against what lorakit's adds (adapted − base), to within `ADAPTER_REL[dtype]` of lorakit's effect.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ..files.atomic import write_json

TOLERANCE = {"f32": 1e-4}  # max |Δlogit| allowed, per dtype of the exported weights
# The adapter's effect must be reproduced to within this fraction of it: max |runtime's Δ − lorakit's Δ| ≤
# ADAPTER_REL[dtype] × max |lorakit's Δ|, Δ = adapted − base logits. An artefact without the adapter errs by all of
# it (1.0), so any fraction under 1 catches one; the lossy ones leave room for rounding (docs/export.md, measured).
ADAPTER_REL = {"f32": 1e-2, "f16": 0.25, "bf16": 0.5, "q8_0": 0.5}
MISSING = 0.75  # an error past this fraction of the effect is reported as the adapter missing, not as rounding


@dataclass(frozen=True)
class Proof:
    """The comparison of an artefact's logits with lorakit's on the same inputs."""

    runtime: str
    artefact: str
    task: str
    dtype: str
    inputs: int
    positions: int
    max_abs_diff: float
    argmax_agree: int
    tolerance: float
    passed: bool
    what: str  # what the runtime ran: "merged" (base + adapters merged), "base", "model.gguf + adapter.gguf"
    tokenizer_agrees: bool | None = None  # the runtime's own tokenizer gave lorakit's token ids (None: not checked)
    greedy_tokens: int | None = None  # greedy continuation: tokens generated per side (None: not checked)
    greedy_agree: int | None = None  # of those, how many the runtime chose as lorakit did (ties within 2·tolerance too)
    tokenizer_texts: int | None = None  # how many texts the tokenizer check covered (proof texts + TOKENIZER_CHECK)
    adapter_effect: float | None = None  # max |lorakit's adapted − base logits| on the proof inputs (None: not checked)
    adapter_error: float | None = None  # max |(runtime adapted − runtime base) − (lorakit adapted − base)|
    adapter_tolerance: float | None = None  # ADAPTER_REL[dtype] × adapter_effect
    notes: tuple[str, ...] = ()  # why a check failed, in words

    def summary(self) -> str:
        """One line: `max |Δlogit| 3.1e-07 (tolerance 1e-04), argmax agrees 4/4: passed`."""
        verdict = "passed" if self.passed else "FAILED"
        extra = ""
        if self.tokenizer_agrees is not None:
            extra += ", tokenizer " + ("agrees" if self.tokenizer_agrees else "DIFFERS")
        if self.greedy_tokens is not None:
            extra += f", greedy tokens agree {self.greedy_agree}/{self.greedy_tokens}"
        if self.adapter_effect is not None:
            extra += (
                f", adapter effect {self.adapter_effect:.2g} reproduced to {self.adapter_error:.2g} "
                f"(tolerance {self.adapter_tolerance:.1e})"
            )
        what = f" [{self.what}]"
        notes = "".join(f"\n  {n}" for n in self.notes)
        return (
            f"{self.runtime}{what}: max |Δlogit| {self.max_abs_diff:.2g} (tolerance {self.tolerance:.1e}), "
            f"argmax agrees {self.argmax_agree}/{self.positions}{extra}: {verdict}{notes}"
        )

    def write(self, path: str | Path) -> None:
        """Write the proof as JSON (atomically)."""
        write_proofs(path, [self])

    def to_json(self) -> dict[str, object]:
        """The proof as a JSON object of the checks it made: a check not made (None) and no notes are left out.

        Examples:
            >>> p = compare(torch.zeros(1, 2), torch.zeros(1, 2), None, runtime="rt", artefact="a", task="seq-cls",
            ...             what="merged")
            >>> "greedy_tokens" in p.to_json(), p.to_json()["what"]
            (False, 'merged')
        """
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items() if v not in (None, ())}


def write_proofs(path: str | Path, proofs: list[Proof]) -> None:
    """Write proofs as JSON (atomically): `{"passed": all of them passed, "proofs": [each Proof.to_json()]}`."""
    write_json(path, {"passed": all(p.passed for p in proofs), "proofs": [p.to_json() for p in proofs]})


def write_unproven(path: str | Path, reason: str, *, artefacts: list[str], task: str, dtype: str) -> None:
    """Write the proof.json of an export nothing ran: `{"passed": null, "reason": why, ...what was written}`.

    Examples:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     write_unproven(f"{d}/proof.json", "llama-cpp-python is missing", artefacts=["model.gguf"],
        ...                    task="causal-lm", dtype="f16")
        ...     load(f"{d}/proof.json")["passed"] is None
        True
    """
    write_json(path, {"passed": None, "reason": reason, "artefacts": artefacts, "task": task, "dtype": dtype})


def with_adapter_effect(proof: Proof, effect: float, error: float) -> Proof:
    """`proof` with the adapter's own effect checked: `error` (see Proof.adapter_error) ≤ ADAPTER_REL × `effect`.

    An effect the dtype cannot resolve (the error is within the logits' tolerance, yet over ADAPTER_REL of the
    effect) fails too, saying so: the artefact may hold the adapter, but the proof cannot show it.

    Examples:
        >>> p = compare(torch.zeros(1, 2), torch.zeros(1, 2), None, runtime="rt", artefact="a", task="seq-cls",
        ...             what="merged")
        >>> with_adapter_effect(p, effect=0.5, error=1e-6).passed, with_adapter_effect(p, effect=0.5, error=0.5).passed
        (True, False)
    """
    tolerance = ADAPTER_REL[proof.dtype] * effect
    passed = error <= tolerance and effect > 0.0
    notes = proof.notes
    if effect == 0.0:
        notes += (
            "the adapter does not change lorakit's logits on the proof inputs: there is no effect to prove "
            "(an untrained adapter?); prove it on texts where it acts",
        )
    elif not passed and error > MISSING * effect:  # as far from lorakit's adapted model as the base is
        notes += (
            f"the artefact does not carry the adapter's effect: lorakit's adapter moves the logits by up to "
            f"{effect:.2g}, the runtime's differs from that by {error:.2g} (tolerance {tolerance:.1e})"
            + (f", though the logits alone were within {proof.dtype}'s tolerance" if error <= proof.tolerance else ""),
        )
    elif not passed and error <= proof.tolerance:
        notes += (
            f"the adapter's effect on the proof inputs (max |Δlogit| {effect:.2g}) is too small to prove at "
            f"{proof.dtype}: the runtime reproduces it only to {error:.2g}, within {proof.dtype}'s rounding "
            f"({proof.tolerance:.1e}); export it in f32, or prove it on texts where the adapter acts more",
        )
    elif not passed:
        notes += (
            f"the runtime does not reproduce the adapter's effect: lorakit's adapter moves the logits by up to "
            f"{effect:.2g}, the runtime's differs from that by {error:.2g} (tolerance {tolerance:.1e})",
        )
    return replace(
        proof,
        adapter_effect=effect,
        adapter_error=error,
        adapter_tolerance=tolerance,
        passed=proof.passed and passed,
        notes=notes,
    )


def compare(
    got: torch.Tensor,
    reference: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    runtime: str,
    artefact: str,
    task: str,
    what: str,
    dtype: str = "f32",
    tolerance: float | None = None,
) -> Proof:
    """The Proof of `got` against `reference` logits ((B, C) or (B, T, V)), over the positions `mask` marks real.

    Examples:
        >>> ref = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
        >>> compare(ref + 1e-6, ref, None, runtime="rt", artefact="a", task="seq-cls", what="merged").passed
        True
    """
    tolerance = TOLERANCE[dtype] if tolerance is None else tolerance
    if got.shape != reference.shape:
        raise ValueError(f"{artefact}: logits of shape {tuple(got.shape)}, expected {tuple(reference.shape)}")
    got, reference = got.float(), reference.float()
    if reference.dim() == 3 and mask is not None:  # causal-lm: only the real tokens' positions count
        keep = mask.bool()
        got, reference = got[keep], reference[keep]  # (N, V)
    diff = (got - reference).abs()
    max_diff = float(diff.max()) if diff.numel() else 0.0
    if not torch.isfinite(got).all():
        max_diff = float("inf")
    agree = int((got.argmax(-1) == reference.argmax(-1)).sum())
    positions = got.shape[0] if got.dim() == 2 else int(got[..., 0].numel())
    # Within the tolerance, an argmax can differ only where lorakit's own top two are within 2·tolerance (a tie);
    # any other disagreement fails, whatever the largest |Δlogit|.
    chosen = reference.gather(-1, got.argmax(-1, keepdim=True)).squeeze(-1)
    ties_only = bool((reference.max(-1).values - chosen <= 2 * tolerance).all()) if got.numel() else True
    passed = max_diff <= tolerance and ties_only
    return Proof(
        runtime=runtime,
        artefact=artefact,
        task=task,
        dtype=dtype,
        inputs=int(mask.shape[0]) if mask is not None else int(reference.shape[0]),
        positions=positions,
        max_abs_diff=max_diff,
        argmax_agree=agree,
        tolerance=tolerance,
        passed=passed,
        what=what,
    )


def check_onnx(
    onnx_file: Path,
    inputs: dict[str, torch.Tensor],
    reference: torch.Tensor,
    *,
    task: str,
    dtype: str = "f32",
    tolerance: float | None = None,
) -> Proof:
    """Load `onnx_file` in onnxruntime (CPU provider), run `inputs`, compare with lorakit's `reference` logits.

    `dtype` is the graph's weight type, recorded in the proof; `tolerance` (default TOLERANCE["f32"]) is absolute.
    """
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    feed = {name: tensor.numpy() for name, tensor in inputs.items()}
    (logits,) = session.run(["logits"], feed)
    return compare(
        torch.from_numpy(logits),
        reference,
        inputs.get("attention_mask"),
        runtime=f"onnxruntime {onnxruntime.__version__} (CPUExecutionProvider)",
        artefact=str(onnx_file.name),
        task=task,
        what="merged",  # one graph: the base with the adapters merged into it
        dtype=dtype,
        tolerance=TOLERANCE["f32"] if tolerance is None else tolerance,
    )


def load(path: str | Path) -> dict[str, object]:
    """proof.json as a dict: `{"passed": bool, "proofs": [dict, ...]}` (write_proofs), or an unproven export's
    `{"passed": None, "reason": str, ...}` (write_unproven)."""
    return dict(json.loads(Path(path).read_text(encoding="utf-8")))
