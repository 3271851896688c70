"""The check that proof.json says something in every field it has."""

from __future__ import annotations

import json
from pathlib import Path


def empty_fields(value: object, at: str = "") -> list[str]:
    """The JSON paths under `value` holding an empty string, list or dict, or null (`passed: null` of an unproven
    export excepted: it is the verdict "not proven", said with its reason)."""
    if isinstance(value, dict):
        found = [] if value else [at or "."]
        for key, item in value.items():
            if not (key == "passed" and item is None and at == "" and value.get("reason")):
                found += empty_fields(item, f"{at}.{key}")
        return found
    if isinstance(value, list):
        return ([] if value else [at]) + [p for i, item in enumerate(value) for p in empty_fields(item, f"{at}[{i}]")]
    return [at] if value is None or value == "" else []


def assert_proof_fields(out: Path) -> dict:
    """proof.json of the export in `out`, asserting no field of it is empty; returned."""
    proofs = json.loads((out / "proof.json").read_text())
    assert empty_fields(proofs) == [], f"empty fields in {out / 'proof.json'}: {empty_fields(proofs)}"
    return proofs
