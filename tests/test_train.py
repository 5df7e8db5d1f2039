"""edge_kd.train's pieces that need no training."""
import json
import types

import numpy as np
import pytest


def test_saved_work_carries_its_seconds_over_every_sitting(tmp_path, monkeypatch):
    from edge_kd import train

    clock = iter([100.0, 130.0, 1000.0, 1012.5, 1020.0, 2000.0])
    monkeypatch.setattr(train, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    first = train.EpochCheckpoints(tmp_path / "s", key="fp")
    first.start_clock()  # at 100: nothing saved yet
    assert first.earlier == 0.0
    first.save_arrays(1, {"x": np.zeros(2)})  # at 130
    assert json.loads((tmp_path / "s" / "state.json").read_text())["seconds"] == 30.0
    # a later sitting (a new process: a new object) goes on from the 30 s of work the first one saved
    second = train.EpochCheckpoints(tmp_path / "s", key="fp")
    second.start_clock()  # at 1000
    assert second.earlier == 30.0
    second.save_arrays(2, {"x": np.ones(2)})  # at 1012.5
    assert json.loads((tmp_path / "s" / "state.json").read_text())["seconds"] == 42.5
    assert second.seconds() == pytest.approx(50.0)  # at 1020: both sittings, up to now
    # saved work of another stage's settings is not resumed, and its seconds are not counted
    other = train.EpochCheckpoints(tmp_path / "s", key="other")
    other.start_clock()  # at 2000
    assert other.earlier == 0.0
