"""Models named by hub id (lorakit.hf.hub): an on-disk hub cache (tests/_hub_cache.py), offline, no network.

Which spec is a path and which a hub id, the cache and offline switches read from the environment at each call,
--revision choosing a branch or a commit, and the error for a model that is not cached.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))
import _hf_models  # noqa: E402
from _hub_cache import ABSENT, BRANCH, MAIN, REPO, V2  # noqa: E402

from lorakit.files.hub_cache import Snapshot, snapshot_of  # noqa: E402
from lorakit.hf import hub  # noqa: E402
from lorakit.hf import models as hf  # noqa: E402


def test_a_cached_hub_id_resolves_offline_to_its_snapshot(hub_env):
    path = hub.resolve_model(REPO)
    assert path == hub_env.snapshot(MAIN) and (path / "config.json").is_file()
    assert snapshot_of(path) == Snapshot(REPO, MAIN)
    model, tok = hf.load(path, "causal-lm")
    assert type(model).__name__ == "LlamaForCausalLM" and tok.pad_token is not None


@pytest.mark.parametrize("revision", [BRANCH, V2, "main", MAIN])
def test_revision_picks_a_branch_or_a_commit(hub_env, revision):
    want = V2 if revision in (BRANCH, V2) else MAIN
    assert hub.resolve_model(REPO, revision) == hub_env.snapshot(want)


def test_not_cached_offline_names_the_id_the_revision_and_the_cache(hub_env):
    with pytest.raises(hub.HubModelError) as e:
        hub.resolve_model(ABSENT)
    text = str(e.value)
    assert ABSENT in text and "revision main" in text and str(hub_env.cache) in text
    assert "HF_HUB_OFFLINE=1" in text and "download it once online" in text and "local model directory" in text
    with pytest.raises(hub.HubModelError, match=r"revision no-such-branch\).*not in the Hugging Face cache"):
        hub.resolve_model(REPO, "no-such-branch")
    assert isinstance(e.value, hf.ModelDirError)  # the CLI's bad-input family: exit 2


def test_the_environment_is_read_at_each_call(hub_env, monkeypatch, tmp_path):
    assert hub.cache_dir() == hub_env.cache and hub.offline()
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))  # HF_HUB_CACHE wins over HF_HOME
    assert hub.cache_dir() == tmp_path / "elsewhere"
    with pytest.raises(hub.HubModelError, match="elsewhere"):
        hub.resolve_model(REPO)
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    assert not hub.offline()


def test_paths_and_hub_ids(hub_env, tmp_path, monkeypatch):
    for spec in ("./models/tiny", "/no/such/model", "~/no-such-model", "models/", "tiny-llama", "a/b/c"):
        assert not hub.is_hub_id(spec)
        with pytest.raises(hf.ModelDirError, match=r"no such directory \(a model is a local directory or a Hugging"):
            hub.resolve_model(spec)
    assert hub.is_hub_id(REPO) and hub.is_hub_id("Qwen/Qwen2.5-0.5B-Instruct")
    # an existing path always wins over the hub id it looks like
    monkeypatch.chdir(tmp_path)
    local = _hf_models.save_tiny("gpt2", tmp_path / REPO)
    assert hub.resolve_model(REPO) == Path(REPO) and local.is_dir()
    with pytest.raises(hf.ModelDirError, match=r"revision 'v2' is for a hub id \(ORG/NAME\), but .* local directory"):
        hub.resolve_model(REPO, BRANCH)


def test_a_snapshot_without_weights_is_refused_by_name(hub_env, tmp_path, monkeypatch):
    empty = hub_env.home / "partial"
    (empty / "hub" / "models--acme--half" / "snapshots" / ("3" * 40)).mkdir(parents=True)
    (empty / "hub" / "models--acme--half" / "refs").mkdir()
    (empty / "hub" / "models--acme--half" / "refs" / "main").write_text("3" * 40)
    (empty / "hub" / "models--acme--half" / "snapshots" / ("3" * 40) / "config.json").write_text("{}")
    monkeypatch.setenv("HF_HOME", str(empty))
    with pytest.raises(hf.ModelDirError, match="has config.json but no weights"):
        hub.resolve_model("acme/half")
