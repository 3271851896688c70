"""The proof that an exported artefact computes what lorakit does: the same inputs through both, compared.

A Proof records the runtime, the largest |Δlogit| over the real (unpadded) positions, how many argmax predictions
agree (per row for seq-cls, per position for causal-lm: the greedy next token), the tolerance and the verdict.
It is written as JSON beside the artefact and printed by the CLI.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..files.atomic import write_json

TOLERANCE = {"f32": 1e-4}  # max |Δlogit| allowed, per dtype of the exported weights


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
    what: str = ""  # which artefact or combination was run ("base", "base + adapter.gguf", "merged")
    tokenizer_agrees: bool | None = None  # the runtime's own tokenizer gave lorakit's token ids (None: not checked)
    greedy_tokens: int | None = None  # greedy continuation: tokens generated per side (None: not checked)
    greedy_agree: int | None = None  # of those, how many the runtime chose as lorakit did (ties within 2·tolerance too)

    def summary(self) -> str:
        """One line: `max |Δlogit| 3.1e-07 (tolerance 1e-04), argmax agrees 4/4: passed`."""
        verdict = "passed" if self.passed else "FAILED"
        extra = ""
        if self.tokenizer_agrees is not None:
            extra += ", tokenizer " + ("agrees" if self.tokenizer_agrees else "DIFFERS")
        if self.greedy_tokens is not None:
            extra += f", greedy tokens agree {self.greedy_agree}/{self.greedy_tokens}"
        what = f" [{self.what}]" if self.what else ""
        return (
            f"{self.runtime}{what}: max |Δlogit| {self.max_abs_diff:.2g} (tolerance {self.tolerance:.1e}), "
            f"argmax agrees {self.argmax_agree}/{self.positions}{extra}: {verdict}"
        )

    def write(self, path: str | Path) -> None:
        """Write the proof as JSON (atomically)."""
        write_proofs(path, [self])


def write_proofs(path: str | Path, proofs: list[Proof]) -> None:
    """Write proofs as JSON (atomically): `{"passed": all of them passed, "proofs": [each Proof as a dict]}`."""
    write_json(path, {"passed": all(p.passed for p in proofs), "proofs": [asdict(p) for p in proofs]})


def compare(
    got: torch.Tensor,
    reference: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    runtime: str,
    artefact: str,
    task: str,
    dtype: str = "f32",
    tolerance: float | None = None,
) -> Proof:
    """The Proof of `got` against `reference` logits ((B, C) or (B, T, V)), over the positions `mask` marks real.

    Examples:
        >>> ref = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
        >>> compare(ref + 1e-6, ref, None, runtime="rt", artefact="a", task="seq-cls").passed
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
        dtype=dtype,
        tolerance=TOLERANCE["f32"] if tolerance is None else tolerance,
    )


def load(path: str | Path) -> dict[str, object]:
    """Proofs written by `write_proofs` (or Proof.write), as a dict: `{"passed": bool, "proofs": [dict, ...]}`."""
    return dict(json.loads(Path(path).read_text(encoding="utf-8")))
