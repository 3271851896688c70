"""`lorakit serve --model ORG/NAME`: a hub id resolved from an on-disk hub cache in a real subprocess, offline, and
served under its id (as vLLM names a hub model), answered through the real `openai` client."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))
from _hub_cache import BRANCH, REPO  # noqa: E402
from _serving import Server  # noqa: E402

pytestmark = pytest.mark.slow  # a server subprocess


def test_serve_a_hub_id_offline_under_its_id(hub_cache):
    server = Server("--model", REPO, "--revision", BRANCH, env=hub_cache.env())
    try:
        client = server.client()
        assert [m.id for m in client.models.list().data] == [REPO]
        done = client.completions.create(model=REPO, prompt="the cat sat", max_tokens=3, temperature=0)
        assert done.model == REPO and done.usage.completion_tokens >= 1
    finally:
        assert server.stop() == 0
