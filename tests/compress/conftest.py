"""Shared, session-scoped fixtures of the compression tests: MNIST slices, a teacher, and one pruning run."""
import dataclasses

import pytest

import models
from edge_kd import data
from edge_kd.compress import prune
from edge_kd.keras import keras

from .compress_helpers import BATCH, PRUNE_STEPS, distiller

PRUNE_CFG = prune.PruneConfig(target_sparsity=0.75, schedule="polynomial", frequency=50, end_step=200)


@pytest.fixture(scope="session")
def mnist():
    """1,800 training, 200 validation and 500 test images of the built-in MNIST, normalised."""
    bundle = data.load("mnist", limit_train=2000, limit_test=500, seed=0)
    return bundle.arrays("train"), bundle.arrays("val"), bundle.arrays("test")


@pytest.fixture(scope="session")
def teacher(mnist):
    (x, y), _, _ = mnist
    keras.utils.set_random_seed(0)
    model = models.build("mlp", (28, 28, 1), 10, hidden=(64,))
    model.compile(optimizer=keras.optimizers.Adam(3e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=64, epochs=3, verbose=0)
    return model


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
