"""What every subcommand shares: BadInput (exit 2), the library's input errors worded in flags, small parsers."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from ..errors import LoraError, ProvenanceNote
from ..hf import models as hf
from .quiet import quiet_third_party

T = TypeVar("T")


class BadInput(Exception):
    """A problem with what the user passed (paths, files, flags): exit code 2."""


# The preference and RL configs' fields (align.job.config_of names them in its errors), each set by the flag of
# TRL's name (--beta, --loss-type, ...; the reward specs by --reward)
ALIGN_FIELDS = (
    "beta", "loss_type", "simpo_gamma", "num_generations", "max_completion_length", "temperature", "top_p", "top_k",
    "epsilon", "epsilon_high", "scale_rewards", "reward_weights",
)  # fmt: skip

# The library's parameters that remedy an error (LoraError.param), and the CLI flag that sets each
PARAM_FLAGS = {
    "skip_bad_rows": "--skip-bad-rows",
    "valid_path": "--valid",
    "chat_template": "--chat-template",
    "trust_remote_code": "--trust-remote-code",
    "allow_base_mismatch": "--allow-base-mismatch",
    "task": "--task",
    "targets": "--targets",
    "target_parameters": "--target-parameters",
    **{field: "--" + field.replace("_", "-") for field in ALIGN_FIELDS},
    "rewards": "--reward",
}


def as_flag(e: BaseException, flag: str) -> str:
    """An error that opens with `param=value` (a config's check) worded as the flag: `--beta -1.0 is invalid ...`."""
    param = getattr(e, "param", None)
    text = str(e)
    return f"{flag} {text.removeprefix(f'{param}=')}" if param and text.startswith(f"{param}=") else f"{flag}: {text}"


# How the CLI words each remedy: f(error, flag) -> message
REMEDIES: dict[str, Callable[[Any, str], str]] = {
    "skip_bad_rows": lambda e, flag: (
        f"{len(e.bad_rows)} bad row(s); fix them, or pass {flag} to train without them:\n{e.listing}"
    ),
    "valid_path": lambda e, flag: f"{e.detail}; pass {flag} FILE",
    "chat_template": lambda e, flag: f"{e.detail}; pass {flag} FILE (a Jinja chat template, e.g. ChatML)",
    "trust_remote_code": lambda e, flag: f"{e.detail}; lorakit runs it only with {flag}, after you have read that code",
    "allow_base_mismatch": lambda e, flag: (
        f"{e.detail}; load it onto the base it was trained on, or pass {flag} to load it anyway"
    ),
    "task": lambda e, flag: f"{e.detail}; use {flag} {e.can}",
    "targets": lambda e, flag: f"{flag}: {e}",
    "target_parameters": lambda e, flag: f"{flag}: {e}",
    **dict.fromkeys((*ALIGN_FIELDS, "rewards"), as_flag),
}


def flag_words(e: BaseException) -> str:
    """The message of a library error, its remedy worded in the CLI's flags where the error names a parameter."""
    param = getattr(e, "param", None) if isinstance(e, LoraError) else None
    if param is None:
        return str(e)
    return REMEDIES[param](e, PARAM_FLAGS[param])


def inputs(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a step that reads the user's inputs; lorakit's file/data errors and bad values become BadInput."""
    try:
        return fn(*args, **kwargs)
    except (LoraError, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError) as e:
        raise BadInput(flag_words(e)) from None


def new_or_empty(path: str | Path, remedy: str) -> None:
    """BadInput unless `path` is new or an empty directory (hf.check_output_dir), with the CLI's `remedy`."""
    try:
        hf.check_output_dir(path)
    except hf.OutputDirNotEmpty as e:
        raise BadInput(f"{e}; {remedy}") from None


def quiet_transformers() -> None:
    """No progress bars or load reports (quiet.py, which `main` applies to every command too): lorakit says what
    matters itself."""
    quiet_third_party()


def check_sampling(args: argparse.Namespace) -> None:
    """BadInput unless --max-new-tokens >= 1, --temperature >= 0 and --top-p in (0, 1] (generate, predict)."""
    if args.max_new_tokens < 1:
        raise BadInput(f"--max-new-tokens {args.max_new_tokens} is invalid: expected >= 1")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise BadInput("--temperature must be >= 0 and --top-p in (0, 1]")
    if getattr(args, "top_k", 0) < 0:
        raise BadInput(f"--top-k {args.top_k} is invalid: expected >= 0 (0: every token)")


def positive_int(text: str) -> int:
    """An argparse type: an int >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


# -- adapter provenance: one flag for every command that loads an adapter onto a base ---------------


def add_base_mismatch_flag(p: argparse.ArgumentParser) -> None:
    """--allow-base-mismatch: load an adapter onto a base other than the one its lorakit.json records, warned."""
    p.add_argument(
        "--allow-base-mismatch",
        action="store_true",
        help="load an adapter even onto a base other than the one it was saved for (lorakit.json), with a "
        "warning instead of an error",
    )


def base_check(args: argparse.Namespace) -> dict[str, bool]:
    """The keyword `load_adapters` takes for --allow-base-mismatch (False where a command lacks the flag)."""
    return {"allow_base_mismatch": bool(getattr(args, "allow_base_mismatch", False))}


def print_notes() -> None:
    """Print the library's ProvenanceNote warnings as one `note:` line each, each distinct one once."""
    shown, said = warnings.showwarning, set()

    def show(message: Warning | str, category: type[Warning], *rest: Any, **kw: Any) -> None:
        if not issubclass(category, ProvenanceNote):
            shown(message, category, *rest, **kw)
        elif str(message) not in said:  # a step that checks and then loads an adapter warns twice
            said.add(str(message))
            print(f"note: {message}", file=sys.stderr)

    warnings.showwarning = show
    warnings.filterwarnings("always", category=ProvenanceNote)


# -- the model: one pair of flags and one resolution for every command that loads a model ----------

MODEL_METAVAR = "DIR|ORG/NAME"  # runfile.py records it absolute when it is a local path, as given when a hub id


def add_model_flags(p: argparse.ArgumentParser, *, required: bool = True, help: str = "the base model") -> None:
    """--model (a local directory or a Hugging Face hub id) and --revision; `model_dir(args)` resolves them."""
    p.add_argument(
        "--model",
        required=required,
        metavar=MODEL_METAVAR,
        help=f"{help}: a local Hugging Face model directory, or a hub id such as Qwen/Qwen2.5-0.5B-Instruct "
        "(resolved through the Hugging Face cache, HF_HOME; HF_HUB_OFFLINE=1 reads only the cache)",
    )
    p.add_argument(
        "--revision",
        metavar="REV",
        help="with a hub id --model: the branch, tag or commit hash to use (default: main)",
    )


def model_dir(args: argparse.Namespace) -> Path:
    """The model directory --model names (a hub id resolved with --revision, hf.hub.resolve_model); BadInput if none.

    Online, a hub model not yet in the cache is downloaded here, after a line naming it and the cache.
    """
    from ..hf import hub

    revision = getattr(args, "revision", None)
    if hub.is_hub_id(str(args.model)) and not Path(args.model).exists() and not hub.offline():
        rev = revision or hub.DEFAULT_REVISION
        print(
            f"lorakit: {args.model} (revision {rev}) from the Hugging Face hub into {hub.cache_dir()}", file=sys.stderr
        )
    return inputs(hub.resolve_model, args.model, revision)
