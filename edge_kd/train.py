"""The one fit loop: the optimizer and schedule of an ``OptimizerConfig``, progress per epoch, a stop on a non-finite loss.

The optimizer and its schedule are ``edge_kd.optim.OptimizerConfig``'s.

>>> from edge_kd import data, train
>>> from edge_kd.distill import Distiller
>>> import models
>>> b = data.load("mnist", limit_train=600, limit_test=100)
>>> student = models.build("mlp", b.info.input_shape, b.info.num_classes, hidden=(32,))
>>> history = train.fit(Distiller(student), b.dataset("train", 64, shuffle=True), epochs=1,
...                     learning_rate=2e-3, validation=b.dataset("val"), verbose=0)
>>> sorted(history)[:2]
['accuracy', 'loss']
"""
from __future__ import annotations

import contextlib
import math
import sys

from edge_kd.errors import UserError
from edge_kd.keras import keras
from edge_kd.optim import OptimizerConfig


def verbosity() -> int:
    """Returns 1 (a live progress bar) on a terminal, 2 (one line per epoch) in logs."""
    return 1 if sys.stdout.isatty() else 2


class Diverged(UserError):
    """The training loss stopped being a finite number: training stopped at the end of that epoch."""

    def __init__(self, epoch: int, epochs: int | None, value: float):
        of = f" of {epochs}" if epochs else ""
        super().__init__(f"the training loss became {value} in epoch {epoch}{of}, so training stopped and the stage "
                         "kept nothing; lower the learning rate, or check the data and the loss weights")
        self.epoch, self.value = epoch, value


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Raises ``Diverged`` at the end of the first epoch whose mean training loss is NaN or infinite.

    An epoch's mean is non-finite as soon as one batch's loss is, so checking once per epoch catches
    every divergence without the per-batch copy of the logs that a batch hook costs.
    """

    def on_epoch_end(self, epoch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise Diverged(epoch + 1, (self.params or {}).get("epochs"), float(loss))


def fit(model, train, epochs: int, learning_rate: float, validation=None, callbacks=(), verbose=None,
        optimizer: OptimizerConfig | None = None) -> dict:
    """Compiles ``model`` with ``optimizer`` (default: Adam, cosine decay over the whole fit; anything with
    ``OptimizerConfig.build``'s signature, such as ``edge_kd.bit.Optimizer``), trains it; returns the history as
    lists.

    ``train`` is a batched tf.data dataset of known length; a non-finite loss raises ``Diverged``.
    """
    per_epoch = max(1, len(train))
    steps = max(1, epochs * per_epoch)
    model.compile(optimizer=(optimizer or OptimizerConfig()).build(learning_rate, steps, per_epoch))
    history = model.fit(train, validation_data=validation, epochs=epochs,
                        verbose=verbosity() if verbose is None else verbose,
                        callbacks=[StopOnNonFiniteLoss(), *callbacks])
    return {k: [float(v) for v in vs] for k, vs in history.history.items()}


MIXED = "mixed_float16"


@contextlib.contextmanager
def precision(policy: str):
    """Sets the global Keras dtype policy for the block (the models built inside take it), then restores the old one."""
    old = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(old)


def float32_copy(model):
    """Returns ``model`` when every layer computes in float32, else a copy that does, holding the same weights.

    A model built under ``mixed_float16`` keeps float32 weights but computes in float16; saved as it is,
    it would carry float16 compute (and casts) into every model loaded from it and into the TFLite export.
    """
    if all(layer.dtype_policy.name == "float32" for layer in model.layers):
        return model
    with precision("float32"):
        copy = model.__class__.from_config(_as_float32(model.get_config()))
    copy.set_weights(model.get_weights())
    return copy


def _as_float32(config):
    """Returns a model config with every layer's dtype policy replaced by float32."""
    if isinstance(config, dict):
        if config.get("class_name") in ("Policy", "DTypePolicy"):
            return "float32"
        return {k: _as_float32(v) for k, v in config.items()}
    if isinstance(config, list):
        return [_as_float32(v) for v in config]
    return config
