"""schemathesis hooks of the serve fuzz tests (loaded through SCHEMATHESIS_HOOKS).

A generated request names a model this server has (LORAKIT_FUZZ_MODELS) seven times in eight: a random
"model" is a 404 before any other field is looked at, so without this the sampling fields would never reach
the engine. The schema itself is not narrowed: every other field is as schemathesis generated it.
"""

from __future__ import annotations

import hashlib
import json
import os

import schemathesis

MODELS = os.environ.get("LORAKIT_FUZZ_MODELS", "base").split(",")


@schemathesis.hook
def map_body(context, body):
    """Point most bodies' "model" at a served model; which one follows from the body (reproducible)."""
    if isinstance(body, dict) and isinstance(body.get("model"), str):
        digest = int(hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest(), 16)
        if digest % 8:
            body = {**body, "model": MODELS[digest % len(MODELS)]}
    return body
