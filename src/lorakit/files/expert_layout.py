"""PEFT's file layouts for LoRA on a parameter (its `target_parameters`), as tensors: no model involved.

A 2-D parameter P (out, in) is adapted like a Linear: lora_A (r, in), lora_B (out, r), in every PEFT version.
A 3-D expert parameter P (E, d1, d2) gets one rank-r pair per expert, which PEFT stores flat:

    lora_A.weight (E*r, in)    row e*r + j is A_e[j]           (expert-major)
    lora_B.weight (out, r*E)   column j*E + e is B_e[:, j]      (expert fastest: asymmetric, as PEFT has it)
    delta_e = scaling * B_e @ A_e   (out, in)

What in and out are changed in PEFT 0.19 (peft#3165):

    CURRENT (PEFT >= 0.19)  in, out = d2, d1, laid into P[e] as (out, in): the owner computes F.linear(x, P[e]);
                            in, out = d1, d2, laid in as (in, out), where the owner `is_transposed` (x @ P[e])
    LEGACY  (PEFT <= 0.18)  in, out = d1, d2 always, laid in as (in, out): for an owner that is not transposed,
                            A maps from the output side. The same delta, exactly: B_e = A_old_e^T, A_e = B_old_e^T

lorakit holds the per-expert factors A (E, r, in), B (E, out, r) in the CURRENT sense. `peft_version` in
adapter_config.json (PEFT writes it since 0.18) tells the layouts apart; without it the shapes do, unless d1 == d2,
where the file is refused rather than guessed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import Tensor

from ..errors import LoraFileError

CURRENT = "PEFT >= 0.19"
LEGACY = "PEFT <= 0.18"
# the peft_version lorakit writes beside target_parameters: the first PEFT whose layout its files are in, so that a
# reader telling the layouts apart by version (lorakit, any other) reads them right, a square expert weight included
WRITTEN_AS = "0.19.0"


@dataclass(frozen=True)
class ParamGeometry:
    """An adapted parameter as its file layout sees it: its shape, and whether its owner computes x @ P[e]."""

    shape: tuple[int, ...]  # (out, in) or (E, d1, d2)
    transposed: bool = False  # the owner's `is_transposed` (gpt-oss experts): P[e] is (in, out)

    def __post_init__(self) -> None:
        if len(self.shape) not in (2, 3):
            raise ValueError(f"LoRA on a parameter takes a 2-D or 3-D one; got shape {self.shape}")

    @property
    def experts(self) -> int:
        """E for a 3-D parameter, 1 for a 2-D one."""
        return self.shape[0] if len(self.shape) == 3 else 1

    def in_out(self, layout: str = CURRENT) -> tuple[int, int]:
        """(in, out) of each expert's LoRA pair in `layout`."""
        if len(self.shape) == 2:
            return self.shape[1], self.shape[0]
        _, d1, d2 = self.shape
        return (d1, d2) if self.transposed or layout == LEGACY else (d2, d1)

    def converts(self) -> bool:
        """Whether the LEGACY layout differs from the CURRENT one for this parameter (3-D, not transposed)."""
        return len(self.shape) == 3 and not self.transposed


def file_shapes(geometry: ParamGeometry, rank: int, layout: str = CURRENT) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shapes of lora_A.weight and lora_B.weight in `layout`.

    Examples:
        >>> file_shapes(ParamGeometry((4, 24, 16)), 2)  # Qwen3-MoE gate_up_proj (E, 2I, H): in H, out 2I
        ((8, 16), (24, 8))
        >>> file_shapes(ParamGeometry((4, 24, 16)), 2, LEGACY)
        ((8, 24), (16, 8))
    """
    d_in, d_out = geometry.in_out(layout)
    return (geometry.experts * rank, d_in), (d_out, rank * geometry.experts)


def expert_shapes(geometry: ParamGeometry, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shapes of lorakit's own factors: A (r, in), B (out, r) for 2-D; A (E, r, in), B (E, out, r) for 3-D."""
    d_in, d_out = geometry.in_out()
    if len(geometry.shape) == 2:
        return (rank, d_in), (d_out, rank)
    return (geometry.experts, rank, d_in), (geometry.experts, d_out, rank)


