"""A skipped test is not a proof: the run fails when any test skipped, unless LORAKIT_ALLOW_SKIPS=1.

Every optional runtime a test needs (onnxruntime, llama-cpp-python, the serve and quant extras) is installed by
`scripts/setup.sh dev`, which CI runs; a test that skips has lost what it was meant to check.
"""

import os
import sys
from pathlib import Path

import pytest

TESTS = str(Path(__file__).parent)
if TESTS not in sys.path:  # the helper modules beside this file (_hub_cache, _hf_models), under --import-mode=importlib
    sys.path.insert(0, TESTS)


def pytest_sessionfinish(session, exitstatus):
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if skipped and exitstatus == 0 and os.environ.get("LORAKIT_ALLOW_SKIPS") != "1":
        reasons = sorted({str(getattr(r, "longrepr", ""))[:200] for r in skipped})
        reporter.write_line(f"{len(skipped)} test(s) skipped; a skip is a failure here (LORAKIT_ALLOW_SKIPS=1 allows):")
        for reason in reasons:
            reporter.write_line(f"  {reason}")
        session.exitstatus = 1


# -- a Hugging Face hub cache on disk (tests/_hub_cache.py), for tests of models named by hub id ---------------


@pytest.fixture(scope="session")
def hub_cache(tmp_path_factory):
    """A hub-layout cache (HF_HOME) with _hub_cache.REPO at two commits; built once per session, no network."""
    import _hub_cache

    return _hub_cache.build(tmp_path_factory.mktemp("hf-home"))


@pytest.fixture
def hub_env(hub_cache, monkeypatch):
    """This test sees only `hub_cache`, offline (HF_HOME, HF_HUB_OFFLINE=1); returns the cache."""
    for key, value in hub_cache.env().items():
        monkeypatch.setenv(key, value)
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(key, raising=False)
    return hub_cache
