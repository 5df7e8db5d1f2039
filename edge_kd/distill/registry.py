"""The registry of distillation loss terms and their base class; the families register into it.

A term is a small class registered by name (``@register("hinton")``) in the module of its family
(``soft_targets``, ``hints``, ``relational``), each of which imports this module and nothing of the
others'. ``edge_kd.distill.losses`` imports every family, so its ``get``/``available`` see them all.
A term is built by ``get(name, **params)``; ``get(name, **params)`` builds one; calling it as
``term(student, teacher, y)`` returns a scalar, batch-averaged. ``student`` and ``teacher`` are dicts
with ``"logits"`` (and, for terms that need them, ``"features": {tap: tensor}``); ``y`` holds the
integer labels.

>>> from edge_kd.distill import losses      # every family registered
>>> term = losses.get("hinton", temperature=4.0, weight=0.9)
>>> term.name, term.weight
('hinton', 0.9)
"""
from __future__ import annotations

import inspect

import numpy as np

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


def needs_teacher(name: str) -> bool:
    """Returns whether registered term ``name`` needs a teacher (False for a virtual teacher)."""
    return _REGISTRY[name].needs_teacher


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
    """Base of all terms: a weight in the total loss and a batch-averaged scalar from ``__call__``.

    The Distiller calls a term as ``term(student, teacher, y)``. ``student`` and ``teacher`` are dicts:
    ``"logits"`` (batch, classes), ``"features"`` ``{layer name: tensor}`` holding the layers the term
    asked for through ``student_taps``/``teacher_taps`` (by their original names, so they are found in
    pruning- or QAT-wrapped models too), and, in ``student`` only, ``"epoch"``: a float32 scalar, the
    epochs completed in this fit, fractional within an epoch. ``teacher`` is None for a term with
    ``needs_teacher = False``. ``y`` holds integer labels of shape (batch,).

    A term that owns variables (adapters, projection heads, a memory bank) creates them in ``build``,
    which the Distiller calls once, eagerly, with real student/teacher dicts for a small batch before
    any training; its trainable variables train with the student and are never part of the exported
    student. A term with state that changes after each optimisation step (a memory bank) updates it in
    ``after_train_step``, called only by ``train_step``.
    """

    name = "term"
    #: False for a term that needs no teacher (a hand-designed virtual teacher)
    needs_teacher = True
    #: True when ``per_sample`` gives one value per example (so several teachers can be weighted per example)
    has_per_sample = False

    def __init__(self, weight: float = 1.0):
        self.weight = check_range("weight", weight, 0.0, None)
        self._layers = []

    def student_taps(self) -> list[str]:
        """Returns the original names of the student layers this term reads (``student["features"]``)."""
        return []

    def teacher_taps(self) -> list[str]:
        """Returns the original names of the teacher layers this term reads (``teacher["features"]``)."""
        return []

    def build(self, student: dict, teacher: dict | None) -> None:
        """Creates the term's variables from real student/teacher dicts of a small batch (called once)."""

    def reads_only_logits(self) -> bool:
        """True for a term that reads no layers and builds nothing: it can be shared by any teacher or peer."""
        return not (self.student_taps() or self.teacher_taps() or type(self).build is not LossTerm.build
                    or type(self).after_train_step is not LossTerm.after_train_step)

    @property
    def trainable_variables(self) -> list:
        """The variables that train with the student (adapters, projection heads); never exported."""
        return [v for layer in self._layers for v in layer.trainable_variables]

    def variables(self) -> list:
        """Returns every variable the term owns, trained or state (a memory bank): what a fit's checkpoint keeps."""
        return [v for layer in self._layers for v in layer.weights]

    def after_train_step(self, student: dict, teacher: dict | None, y) -> None:
        """Updates state after an optimisation step (e.g. a memory bank); only ``train_step`` calls it."""

    def per_sample(self, student: dict, teacher: dict | None, y) -> tf.Tensor:  # pragma: no cover - abstract
        """Returns the term's value per example, shape (batch,); only when ``has_per_sample``."""
        raise NotImplementedError

    def __call__(self, student: dict, teacher: dict | None, y) -> tf.Tensor:
        if self.has_per_sample:
            return tf.reduce_mean(self.per_sample(student, teacher, y))
        raise NotImplementedError  # pragma: no cover - abstract

    def config(self) -> dict:
        """Returns the term's parameters, for manifests and reports."""
        return {p: getattr(self, p) for p in params_of(self.name)}


def check_range(key: str, value, low, high, low_open: bool = False) -> float:
    """Returns ``value`` as a float in [low, high] (``(low, ...`` with ``low_open``); else a one-line UserError."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{key} must be a number, got {value!r}") from None
    too_low = low is not None and (v <= low if low_open else v < low)
    too_high = high is not None and v > high
    if too_low or too_high:
        bound = f"{'>' if low_open else '≥'} {low:g}" if high is None else f"in [{low:g}, {high:g}]"
        raise UserError(f"{key} must be {bound}, got {value!r}")
    return v


def check_int(key: str, value, low: int) -> int:
    """Returns ``value`` as an int ≥ ``low`` (an integral float is accepted); else a one-line UserError."""
    ok = not isinstance(value, bool) and isinstance(value, (int, np.integer, float, np.floating))
    if ok and float(value).is_integer() and value >= low:
        return int(value)
    raise UserError(f"{key} must be an integer ≥ {low}, got {value!r}")


def check_bool(key: str, value) -> bool:
    """Returns ``value`` when it is true or false; else a one-line UserError (a YAML ``yes`` is already a bool)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise UserError(f"{key} must be true or false, got {value!r}")


def check_layer(key: str, value, optional: bool = False) -> str | None:
    """Returns ``value`` when it is a layer name (a non-empty string), or None when ``optional``; else a UserError."""
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise UserError(f"{key} must be a layer name (a non-empty string){' or null' if optional else ''}, "
                        f"got {value!r}")
    return value