def to_experts(
    A: Tensor, B: Tensor, geometry: ParamGeometry, rank: int, layout: str = CURRENT
) -> tuple[Tensor, Tensor]:
    """lorakit's factors (`expert_shapes`) from a file's rank-`rank` lora_A.weight and lora_B.weight in `layout`.

    Raises ValueError where the shapes are not that (`detect` says why, naming the parameter).

    Examples:
        >>> import torch
        >>> g = ParamGeometry((4, 24, 16))
        >>> A, B = to_experts(torch.zeros(8, 16), torch.zeros(24, 8), g, 2)
        >>> tuple(A.shape), tuple(B.shape)
        ((4, 2, 16), (4, 24, 2))
    """
    if (tuple(A.shape), tuple(B.shape)) != file_shapes(geometry, rank, layout):
        raise ValueError(
            f"lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} are not a rank-{rank} {layout} adapter of a "
            f"{geometry.experts}-expert parameter of shape {geometry.shape}"
        )
    if len(geometry.shape) == 2:
        return A, B
    E = geometry.experts
    A_e = A.reshape(E, rank, A.shape[1])  # (E, r, in_file)
    B_e = B.reshape(B.shape[0], rank, E).permute(2, 0, 1)  # (E, out_file, r)
    if layout == LEGACY and geometry.converts():
        return B_e.transpose(1, 2), A_e.transpose(1, 2)  # A_e = B_old_e^T (r, d2), B_e = A_old_e^T (d1, r)
    return A_e, B_e


def from_experts(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """The CURRENT layout's lora_A.weight and lora_B.weight of lorakit's factors (inverse of `to_experts`).

    Examples:
        >>> import torch
        >>> A, B = torch.randn(4, 2, 16), torch.randn(4, 24, 2)
        >>> a, b = from_experts(A, B)
        >>> tuple(a.shape), tuple(b.shape), bool((to_experts(a, b, ParamGeometry((4, 24, 16)), 2)[1] == B).all())
        ((8, 16), (24, 8), True)
    """
    if A.dim() == 2:
        return A, B
    E, rank, d_in = A.shape
    return A.reshape(E * rank, d_in), B.permute(1, 2, 0).reshape(B.shape[1], rank * E)


def layout_of_version(version: object) -> str | None:
    """The layout a PEFT version writes (`peft_version` in adapter_config.json); None where it does not say.

    A source build's "0.18.0@<commit>" reads as 0.18.0; a pre-release of 0.19.0 may hold either layout (None).

    Examples:
        >>> layout_of_version("0.18.1"), layout_of_version("0.21.2"), layout_of_version("0.19.0.dev0")
        ('PEFT <= 0.18', 'PEFT >= 0.19', None)
    """
    if not isinstance(version, str):
        return None
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?(.*)", version.partition("@")[0].strip())
    if m is None:
        return None
    major, minor, patch = int(m[1]), int(m[2]), int(m[3] or 0)
    if (major, minor) < (0, 19):
        return LEGACY
    if (major, minor, patch) == (0, 19, 0) and m[4]:  # 0.19.0.dev0, 0.19.0rc1: the change landed during them
        return None
    return CURRENT


def detect(
    param: str, geometry: ParamGeometry, rank: int, shapes: tuple[tuple[int, ...], tuple[int, ...]], version: object
) -> str:
    """The layout of one parameter's lora_A/lora_B (`shapes`, as read) for a model parameter of `geometry`.

    `version` is the adapter's `peft_version` (absent: None). Raises LoraFileError naming `param` and the shapes
    where the file fits no layout for this parameter (another expert count, rank or shape), where its shapes
    contradict its version, or where neither its version nor its shapes tell the layouts apart.
    """
    said = layout_of_version(version)
    if not geometry.converts():  # 2-D, or an owner computing x @ P[e]: both layouts are one
        fits = [CURRENT] if shapes == file_shapes(geometry, rank) else []
    else:
        fits = [layout for layout in (CURRENT, LEGACY) if shapes == file_shapes(geometry, rank, layout)]
    expected = " or ".join(
        f"{layout}: lora_A {a}, lora_B {b}"
        for layout in ((CURRENT, LEGACY) if geometry.converts() else (CURRENT,))
        for a, b in [file_shapes(geometry, rank, layout)]
    )
    found = f"lora_A {shapes[0]}, lora_B {shapes[1]}"
    if not fits:
        raise LoraFileError(
            f"parameter {param!r} of shape {geometry.shape} ({geometry.experts} experts, rank {rank}) does not fit "
            f"the adapter's tensors: found {found}; expected {expected}"
        )
    if len(fits) == 1:
        if said is not None and geometry.converts() and said != fits[0]:
            raise LoraFileError(
                f"parameter {param!r}: peft_version {version!r} writes the {said} layout, but the tensors "
                f"({found}) are in the {fits[0]} layout; refusing to guess which is right"
            )
        return fits[0]
    if said is None:
        raise LoraFileError(
            f"parameter {param!r} of shape {geometry.shape}: its tensors ({found}) fit both the {CURRENT} and the "
            f"{LEGACY} layout, which differ in meaning, and adapter_config.json's peft_version ({version!r}) does "
            "not say which; set peft_version to the PEFT version that saved the adapter"
        )
    return said
