"""A model named by a local directory or a Hugging Face hub id, resolved to a model directory.

    resolve_model("models/tiny-chat")                       # an existing path: itself
    resolve_model("Qwen/Qwen2.5-0.5B-Instruct")             # a hub id: its snapshot in huggingface_hub's cache
    resolve_model("Qwen/Qwen2.5-0.5B-Instruct", "v1.0")     # at a branch, tag or commit

An existing path always wins. Something shaped ORG/NAME that is not one is a hub id; anything else that does not
exist (`./x`, `/x`, `~/x`, `x/`, a bare name) is "no such directory". A hub id goes through huggingface_hub's
`snapshot_download` and its cache (HF_HUB_CACHE, else HF_HOME/hub), both read from the environment at each call:
with HF_HUB_OFFLINE=1 (or TRANSFORMERS_OFFLINE=1) only the cache is looked in, and a model missing there is an
error naming the id, the revision and the cache. Online, only what a model needs is fetched (MODEL_FILES: config,
tokenizer, safetensors weights, generation config, chat template, the model's own code; PyTorch .bin weights only
for a model without safetensors).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..files.hub_cache import repo_folder
from .models import WEIGHT_FILES, ModelDirError, check_model_dir

MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "model*.safetensors",
    "model.safetensors.index.json",
    "tokenizer*",  # tokenizer.json, tokenizer_config.json, tokenizer.model
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab*",
    "merges.txt",
    "*.tiktoken",
    "chat_template*",  # chat_template.jinja / .json
    "*.py",  # a model's own code: fetched, run only with trust_remote_code
)
BIN_WEIGHTS = ("pytorch_model*.bin", "pytorch_model.bin.index.json")  # only when a model has no safetensors
DEFAULT_REVISION = "main"
# huggingface_hub's rule for a repo id: ORG/NAME of letters, digits, "-", "_", "." (no "--" or ".."), <= 96 chars
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9_.][\w.-]*")
_TRUE = {"1", "ON", "YES", "TRUE"}


class HubModelError(ModelDirError):
    """A hub id that could not be resolved to a model directory (not cached offline, unknown, unreachable)."""


def is_hub_id(spec: str) -> bool:
    """Whether `spec` has the shape of a hub id (ORG/NAME), as opposed to a path.

    Examples:
        >>> [is_hub_id(s) for s in ("Qwen/Qwen2.5-0.5B", "./models/x", "/abs/x", "a/b/c", "gpt2", "org/name/")]
        [True, False, False, False, False, False]
    """
    return (
        len(spec) <= 96
        and _HUB_ID.fullmatch(spec) is not None
        and "--" not in spec
        and ".." not in spec
        and not spec.endswith((".", "-"))
    )


def cache_dir() -> Path:
    """huggingface_hub's model cache as the environment names it now: HF_HUB_CACHE, else HF_HOME/hub, else
    ~/.cache/huggingface/hub (XDG_CACHE_HOME honoured)."""
    env = os.environ
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(key):
            return Path(os.path.expandvars(env[key])).expanduser()
    if env.get("HF_HOME"):
        return Path(os.path.expandvars(env["HF_HOME"])).expanduser() / "hub"
    return Path(env.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "huggingface" / "hub"


def offline() -> bool:
    """Whether HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set true: the hub's cache only, no network."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in _TRUE


def resolve_model(spec: str | Path, revision: str | None = None) -> Path:
    """The model directory `spec` names: an existing path, else a hub id's snapshot in the cache (fetched online).

    Args:
        spec: a local model directory, or a hub id ORG/NAME.
        revision: for a hub id, the branch, tag or commit hash (default "main"); an error for a local directory.

    Returns:
        A directory with config.json and weights (`models.check_model_dir`).

    Raises:
        ModelDirError: no such directory, or not a model directory; HubModelError (a ModelDirError) for a hub id
            that is not cached while offline, unknown to the hub, or unreachable: it names the id, the revision
            and the cache looked in.

    Examples:
        >>> resolve_model("./no/such/model")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        lorakit.hf.models.ModelDirError: ./no/such/model: no such directory (a model is a local directory or ...
    """
    path = Path(spec).expanduser()
    if path.exists():
        if revision is not None:
            raise ModelDirError(
                f"revision {revision!r} is for a hub id (ORG/NAME), but {spec} is a local directory; "
                "drop the revision, or name the hub model"
            )
        return check_model_dir(path)
    if not is_hub_id(str(spec)):
        raise ModelDirError(
            f"{spec}: no such directory (a model is a local directory or a Hugging Face hub id ORG/NAME)"
        )
    return check_model_dir(_snapshot(str(spec), revision or DEFAULT_REVISION))


def _snapshot(repo_id: str, revision: str) -> Path:
    """The snapshot directory of `repo_id` at `revision`, from the cache (offline) or fetched (online)."""
    from huggingface_hub.utils import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cache, local = cache_dir(), offline()
    where = f"{repo_id} (revision {revision})"
    try:
        path = Path(_download(repo_id, revision, cache, local, MODEL_FILES))
        if not local and not any((path / f).is_file() for f in WEIGHT_FILES):
            path = Path(_download(repo_id, revision, cache, local, MODEL_FILES + BIN_WEIGHTS))
    except RevisionNotFoundError:
        raise HubModelError(f"{where}: the hub has no such revision (a branch, tag or commit hash)") from None
    except RepositoryNotFoundError:
        raise HubModelError(
            f"{repo_id}: no such local directory, and no such model on the Hugging Face hub (or it is private or "
            "gated: log in with `hf auth login`)"
        ) from None
    except LocalEntryNotFoundError:
        raise HubModelError(_not_cached(repo_id, revision, cache, local)) from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise HubModelError(f"{where}: could not fetch it into {cache} ({type(e).__name__}: {e})") from None
    return path


def _download(repo_id: str, revision: str, cache: Path, local: bool, patterns: tuple[str, ...]) -> str:
    """One snapshot_download call over the files that match `patterns`; `local`: the cache only."""
    from huggingface_hub import snapshot_download

    return str(
        snapshot_download(
            repo_id, revision=revision, cache_dir=cache, local_files_only=local, allow_patterns=list(patterns)
        )
    )


def _not_cached(repo_id: str, revision: str, cache: Path, local: bool) -> str:
    """The message for a hub model that is not in the cache and could not be fetched."""
    why = "the hub is offline (HF_HUB_OFFLINE=1)" if local else "the hub could not be reached"
    folder = cache / repo_folder(repo_id)
    return (
        f"{repo_id}: no such local directory, and the hub model {repo_id} (revision {revision}) is not in the "
        f"Hugging Face cache {cache} (looked in {folder}) while {why}; download it once online "
        f"(e.g. `hf download {repo_id}` with HF_HUB_OFFLINE unset), or pass a local model directory"
    )
