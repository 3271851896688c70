"""The portability report: what vLLM, llama.cpp, ONNX Runtime and PEFT refuse or compute differently for ONE adapter.

Read from the adapter's files only (`files.inspect.describe`: config and tensor shapes; no model is built), plus
the base's config.json when a model directory is given. Each rule cites the runtime's own code, doc or issue;
where a runtime's behaviour changed between releases the finding says so rather than guessing the version.

Severities, in rising order: "fine" (loads and computes what lorakit computes), "differs" (loads, but some
module's output is not lorakit's), "refused" (the runtime, or its converter, rejects the adapter).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..files.inspect import describe
from .gguf_adapter import LLAMA_ARCHITECTURES, read_model_config
from .gguf_arch import MOE
from .portability_experts import RULES as EXPERT_RULES
from .portability_experts import SGLANG_FIX, Experts, expert_rank, experts_of
from .portability_experts import hits as expert_hits

TARGETS = ("vllm", "llama.cpp", "onnx", "peft")  # the default report
ALL_TARGETS = (*TARGETS, "sglang")  # sglang: asked for by name; lorakit knows its expert-adapter rule only
SEVERITIES = ("fine", "differs", "refused")  # rising order; a target's verdict is its worst finding

# Where each rule comes from (the runtime's code, docs or tracker).
_VLLM = "https://github.com/vllm-project/vllm/blob/main/"
VLLM_PEFT_HELPER = _VLLM + "vllm/lora/peft_helper.py"  # _validate_features, validate_legal, scaling
VLLM_LORA_CONFIG = _VLLM + "vllm/config/lora.py"  # max_lora_rank: MaxLoRARanks = 1..512, default 16
VLLM_LORA_MODEL = _VLLM + "vllm/lora/lora_model.py"  # from_local_checkpoint: unexpected modules are an error
VLLM_EMBEDDINGS = _VLLM + "vllm/model_executor/models/llama.py"  # embedding_modules = {embed_tokens, lm_head}
VLLM_EMBEDDINGS_ISSUE = "https://github.com/vllm-project/vllm/issues/48934"  # a model without embedding_modules
VLLM_CLASSIFIER_PR = "https://github.com/vllm-project/vllm/pull/53555"  # modules_to_save = score / classifier
VLLM_RSLORA_PR = "https://github.com/vllm-project/vllm/pull/6909"  # alpha / sqrt(r)
_LLAMA_CPP = "https://github.com/ggml-org/llama.cpp/blob/master/"
LLAMA_CPP_CONVERT = _LLAMA_CPP + "convert_lora_to_gguf.py"  # only lora_A/lora_B; one adapter.lora.alpha
LLAMA_CPP_GRAPH = _LLAMA_CPP + "src/llama-graph.cpp"  # build_lora_mm: scale = alpha ? s * alpha / rank : s
LLAMA_CPP_TIED = "https://github.com/ggml-org/llama.cpp/issues/9065"  # lm_head LoRA on a tied model
LORAKIT_GGUF = "lorakit src/lorakit/export/gguf_adapter.py"
LORAKIT_ONNX = "lorakit docs/export.md (ONNX), src/lorakit/export/onnx.py"
PEFT_CONFIG = "https://github.com/huggingface/peft/blob/main/src/peft/config.py"  # unknown keys: warned, dropped
LORAKIT_PEFT = "lorakit tests/test_peft_interop.py"

_VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm/config/lora.py MaxLoRARanks
_VLLM_DEFAULT_RANK = 16
_VLLM_MODULES_TO_SAVE = ("classifier", "score")  # what PR 53555 accepts
_MERGE_FOR_VLLM = "lorakit merge --model BASE --adapter ADAPTER --out DIR, then serve DIR without --enable-lora"
_GGUF_MERGED = "lorakit export --format gguf (the adapter merged into the model)"
_GGUF_ADAPTER = "lorakit export --format gguf-adapter (each module's scale folded into its lora_b)"
_ONNX_MERGED = "lorakit export --format onnx (merged in fp32, proven against the unmerged model)"
_LORAKIT_KEYS = ("lorakit",)  # config keys lorakit may write that PEFT's LoraConfig does not know


@dataclass(frozen=True)
class Finding:
    """One thing a runtime does with this adapter: how bad, where, what it does, what fixes it, who says so."""

    target: str  # one of TARGETS
    severity: str  # one of SEVERITIES
    concerns: tuple[str, ...]  # the adapter's config keys and/or module names involved
    behaviour: str  # what the runtime does, in one sentence
    fix: str  # what lorakit offers, or "none"
    source: str  # the runtime's file, doc or issue

    def to_json(self) -> dict[str, Any]:
        """The finding as a JSON-ready dict."""
        d = asdict(self)
        d["concerns"] = list(self.concerns)
        return d


def verdict(findings: list[Finding]) -> str:
    """The worst severity among `findings` ("fine" for none)."""
    return max((f.severity for f in findings), key=SEVERITIES.index, default="fine")


def report(
    adapter: str | Path, targets: tuple[str, ...] | list[str] = TARGETS, model_dir: str | Path | None = None
) -> dict[str, list[Finding]]:
    """{target: findings} for the adapter at `adapter`; `model_dir`'s config.json adds the base's checks.

    Examples:
        >>> from torch import nn; import tempfile, lorakit as lk
        >>> m = lk.apply_lora(nn.Sequential(nn.Linear(4, 8)), lk.LoraConfig(rank=2), ["0"])
        >>> found = report(lk.save_adapters(m, tempfile.mkdtemp()))
        >>> {target: verdict(f) for target, f in found.items()}
        {'vllm': 'fine', 'llama.cpp': 'fine', 'onnx': 'fine', 'peft': 'fine'}
    """
    unknown = [t for t in targets if t not in ALL_TARGETS]
    if unknown:
        raise ValueError(f"unknown target(s) {unknown}: expected some of {', '.join(ALL_TARGETS)}")
    model = read_model_config(Path(model_dir)) if model_dir is not None else None
    return check(describe(adapter), targets, model)


def check(
    info: dict[str, Any], targets: tuple[str, ...] | list[str] = TARGETS, model: dict[str, Any] | None = None
) -> dict[str, list[Finding]]:
    """{target: findings} for an adapter described by `files.inspect.describe` (and its base's config.json)."""
    hits = _hits(_Adapter.of(info, model))
    out = {}
    for target in targets:
        found = []
        for rule, concerns, values in hits:
            where, severity, behaviour, fix, source = RULES[rule]
            if where in (target, "*"):
                found.append(
                    Finding(target, severity, concerns, behaviour.format(**values), fix.format(**values), source)
                )
        if not found:
            found.append(Finding(target, "fine", (), *ALL_FINE[target]))
        out[target] = found
    return out


@dataclass(frozen=True)
class _Adapter:
    """What the rules read, taken once from `describe`'s output."""

    layer_file: bool
    config: dict[str, Any]
    dora: bool
    modules_to_save: tuple[str, ...]
    rank: dict[str, int]  # module -> rank of its tensors
    kind: dict[str, str]  # module -> linear / embedding / conv1d / conv2d ...
    scaling: dict[str, float]  # module -> lorakit's scaling (where the config was readable)
    bias_tensors: tuple[str, ...]  # modules whose bias is saved with the adapter
    model: dict[str, Any] | None
    experts: Experts | None  # LoRA on fused expert weights (target_parameters)

    @classmethod
    def of(cls, info: dict[str, Any], model: dict[str, Any] | None) -> _Adapter:
        """Build from `describe`'s dict."""
        config = info.get("config") or {}
        rows = info["modules"]
        experts = experts_of(config, [m["module"] for m in rows])
        n_experts = (model or {}).get("num_experts") or (model or {}).get("num_local_experts")
        rank = {m["module"]: int(m["rank"]) for m in rows}
        kinds = {m["module"]: str(m["kind"]) for m in rows}
        for module in experts.modules if experts else ():  # a PEFT-key row's rank is lora_A's E·r rows
            if not kinds[module].startswith("parameter"):  # files.inspect's parameter rows give r itself
                rank[module] = expert_rank(rank[module], config, n_experts)
        return cls(
            layer_file=info["kind"].startswith("lorakit layer"),
            config=config,
            dora=bool(config.get("use_dora")),
            modules_to_save=tuple(info.get("modules_to_save") or config.get("modules_to_save") or ()),
            rank=rank,
            kind={m["module"]: str(m["kind"]) for m in rows},
            scaling={m["module"]: float(m["scaling"]) for m in rows if m.get("scaling") is not None},
            bias_tensors=tuple(
                [m["module"] for m in rows if m.get("bias")]
                + [x["name"] for x in info["extra_tensors"] if x["name"].endswith(".bias")]
            ),
            model=model,
            experts=experts,
        )

    def of_kind(self, *prefixes: str) -> tuple[str, ...]:
        """The LoRA modules whose kind starts with one of `prefixes`."""
        return tuple(m for m, k in self.kind.items() if k.startswith(prefixes))

    def named(self, *last: str) -> tuple[str, ...]:
        """The LoRA modules whose last name part is one of `last`."""
        return tuple(m for m in self.kind if m.rpartition(".")[2] in last)

    def scaled_otherwise(self, per_module: bool) -> dict[str, tuple[float, float]]:
        """{module: (runtime's scale, lorakit's)} where a runtime with one alpha computes another scale.

        per_module: the runtime divides the ONE lora_alpha by each module's own rank (llama.cpp); otherwise it
        uses one lora_alpha / r for every module (vLLM without rank/alpha_pattern).
        """
        alpha, r = self.config.get("lora_alpha"), self.config.get("r")
        if not isinstance(alpha, (int, float)) or not isinstance(r, int) or r <= 0:
            return {}
        rslora = bool(self.config.get("use_rslora"))
        out = {}
        for module, ours in self.scaling.items():
            rank = self.rank[module] if per_module else r
            theirs = alpha / rank if per_module or not rslora else alpha / math.sqrt(rank)
            if not math.isclose(theirs, ours, rel_tol=1e-6):
                out[module] = (theirs, ours)
        return out


# Every rule: id -> (target, severity, what the runtime does (a template over the detector's values), the fix
# lorakit offers or "none", the source). docs/export.md's "Portability report" table lists the same rules.
RULES: dict[str, tuple[str, str, str, str, str]] = {
    "vllm.dora": (
        "vllm", "refused", 'PEFTHelper refuses DoRA adapters ("vLLM does not yet support DoRA").',
        _MERGE_FOR_VLLM, VLLM_PEFT_HELPER,
    ),
    "vllm.modules_to_save": (
        "vllm", "refused", "PEFTHelper refuses full-weight modules_to_save (releases with PR 53555 accept a "
        'classification head, "classifier" or "score", and nothing else).', _MERGE_FOR_VLLM,
        f"{VLLM_PEFT_HELPER}, {VLLM_CLASSIFIER_PR}",
    ),
    "vllm.classifier": (
        "vllm", "fine", "vLLM releases with PR 53555 load the classification head; older ones refuse any "
        "modules_to_save (PEFTHelper).", _MERGE_FOR_VLLM, f"{VLLM_CLASSIFIER_PR}, {VLLM_PEFT_HELPER}",
    ),
    "vllm.bias": (
        "vllm", "refused", 'PEFTHelper.validate_legal refuses bias != "none" ("Adapter bias is not supported"; '
        "older releases needed --enable-lora-bias).", _MERGE_FOR_VLLM, VLLM_PEFT_HELPER,
    ),
    "vllm.conv": (
        "vllm", "refused", "vLLM's LoRA layers are linear, embedding and MoE layers: a module the served model does "
        'not list as a LoRA module is an error at load ("expected target modules in ...").', _MERGE_FOR_VLLM,
        VLLM_LORA_MODEL,
    ),
    "vllm.rank": (
        "vllm", "refused", "rank {rank} is over the default --max-lora-rank 16: refused unless the server is started "
        "with --max-lora-rank {fits} (allowed: " + ", ".join(map(str, _VLLM_RANKS)) + ").",
        "start vLLM with --max-lora-rank {fits}; or " + _MERGE_FOR_VLLM, VLLM_LORA_CONFIG,
    ),
    "vllm.rank_over_512": (
        "vllm", "refused", "rank {rank} is over vLLM's largest --max-lora-rank, 512.", _MERGE_FOR_VLLM,
        VLLM_LORA_CONFIG,
    ),
    "vllm.embeddings": (
        "vllm", "fine", "LoRA on embed_tokens / lm_head is applied for model classes that list them in "
        "embedding_modules (LlamaForCausalLM does); a class without them refuses the adapter (vllm#48934).", "none",
        f"{VLLM_EMBEDDINGS}, {VLLM_EMBEDDINGS_ISSUE}",
    ),
    "vllm.patterns": (
        "vllm", "differs", "vLLM releases whose PEFTHelper predates get_rank_and_scaling drop rank_pattern / "
        "alpha_pattern and scale these modules by {theirs:g} instead of {ours:g}; newer releases honour the "
        "patterns: check yours.", _MERGE_FOR_VLLM, VLLM_PEFT_HELPER,
    ),
    "vllm.rslora": (
        "vllm", "fine", "vLLM scales rsLoRA adapters by lora_alpha / sqrt(r), as lorakit does.", "none",
        f"{VLLM_PEFT_HELPER}, {VLLM_RSLORA_PR}",
    ),
    "llama.cpp.dora": (
        "llama.cpp", "refused", "llama.cpp computes W x + scale * B A x only, with no DoRA magnitude; "
        'convert_lora_to_gguf.py stops at the lora_magnitude_vector tensors ("Not a lora_A or lora_B tensor").',
        _GGUF_MERGED, f"{LLAMA_CPP_CONVERT}, {LLAMA_CPP_GRAPH}",
    ),
    "llama.cpp.modules_to_save": (
        "llama.cpp", "refused", "a llama.cpp adapter holds only lora_a/lora_b pairs: convert_lora_to_gguf.py stops "
        'at full weights ("Not a lora_A or lora_B tensor").', _GGUF_MERGED, LLAMA_CPP_CONVERT,
    ),
    "llama.cpp.bias": (
        "llama.cpp", "refused", "a llama.cpp adapter holds no biases: convert_lora_to_gguf.py stops at them.",
        _GGUF_MERGED, LLAMA_CPP_CONVERT,
    ),
    "llama.cpp.conv": (
        "llama.cpp", "refused", "llama.cpp's LoRA adapts the 2-D weight matrices of the text models it converts: "
        "a conv layer's LoRA has no GGUF tensor to attach to.", "none", LLAMA_CPP_CONVERT,
    ),
    "llama.cpp.scale": (
        "llama.cpp", "differs", "llama.cpp has ONE adapter.lora.alpha and scales each module by alpha / rank: "
        "these modules get {theirs:g} instead of {ours:g}.", f"{_GGUF_ADAPTER}; or {_GGUF_MERGED}",
        f"{LLAMA_CPP_GRAPH}, {LLAMA_CPP_CONVERT}",
    ),
    "llama.cpp.tied_lm_head": (
        "llama.cpp", "refused", "the base ties lm_head to the embeddings, so llama.cpp has no output tensor to "
        'adapt: convert_lora_to_gguf.py raises "lm_head is present in adapter, but is ignored in base model".',
        "none", f"{LLAMA_CPP_CONVERT}, {LLAMA_CPP_TIED}",
    ),
    "llama.cpp.embeddings": (
        "llama.cpp", "fine", "llama.cpp adapts token_embd and output (token_embd's lora_a stored transposed), "
        "but not an lm_head tied to the embeddings (llama.cpp#9065){unchecked}.", "none",
        f"{LLAMA_CPP_CONVERT}, {LLAMA_CPP_TIED}",
    ),
    "llama.cpp.architecture": (
        "llama.cpp", "refused", "lorakit's gguf-adapter writer covers " + ", ".join(LLAMA_ARCHITECTURES) + " only "
        "(its merged-model writer also " + ", ".join(MOE) + "); llama.cpp's own convert_lora_to_gguf.py converts "
        "what convert_hf_to_gguf.py knows.", f"{_GGUF_MERGED} for " + ", ".join(MOE), LORAKIT_GGUF,
    ),
    "onnx.dora": (
        "onnx", "fine", "the merged weights carry DoRA exactly (W' = m (W + s B A) / ||W + s B A||, computed once).",
        _ONNX_MERGED, LORAKIT_ONNX,
    ),
    "onnx.modules_to_save": (
        "onnx", "fine", "the saved full weights replace the base's in the exported graph.", _ONNX_MERGED, LORAKIT_ONNX,
    ),
    "onnx.conv": (
        "onnx", "fine", "a conv layer's LoRA merges into its weight like a linear one's (lorakit export --format "
        "onnx itself covers seq-cls and causal-lm transformers models).", _ONNX_MERGED, LORAKIT_ONNX,
    ),
    "peft.lorakit_keys": (
        "peft", "fine", 'PEFT drops the config key(s) {keys} with an "Unexpected keyword arguments" warning; they '
        "carry lorakit's metadata only.", "none", PEFT_CONFIG,
    ),
    "layer_file": (
        "*", "refused", "a lorakit layer file holds one layer's LoRA, not a model adapter: no runtime loads it.",
        "none", "lorakit src/lorakit/files/layer_file.py",
    ),
    **EXPERT_RULES,
}  # fmt: skip
# what a target's report says when no rule found anything
ALL_FINE: dict[str, tuple[str, str, str]] = {
    "vllm": ("nothing in this adapter is refused or scaled differently by vLLM's LoRA loader (--enable-lora).",
             "none", VLLM_PEFT_HELPER),
    "llama.cpp": ("llama.cpp computes what lorakit computes for every module (one alpha, lora_a/lora_b only).",
                  "none", f"{LLAMA_CPP_CONVERT}, {LLAMA_CPP_GRAPH}"),
    "onnx": ("ONNX Runtime has no adapters: the merged graph computes what lorakit computes.", _ONNX_MERGED,
             LORAKIT_ONNX),
    "peft": ("plain PEFT format: PeftModel.from_pretrained loads it and computes what lorakit computes.", "none",
             LORAKIT_PEFT),
    "sglang": ("no LoRA on fused expert weights; lorakit checks SGLang for expert adapters only (its other limits "
               "are not checked here).", "none", SGLANG_FIX),
}  # fmt: skip


def _hits(a: _Adapter) -> list[tuple[str, tuple[str, ...], dict[str, Any]]]:
    """(rule id, concerns, template values) of every rule this adapter triggers, for every target."""
    if a.layer_file:
        return [("layer_file", ("(layer file)",), {})]
    out: list[tuple[str, tuple[str, ...], dict[str, Any]]] = []

    def hit(rule: str, concerns: tuple[str, ...], **values: Any) -> None:
        out.append((rule, concerns, values))

    conv = a.of_kind("conv")
    bias = ("bias", *a.bias_tensors) if a.config.get("bias", "none") != "none" or a.bias_tensors else ()
    if a.dora:
        for rule in ("vllm.dora", "llama.cpp.dora", "onnx.dora"):
            hit(rule, ("use_dora",))
    if a.modules_to_save:
        head_only = all(m.rpartition(".")[2] in _VLLM_MODULES_TO_SAVE for m in a.modules_to_save)
        for rule in ("vllm.classifier" if head_only else "vllm.modules_to_save", "llama.cpp.modules_to_save",
                     "onnx.modules_to_save"):  # fmt: skip
            hit(rule, ("modules_to_save", *a.modules_to_save))
    if bias:
        hit("vllm.bias", bias)
    if a.bias_tensors:  # llama.cpp's converter trips on the tensors, not on the config field
        hit("llama.cpp.bias", a.bias_tensors)
    for rule in ("vllm.conv", "llama.cpp.conv", "onnx.conv") if conv else ():
        hit(rule, conv)
    rank = max(a.rank.values(), default=0)
    if rank > _VLLM_DEFAULT_RANK:
        fits = [n for n in _VLLM_RANKS if n >= rank]
        over = tuple(m for m, r in a.rank.items() if r > _VLLM_DEFAULT_RANK)
        hit("vllm.rank" if fits else "vllm.rank_over_512", over, rank=rank, fits=fits[0] if fits else None)
    embeddings = a.named("embed_tokens", "lm_head", "wte", "word_embeddings")
    if embeddings:
        hit("vllm.embeddings", embeddings)
    wrong = a.scaled_otherwise(per_module=False)
    if (a.config.get("rank_pattern") or a.config.get("alpha_pattern")) and wrong:
        keys = tuple(k for k in ("rank_pattern", "alpha_pattern") if a.config.get(k))
        hit("vllm.patterns", (*keys, *wrong), **_first(wrong))
    elif a.config.get("use_rslora"):
        hit("vllm.rslora", ("use_rslora",))
    wrong = a.scaled_otherwise(per_module=True)
    if wrong:
        keys = tuple(k for k in ("use_rslora", "alpha_pattern") if a.config.get(k))
        hit("llama.cpp.scale", (*keys, *wrong), **_first(wrong))
    heads = a.named("lm_head")
    if heads and a.model and a.model.get("tie_word_embeddings", False):
        hit("llama.cpp.tied_lm_head", heads)
    elif heads or a.named("embed_tokens"):
        unchecked = "" if a.model else "; pass --model to check the base"
        hit("llama.cpp.embeddings", heads + a.named("embed_tokens"), unchecked=unchecked)
    arch = ((a.model or {}).get("architectures") or [None])[0]
    if a.model is not None and arch not in LLAMA_ARCHITECTURES:
        hit("llama.cpp.architecture", (f"architectures={arch}",))
    if a.experts is not None:
        out += expert_hits(a.experts)
    keys = tuple(k for k in _LORAKIT_KEYS if k in a.config)
    if keys:
        hit("peft.lorakit_keys", keys, keys=", ".join(keys))
    return out


def _first(wrong: dict[str, tuple[float, float]]) -> dict[str, float]:
    """The runtime's and lorakit's scale of the first module scaled otherwise, for the message."""
    theirs, ours = next(iter(wrong.values()))
    return {"theirs": theirs, "ours": ours}


def render(found: dict[str, list[Finding]]) -> str:
    """The report as text: per target its verdict, then each finding with its fix and source."""
    lines = []
    for target, findings in found.items():
        lines.append(f"portability: {target}: {verdict(findings)}")
        for f in findings:
            concerns = _short(f.concerns)
            lines.append(f"  {f.severity:<8} {concerns + ': ' if concerns else ''}{f.behaviour}")
            lines.append(f"           fix: {f.fix}")
            lines.append(f"           source: {f.source}")
    return "\n".join(lines)


def _short(names: tuple[str, ...], keep: int = 3) -> str:
    """Up to `keep` names, then how many more."""
    more = f" (+{len(names) - keep} more)" if len(names) > keep else ""
    return ", ".join(names[:keep]) + more
