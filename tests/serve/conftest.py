"""The tiny models of the engine tests, built once per session: both engine test modules share them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import _engine  # noqa: E402


@pytest.fixture(scope="session")
def llama(tmp_path_factory):
    return _engine.served("llama", _engine.LLAMA_ADAPTERS, tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="session")
def gpt2(tmp_path_factory):
    return _engine.served("gpt2", _engine.GPT2_ADAPTERS, tmp_path_factory.mktemp("serve"))
