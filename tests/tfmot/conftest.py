"""Session-scoped fixture of the compression tests: one pruning run (on tests/conftest.py's MNIST and teacher)."""
import dataclasses

import pytest

import models
from edge_kd.tfmot import prune
from edge_kd.keras import keras

from .helpers import BATCH, PRUNE_STEPS, distiller

PRUNE_CFG = prune.PruneConfig(target_sparsity=0.75, schedule="polynomial", frequency=50, end_step=200)


@dataclasses.dataclass
class PruneRun:
    original: keras.Model
    original_weights: list
    wrapped: keras.Model
    stripped: keras.Model
    history: dict


@pytest.fixture(scope="session")
def pruned_student(mnist, teacher):
    """The cnn student pruned to 75 % inside the Distiller: polynomial 0 -> 0.75 over steps 0..200 of 300."""
    (x, y), (xv, yv), _ = mnist
    keras.utils.set_random_seed(1)
    student = models.build("cnn", (28, 28, 1), 10)
    before = [w.copy() for w in student.get_weights()]
    wrapped = prune.prune(student, PRUNE_CFG, total_steps=PRUNE_STEPS)
    history = distiller(wrapped, teacher).fit(x, y, batch_size=BATCH, epochs=PRUNE_STEPS // 100, verbose=0,
                                              validation_data=(xv, yv), shuffle=True,
                                              callbacks=prune.callbacks()).history
    return PruneRun(student, before, wrapped, prune.strip(wrapped), history)
