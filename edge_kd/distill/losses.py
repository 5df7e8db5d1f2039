"""The registry of distillation loss terms.

A term is a small class registered by name. ``get(name, **params)`` builds one; calling it as
``term(student, teacher, y)`` returns a scalar, batch-averaged. ``student`` and ``teacher`` are dicts
with ``"logits"`` (and, for terms that need them, ``"features": {tap: tensor}``); ``y`` holds the
integer labels.

>>> from edge_kd.distill import losses
>>> term = losses.get("hinton", temperature=4.0, weight=0.9)
>>> term.name, term.weight
('hinton', 0.9)
"""
from __future__ import annotations

import inspect

from edge_kd.errors import UserError
from edge_kd.keras import tf

_REGISTRY: dict[str, type] = {}


def register(name: str):
    """Returns a class decorator registering a loss term under ``name``."""

    def deco(cls):
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def available() -> list[str]:
    """Returns the registered loss-term names, sorted."""
    return sorted(_REGISTRY)


def params_of(name: str) -> list[str]:
    """Returns the constructor parameters of loss term ``name``."""
    return [p for p in inspect.signature(_REGISTRY[name].__init__).parameters if p != "self"]


def get(name: str, **params) -> "LossTerm":
    """Returns a new loss term ``name`` built with ``params``; unknown names or parameters are a UserError."""
    if name not in _REGISTRY:
        raise UserError(f"unknown distillation loss '{name}'; available: {', '.join(available())}")
    allowed = params_of(name)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise UserError(f"loss '{name}' has no parameter {', '.join(unknown)}; allowed: {', '.join(allowed)}")
    return _REGISTRY[name](**params)


class LossTerm:
    """Base of all terms: a weight in the total loss and a batch-averaged scalar from ``__call__``."""

    name = "term"
    #: what the term reads from the student/teacher dicts besides logits (feature taps)
    needs_features = False

    def __init__(self, weight: float = 1.0):
        self.weight = _check_range("weight", weight, 0.0, None)

    def __call__(self, student: dict, teacher: dict, y) -> tf.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def config(self) -> dict:
        """Returns the term's parameters, for manifests and reports."""
        return {p: getattr(self, p) for p in params_of(self.name)}


def _check_range(key, value, low, high, low_open=False):
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{key} must be a number, got {value!r}") from None
    too_low = low is not None and (v <= low if low_open else v < low)
    too_high = high is not None and v > high
    if too_low or too_high:
        bound = f"{'>' if low_open else '≥'} {low}" if high is None else f"in [{low}, {high}]"
        raise UserError(f"{key} must be {bound}, got {value!r}")
    return v


def soft_kl(teacher_logits, student_logits, temperature):
    """Returns the per-sample KL(softmax(t/T) ‖ softmax(s/T)) as a (batch,) tensor."""
    t = tf.cast(teacher_logits, tf.float32) / temperature
    s = tf.cast(student_logits, tf.float32) / temperature
    log_p_t = tf.nn.log_softmax(t, axis=-1)
    log_p_s = tf.nn.log_softmax(s, axis=-1)
    return tf.reduce_sum(tf.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)


@register("hinton")
class Hinton(LossTerm):
    """Hinton et al. (2015) soft targets: ``T² · KL(softmax(t/T) ‖ softmax(s/T))``, batch-averaged.

    The T² factor keeps the soft term's gradient magnitude comparable across temperatures, so the
    weight between hard and soft terms need not be retuned when T changes.
    """

    def __init__(self, temperature: float = 4.0, weight: float = 1.0):
        super().__init__(weight)
        self.temperature = _check_range("temperature", temperature, 0.0, None, low_open=True)

    def __call__(self, student, teacher, y):
        kl = soft_kl(teacher["logits"], student["logits"], self.temperature)
        return (self.temperature ** 2) * tf.reduce_mean(kl)
