"""The fingerprint: one stable sha256 of plain data (a stage's settings, inputs and code; a recipe).

A leaf: it imports nothing of the project, so anything may use it.
"""
from __future__ import annotations

import hashlib
import json


def fingerprint(obj) -> str:
    """Returns a stable sha256 of JSON-able ``obj`` (keys sorted; what JSON cannot hold, as its str)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
