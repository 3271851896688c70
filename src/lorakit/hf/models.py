"""Hugging Face transformers models and tokenizers, from a model directory (a hub id is resolved to one first:
hub.resolve_model).

    model, tokenizer = load("models/tiny-llama", "causal-lm")
    model, tokenizer = load("models/minilm", "seq-cls", id2label={0: "neg", 1: "pos"})

A classification head is new, so it trains in full beside LoRA and is saved with the adapter under
PEFT's `modules_to_save` convention (`classifier` for BERT-style encoders, `score` for decoders).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import LoraError, LoraFileError
from ..files.hub_cache import snapshot_of
from .generation import generate as generate  # hf.generate, as before
from .task_fit import TaskMismatchError as TaskMismatchError  # hf.TaskMismatchError beside the other load errors
from .task_fit import check_config_fit, check_id2label, check_task_fit

if TYPE_CHECKING:  # transformers is the optional `hf` extra: imported where used, at run time
    from transformers import PreTrainedModel, PreTrainedTokenizerBase
    from transformers.models.auto.auto_factory import _BaseAutoModelClass

    from ..ui.progress import Progress

TASKS = ("causal-lm", "seq-cls")  # the model tasks: the one list the data, the jobs and the CLI use
ALIGN_TASKS = ("dpo", "grpo")  # stages after SFT: preference pairs, sampled completions; a causal LM either way
TRAIN_TASKS = (*TASKS, *ALIGN_TASKS)  # what `finetune` trains
HEAD_NAMES = ("classifier", "score")  # PEFT's SEQ_CLS modules_to_save
TASK_FILE = "lorakit_task.json"  # written beside an adapter: task, labels, base model
PEFT_TASK_TYPES = {"causal-lm": "CAUSAL_LM", "seq-cls": "SEQ_CLS"}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # a single file, or shards listed in its .index.json
WEIGHT_FILES = tuple(f for w in WEIGHTS for f in (w, f"{w}.index.json"))


def model_task(task: str) -> str:
    """The model task that training `task` loads and saves: "causal-lm" for dpo and grpo, else `task` itself."""
    return "causal-lm" if task in ALIGN_TASKS else task


class ModelDirError(LoraFileError):
    """A path that is not a usable local Hugging Face model directory."""


class RemoteCodeError(ModelDirError):
    """A model that needs its own Python code, loaded without trust_remote_code; `detail` says which."""

    param = "trust_remote_code"

    def __init__(self, path: Path) -> None:
        self.detail = f"{path}: this model needs its own Python code (config.json has auto_map)"
        super().__init__(
            f"{self.detail}; lorakit runs it only with trust_remote_code=True, after you have read that code"
        )


class OutputDirNotEmpty(LoraError, FileExistsError):
    """An output path that exists and is not an empty directory (lorakit writes only into new or empty ones)."""


def check_output_dir(path: str | Path) -> Path:
    """The path, if it is new or an empty directory; else OutputDirNotEmpty. Nothing is created.

    Examples:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp()); _ = (d / "weights.bin").write_bytes(b"")
        >>> check_output_dir(d / "merged") == d / "merged"
        True
        >>> check_output_dir(d)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        lorakit.hf.models.OutputDirNotEmpty: ...: exists and is not an empty directory
    """
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise OutputDirNotEmpty(f"{path}: exists and is not an empty directory")
    return path


def check_model_dir(path: str | Path) -> Path:
    """The path as a model directory (config.json + weights), or a ModelDirError saying what is missing."""
    path = Path(path)
    if not path.exists():
        shaped = not path.is_absolute() and len(path.parts) == 2  # ORG/NAME: perhaps a hub id, given unresolved
        hint = " (a hub id ORG/NAME is resolved to its directory by lorakit.hf.hub.resolve_model)" if shaped else ""
        raise ModelDirError(f"{path}: no such directory{hint}")
    if not path.is_dir():
        raise ModelDirError(f"{path}: not a directory; expected a Hugging Face model directory with config.json")
    if not (path / "config.json").is_file():
        raise ModelDirError(
            f"{path}: not a Hugging Face model directory (no config.json); "
            "save one with model.save_pretrained(DIR) and tokenizer.save_pretrained(DIR)"
        )
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        raise ModelDirError(f"{path}: has config.json but no weights (expected one of {', '.join(WEIGHT_FILES)})")
    return path


def check_task(path: str | Path, task: str, *, trust_remote_code: bool = False) -> None:
    """What the model's config alone says about fine-tuning it for `task` (task_fit.check_config_fit), before the
    tokenizer and the data: TaskMismatchError for an encoder as a causal-lm; ModelDirError for a bad directory."""
    import transformers

    path = check_model_dir(path)
    _auto_class(task)  # a ValueError for an unknown task
    _check_remote_code(path, trust_remote_code)
    try:
        config = transformers.AutoConfig.from_pretrained(
            path, local_files_only=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, KeyError) as e:
        raise ModelDirError(f"{path}: transformers could not read its config.json ({_first_line(e)})") from None
    check_config_fit(path, config, task)


def _auto_class(task: str) -> type[_BaseAutoModelClass]:
    """transformers' Auto class of `task`; ValueError for another task."""
    import transformers

    if task not in TASKS:
        raise ValueError(f"task={task!r} is invalid: expected one of {', '.join(TASKS)}")
    return transformers.AutoModelForCausalLM if task == "causal-lm" else transformers.AutoModelForSequenceClassification


