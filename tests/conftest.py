"""Shared test fixtures: the real datasets in ../shared/data when present, tiny data otherwise."""
import os
from pathlib import Path

import numpy as np
import pytest

import edge_kd.keras  # noqa: F401  (sets TF_USE_LEGACY_KERAS before anything imports TensorFlow)

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def shared_npz(name: str) -> Path:
    """Returns the path of ../shared/data/<name>, skipping the test when it is absent."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} not present")
    return path


@pytest.fixture
def rng():
    return np.random.default_rng(0)
