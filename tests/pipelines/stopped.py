"""What the resume tests of both synthesis methods share: a run whose synthesize stage is stopped (Ctrl-C) right
after it saved a given part, and a copy of a stage store without its synthesized images."""
import shutil

import pytest

from edge_kd import interrupt, train


def stop_after_part(monkeypatch, part: int, call):
    """Calls ``call()`` with a Ctrl-C raised right after the synthesize stage saved part ``part`` (a DeepInversion
    batch, a generator round); returns the ``Interrupted`` it ended with. The saving is restored after."""
    save = train.EpochCheckpoints.save_arrays

    def save_then_stop(self, done, arrays):
        save(self, done, arrays)
        if done == part:
            raise KeyboardInterrupt

    monkeypatch.setattr(train.EpochCheckpoints, "save_arrays", save_then_stop)
    with pytest.raises(interrupt.Interrupted) as e:
        call()
    monkeypatch.setattr(train.EpochCheckpoints, "save_arrays", save)
    return e.value


def store_without_synthesis(store, dst):
    """Copies stage store ``store`` to ``dst`` without its synthesize results (which a run must then make); returns
    ``dst``."""
    shutil.copytree(store, dst, ignore=lambda folder, names: [n for n in names if n.startswith("synthesize-")])
    return dst
