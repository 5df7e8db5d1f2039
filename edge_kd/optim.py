"""How a fit updates the weights: the optimizer, its weight decay, and the learning-rate schedule.

Optimizers: ``adam`` (the default), ``adamw`` (Adam with decoupled weight decay, Loshchilov & Hutter
2019) and ``sgd`` (with ``momentum``, ``nesterov``). ``weight_decay`` is decoupled for each of them:
every step first shrinks each trained variable by ``learning_rate(step) · weight_decay``. The
learning rate rises linearly from 0 over ``warmup_epochs`` (whole or fractional) and then follows a
cosine to 0 at the last step of the fit.
"""
from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import model_validator

from edge_kd.config import Bool, Config, Field, Float, Invalid


class OptimizerConfig(Config):
    """How a fit updates the weights: the optimizer, its momentum and weight decay, and the warm-up."""

    KEY: ClassVar[str] = "training"
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    #: sgd: the momentum (0 for plain SGD)
    momentum: Annotated[Float, Field(ge=0, lt=1)] = 0.9
    #: sgd: Nesterov momentum
    nesterov: Bool = False
    #: decoupled weight decay per unit of learning rate; adamw needs it > 0
    weight_decay: Annotated[Float, Field(ge=0)] = 0.0
    #: the linear warm-up from 0, in epochs (fractional allowed), before the cosine
    warmup_epochs: Annotated[Float, Field(ge=0)] = 0.0

    @model_validator(mode="after")
    def _decayed(self):
        if self.optimizer == "adamw" and not self.weight_decay:
            raise Invalid("weight_decay", "must be > 0 with optimizer adamw (e.g. 0.05; with none it is adam), got 0")
        return self

    def schedule(self, learning_rate: float, steps: int, steps_per_epoch: int):
        """Returns the learning-rate schedule of a fit of ``steps`` steps: warm-up, then cosine to 0."""
        from edge_kd.keras import keras

        warm = min(int(round(self.warmup_epochs * steps_per_epoch)), max(steps - 1, 0))
        if not warm:
            return keras.optimizers.schedules.CosineDecay(learning_rate, steps)
        return keras.optimizers.schedules.CosineDecay(0.0, steps - warm, warmup_target=learning_rate,
                                                      warmup_steps=warm)

    def build(self, learning_rate: float, steps: int, steps_per_epoch: int):
        """Returns the Keras optimizer of a fit of ``steps`` steps peaking at ``learning_rate``."""
        from edge_kd.keras import keras

        lr = self.schedule(learning_rate, steps, steps_per_epoch)
        wd = self.weight_decay or None
        if self.optimizer == "sgd":
            return keras.optimizers.SGD(lr, momentum=self.momentum, nesterov=self.nesterov, weight_decay=wd)
        if self.optimizer == "adamw":
            return keras.optimizers.AdamW(lr, weight_decay=wd)
        return keras.optimizers.Adam(lr, weight_decay=wd)