def load_tokenizer(path: str | Path, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer saved in a model directory, with a pad token (EOS stands in where there is none)."""
    import transformers

    path = check_model_dir(path)
    try:
        tok = transformers.AutoTokenizer.from_pretrained(
            path, local_files_only=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, TypeError) as e:
        raise ModelDirError(
            f"{path}: no usable tokenizer ({_first_line(e)}); save one with tokenizer.save_pretrained(DIR)"
        ) from None
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ModelDirError(f"{path}: the tokenizer has neither a pad token nor an EOS token to pad with")
        tok.pad_token = tok.eos_token  # padded positions are masked out of attention and loss
    return tok


def load_model(
    path: str | Path,
    task: str,
    *,
    id2label: Mapping[int, str] | None = None,
    dtype: str | None = None,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """A causal-LM or sequence-classification model from a local directory; seq-cls needs `id2label`.

    Examples:
        >>> load_model("/nonexistent", "causal-lm")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        lorakit.hf.models.ModelDirError: /nonexistent: no such directory
    """
    path = check_model_dir(path)
    auto = _auto_class(task)
    kwargs: dict[str, Any] = {"local_files_only": True, "trust_remote_code": trust_remote_code}
    if dtype is not None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is invalid: expected one of {', '.join(DTYPES)}")
        kwargs["dtype"] = DTYPES[dtype]
    if task == "seq-cls":
        if not id2label:
            raise ValueError("a seq-cls model needs id2label (the label names, by class id)")
        id2label = {int(i): str(name) for i, name in id2label.items()}
        kwargs.update(num_labels=len(id2label), id2label=id2label, label2id={v: k for k, v in id2label.items()})
    _check_remote_code(path, trust_remote_code)
    try:
        model, info = auto.from_pretrained(path, output_loading_info=True, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise ModelDirError(f"{path}: transformers could not load it as a {task} model ({_first_line(e)})") from None
    check_task_fit(path, model, task, info.get("missing_keys", ()))
    if task == "seq-cls" and getattr(model.config, "pad_token_id", None) is None:
        # decoders classify from the last non-pad token, so they must know the pad id
        model.config.pad_token_id = _pad_id_from_dir(path)
    return model


def load(
    path: str | Path,
    task: str,
    *,
    id2label: Mapping[int, str] | None = None,
    dtype: str | None = None,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) from a local model directory; the model's pad id follows the tokenizer's."""
    tok = load_tokenizer(path, trust_remote_code=trust_remote_code)
    model = load_model(path, task, id2label=id2label, dtype=dtype, trust_remote_code=trust_remote_code)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id
    return model, tok


def _check_remote_code(path: Path, trust_remote_code: bool) -> None:
    """RemoteCodeError if the model ships its own code (auto_map) and it is not trusted."""
    config = _read_json(path / "config.json")
    if config.get("auto_map") and not trust_remote_code:
        raise RemoteCodeError(path)


def _pad_id_from_dir(path: Path) -> int | None:
    """The pad id of the directory's tokenizer; None without a usable one."""
    try:
        tok = load_tokenizer(path)
    except ModelDirError:
        return None
    return tok.pad_token_id


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a file; ModelDirError for anything else."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # RecursionError: nested deep
        raise ModelDirError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelDirError(f"{path}: expected a JSON object")
    return data


def _first_line(e: BaseException) -> str:
    """The first line of an error's message (transformers' run to many), else its type."""
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def head_names(model: nn.Module) -> list[str]:
    """The classification head(s) of a seq-cls model: what trains in full and is saved via modules_to_save."""
    names = [n for n in HEAD_NAMES if isinstance(getattr(model, n, None), nn.Module)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no classification head named {' or '.join(HEAD_NAMES)}")
    return names


# -- what an adapter directory says about its task ---------------------------------------------------


def write_task_file(
    adapter_dir: str | Path,
    task: str,
    *,
    base_model: str | Path | None = None,
    id2label: Mapping[int, str] | None = None,
    max_length: int | None = None,
) -> Path:
    """Record the task (and label names) beside an adapter; also set PEFT's task_type in its config.

    A `base_model` in the hub cache (a snapshot directory) is recorded as its hub id, with its commit as
    `base_revision`.
    """
    from ..files import peft_format
    from ..files.atomic import locked_dir, write_json

    adapter_dir = Path(adapter_dir)
    hub_base = snapshot_of(base_model)  # a base from the hub cache is named by its id and commit, not the cache path
    info: dict[str, Any] = {
        "task": task,
        "base_model": hub_base.repo_id if hub_base else str(base_model) if base_model else None,
        "max_length": max_length,
    }
    if hub_base:
        info["base_revision"] = hub_base.commit
    if id2label is not None:
        info["id2label"] = {str(i): str(v) for i, v in sorted(id2label.items())}
    with locked_dir(adapter_dir):  # the config is read, changed and rewritten: no save in between
        write_json(adapter_dir / TASK_FILE, info)
        config_path = adapter_dir / peft_format.CONFIG_NAME
        config = _read_json(config_path)
        config["task_type"] = PEFT_TASK_TYPES[task]
        write_json(config_path, config)
    return adapter_dir / TASK_FILE


def read_task(adapter_dir: str | Path) -> tuple[str, dict[int, str] | None]:
    """(task, id2label) of an adapter: from lorakit's task file, else PEFT's task_type and the head's shape."""
    from ..files import peft_format
    from ..files import safetensors as safetensors_io

    adapter_dir = Path(adapter_dir)
    if (adapter_dir / TASK_FILE).is_file():
        info = _read_json(adapter_dir / TASK_FILE)
        task = info.get("task")
        if task not in TASKS:
            raise LoraFileError(f"{adapter_dir / TASK_FILE}: task {task!r} is not one of {', '.join(TASKS)}")
        return task, check_id2label(adapter_dir / TASK_FILE, info.get("id2label"))
    spec = peft_format.read_adapter_config(adapter_dir)
    task_type = spec.raw.get("task_type")
    if task_type != "SEQ_CLS":
        return "causal-lm", None
    tensors, _ = safetensors_io.read(adapter_dir / peft_format.WEIGHTS_NAME)
    for head in HEAD_NAMES:
        for suffix in ("weight", "out_proj.weight"):  # BERT/decoders; RoBERTa-style heads
            t = tensors.get(f"{peft_format.PREFIX}{head}.{suffix}")
            if t is not None and t.dim() == 2:
                return "seq-cls", {i: f"LABEL_{i}" for i in range(t.shape[0])}
    raise LoraFileError(f"{adapter_dir}: a SEQ_CLS adapter without a saved classification head; cannot tell the labels")


# -- merge, generate -------------------------------------------------------------------------------


def load_with_adapter(
    model_dir: str | Path,
    adapter_dir: str | Path,
    *,
    task: str | None = None,
    dtype: str | None = None,
    trust_remote_code: bool = False,
    allow_base_mismatch: bool = False,
    progress: Progress | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    """(model, tokenizer, task) with a lorakit- or PEFT-made adapter loaded strictly into the base.

    The adapter's recorded base is checked (`lorakit.load_adapters`): another base raises LoraBaseMismatch
    unless `allow_base_mismatch`.
    """
    from ..loading import load_adapters
    from ..ui.progress import quiet

    progress = progress or quiet()
    adapter_task, id2label = read_task(adapter_dir)
    task = task or adapter_task
    with progress.task(f"loading the model {model_dir}"):
        labels = id2label if task == "seq-cls" else None
        model, tok = load(model_dir, task, id2label=labels, dtype=dtype, trust_remote_code=trust_remote_code)
    with progress.task(f"loading the adapter {adapter_dir}"):
        load_adapters(model, adapter_dir, allow_base_mismatch=allow_base_mismatch)
    return model, tok, task


def save_merged(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    out_dir: str | Path,
    *,
    dtype: str | None = None,
    progress: Progress | None = None,
    shown_as: str | Path | None = None,
) -> int:
    """Merge every LoRA layer and write a plain transformers directory (weights, config, tokenizer); returns how many.

    The merge is computed in fp32 and checked finite; `dtype` casts the result. `shown_as` names the directory in
    progress (the final one, when `out_dir` is a temporary sibling that replaces it).
    """
    from ..model import lora_layers, merge
    from ..ui.progress import quiet

    progress = progress or quiet()
    out_dir = check_output_dir(out_dir)
    n = len(lora_layers(model))
    with progress.task(f"merging {n} LoRA modules into the base"):
        merge(model)
        _untie_if_apart(model)
        if dtype is not None:
            model.to(DTYPES[dtype])  # type: ignore[arg-type]  # transformers' @wraps(Module.to) hides the bound self
    with progress.task(f"writing {shown_as or out_dir}"):
        model.save_pretrained(out_dir, safe_serialization=True)
        tok.save_pretrained(out_dir)
    return n


def _untie_if_apart(model: PreTrainedModel) -> None:
    """Set `tie_word_embeddings=False` where the merged head no longer shares the input embeddings' weight.

    A trained copy of a tied lm_head (modules_to_save), or a merged LoRA on tied embeddings, leaves the two
    apart; with the config still saying "tied", transformers ties them again (`tie_weights()`, or any loader
    that trusts the config) and one of them, e.g. the trained head, is lost. transformers 5 reads the flag
    from the model's own config; older composite models kept it in the text config: both are set.
    """
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    if not (callable(get_in) and callable(get_out)):
        return
    try:
        inp, out = get_in(), get_out()
    except NotImplementedError:  # a model without (one of) them: nothing tied
        return
    if inp is None or out is None or getattr(out, "weight", None) is getattr(inp, "weight", None):
        return
    config = model.config
    get_text = getattr(config, "get_text_config", None)
    for c in (config, get_text(decoder=True) if callable(get_text) else config):
        if getattr(c, "tie_word_embeddings", False):
            c.tie_word_embeddings = False
