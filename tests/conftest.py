"""Shared test fixtures: the real datasets in ../shared/data when present; one MNIST slice and one teacher for all."""
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


def subclassed_model(inputs: int, units: int):
    """Returns a built subclassed tf_keras model of one Dense layer (``inputs`` → ``units``): a model that cannot be
    rebuilt from its config, which code that clones or walks a model must refuse or leave alone."""
    from edge_kd.keras import keras

    class Sub(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(units)

        def call(self, v):
            return self.dense(v)

    model = Sub()
    model(np.zeros((1, inputs), np.float32))
    return model


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def mnist():
    """((x, y) train, val, test): 1,800 training, 200 validation and 500 test images of the built-in MNIST, normalised."""
    from edge_kd import data

    bundle = data.load("mnist", limit_train=2000, limit_test=500, seed=0)
    return bundle.arrays("train"), bundle.arrays("val"), bundle.arrays("test")


@pytest.fixture(scope="session")
def teacher(mnist):
    """The one trained teacher of the unit tests (tests must not change it): a small CNN, 3×3 conv-ReLU-pool with
    8 then 16 filters, flatten, dense logits (layers block1_relu, block2_relu, flatten, logits), trained 5 epochs on
    ``mnist``'s training images (about 93 % on its validation images).

    It has no BatchNormalization on purpose: the short distillations of the tests (a few hundred steps) leave
    a student's moving statistics far from its batch statistics, and a BN teacher makes that gap cost the
    student 10 to 20 points of inference accuracy in them (measured: 0.72 against 0.85 to 0.91 otherwise).
    """
    from edge_kd.keras import keras

    (x, y), _, _ = mnist
    layers = keras.layers
    keras.utils.set_random_seed(0)
    inp = keras.Input((28, 28, 1), name="image")
    h = inp
    for i, filters in enumerate((8, 16), start=1):
        h = layers.Conv2D(filters, 3, padding="same", name=f"block{i}_conv")(h)
        h = layers.ReLU(name=f"block{i}_relu")(h)
        h = layers.MaxPooling2D(2, name=f"pool{i}")(h)
    out = layers.Dense(10, name="logits")(layers.Flatten(name="flatten")(h))
    model = keras.Model(inp, out, name="teacher_cnn")
    model.compile(optimizer=keras.optimizers.Adam(3e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=32, epochs=5, verbose=0)
    return model


#: The test files that take longest (measured: `pytest --durations`), longest first. The suite runs in two worker
#: processes, each taking whole files in turn (pyproject.toml); starting with these keeps the two busy to the end
#: instead of one finishing a long file alone. Only an order: a file missing here runs after them, as collected.
LONGEST_FIRST = ("tests/pipelines/test_search.py", "tests/pipelines/test_default_run.py",
                 "tests/pipelines/test_multiworker.py", "tests/test_models.py",
                 "tests/pipelines/test_photos.py", "tests/distill/test_distribute.py", "tests/pipelines/test_compress.py",
                 "tests/pipelines/test_families_pipeline.py", "tests/distill/test_families.py",
                 "tests/pipelines/test_ctrl_c.py", "tests/test_keras3.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))
