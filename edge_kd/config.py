"""Typed settings: the base of every config object in edge-kd, validated by pydantic into one-line errors.

A config is a pydantic model with strict types (an integer is not a float with no fraction, true is
not 1, "8" is not 8) and no unknown keys. Built from Python, a bad value raises ``UserError``
with one line naming the key, what is allowed and what was given::

    >>> from edge_kd.tfmot.config import PruneConfig
    >>> PruneConfig(target_sparsity=1.5)
    Traceback (most recent call last):
    edge_kd.errors.UserError: prune.target_sparsity must be in (0, 1), got 1.5

A recipe nests them (``stages.prune`` is a PruneConfig with the stage's training settings), and
``describe`` gives the same line with the full key (``stages.prune.target_sparsity``).

The types below are the shared rules: ``Int``/``Float``/``Bool``/``Str`` are strict, and a
constraint on a field (``Field(gt=0)``) is its one statement of what is allowed. A validator that
needs more than a type says so by raising ``Invalid(key, "must ...")``.
"""
from __future__ import annotations

import types
import typing
from typing import Annotated, Any, ClassVar, Literal

import annotated_types
import pydantic
from pydantic import BaseModel, ConfigDict, Field, Strict

from edge_kd.errors import UserError

__all__ = ["Config", "Invalid", "describe", "Int", "Float", "Bool", "Str", "Field", "Literal", "show"]

Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]  # strict, but an integer is a number: 1 is accepted as 1.0
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]


class Invalid(ValueError):
    """Raised by a validator: ``key`` (relative to the model, or "") ``must ...`` — the rest of the line."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key, self.message = key, message


class _OneLineErrors(type(BaseModel)):
    """Turns a bad value given to ``SomeConfig(...)`` into a one-line UserError.

    On the metaclass, not ``__init__``: pydantic calls an overridden ``__init__`` for nested models
    too, which would turn their errors into UserErrors that have lost the outer keys.
    """

    def __call__(cls, *args, **kwargs):
        try:
            return super().__call__(*args, **kwargs)
        except pydantic.ValidationError as e:
            raise UserError(describe(e, cls, cls.KEY)) from None


class Config(BaseModel, metaclass=_OneLineErrors):
    """Base of edge-kd's settings: strict types, no unknown keys, one-line ``UserError`` on a bad value.

    ``KEY`` prefixes the field names in errors of a config built directly (``prune`` for PruneConfig).
    """

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=False, protected_namespaces=())
    KEY: ClassVar[str] = ""

    @classmethod
    def parse(cls, raw: Any, prefix: str = ""):
        """Returns the config validated from plain data ``raw`` (a mapping), errors keyed under ``prefix``."""
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise UserError(f"{prefix or cls.KEY or 'settings'} must be a mapping, got {show(raw)}")
        try:
            return cls.model_validate(raw)
        except pydantic.ValidationError as e:
            raise UserError(describe(e, cls, prefix)) from None


# -- one line from a ValidationError ----------------------------------------------------------------------
_TYPE_WORDS = {"int_type": "an integer", "float_type": "a number", "bool_type": "true or false",
               "string_type": "a string", "list_type": "a list", "dict_type": "a mapping", "model_type": "a mapping",
               "model_attributes_type": "a mapping", "tuple_type": "a list", "none_required": "null"}
_BOUNDS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}


def show(value) -> str:
    """Returns ``value`` as a recipe would spell it (null, true, 'text', [1, 2])."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def describe(error: pydantic.ValidationError, model: type, prefix: str = "") -> str:
    """Returns one line for the first error of ``error`` raised validating ``model``, keys under ``prefix``."""
    e = error.errors(include_url=False)[0]
    loc = [str(p) for p in e["loc"]]
    kind, given = e["type"], e.get("input")
    annotation, owner = _annotation_at(model, e["loc"])
    if kind in ("value_error", "assertion_error"):
        exc = (e.get("ctx") or {}).get("error")
        if isinstance(exc, Invalid):
            key = _key(prefix, [*loc, *([exc.key] if exc.key else [])])
            return f"{key} {exc.message}" if key else exc.message
        text = str(exc) if exc is not None else e["msg"]
        key = _key(prefix, loc)
        return f"{key}: {text}" if key else text
    key = _key(prefix, loc)
    if kind == "extra_forbidden":
        allowed = ", ".join(owner.model_fields) if owner is not None else "none"
        return f"unknown key '{key}'; allowed: {allowed}"
    if kind == "missing":
        return f"{key} is required"
    if kind == "literal_error":
        return f"{key} must be one of {', '.join(map(str, _choices(annotation)))}, got {show(given)}"
    if kind in _TYPE_WORDS or kind in _BOUNDS:
        what = _TYPE_WORDS.get(kind) or _type_word(annotation)
        bounds = _bounds(annotation)
        if kind in _BOUNDS:
            return f"{key} must be {what} {bounds or _bound_of(e)}, got {show(given)}"
        return f"{key} must be {what}{' ' + bounds if bounds else ''}{' or null' if _optional(annotation) else ''}, " \
               f"got {show(given)}"
    if kind in ("too_short", "too_long"):
        ctx = e.get("ctx") or {}
        n = ctx.get("min_length") if kind == "too_short" else ctx.get("max_length")
        return f"{key} must have {'at least' if kind == 'too_short' else 'at most'} {n} item(s), got {show(given)}"
    return f"{key}: {e['msg'][:1].lower()}{e['msg'][1:]}, got {show(given)}"


def _key(prefix: str, loc: list[str]) -> str:
    return ".".join([p for p in prefix.split(".") if p] + loc)


def _unwrap_optional(tp):
    """Returns (``tp`` without ``| None``, whether it allowed None)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _optional(tp) -> bool:
    return tp is not None and _unwrap_optional(tp)[1]


def _strip_annotated(tp):
    """Returns (the bare type, the metadata of every Annotated and Optional layer around it)."""
    meta = []
    tp, _ = _unwrap_optional(tp)
    while typing.get_origin(tp) is Annotated:
        args = typing.get_args(tp)
        meta += list(args[1:])
        tp, _ = _unwrap_optional(args[0])
    return tp, meta


def _annotation_at(model, loc):
    """Returns (the annotation of the value at ``loc`` in ``model``, the model class holding its last key)."""
    owner, tp = model, None
    for part in loc:
        if tp is not None:
            bare, _ = _strip_annotated(tp)
            if isinstance(bare, type) and issubclass(bare, BaseModel):
                owner = bare
            elif typing.get_origin(bare) in (list, tuple) and isinstance(part, int):
                tp = (typing.get_args(bare) or (Any,))[0]
                continue
            elif typing.get_origin(bare) is dict:
                tp = (typing.get_args(bare) or (Any, Any))[-1]
                continue
            else:
                return None, None
        if not isinstance(part, str) or part not in owner.model_fields:
            return None, owner
        info = owner.model_fields[part]
        tp = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
    return tp, owner


def _choices(tp) -> tuple:
    bare, _ = _strip_annotated(tp)
    return typing.get_args(bare) if typing.get_origin(bare) is Literal else ()


def _type_word(tp) -> str:
    bare, _ = _strip_annotated(tp)
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(bare, "a value")


def _bounds(tp) -> str:
    """Returns the allowed range of ``tp``'s constraints, e.g. "in (0, 1)" or "≥ 1", or ""."""
    if tp is None:
        return ""
    _, meta = _strip_annotated(tp)
    low = high = None
    for m in meta:
        for item in (m.metadata if isinstance(m, pydantic.fields.FieldInfo) else [m]):
            if isinstance(item, annotated_types.Gt):
                low = ("(", item.gt)
            elif isinstance(item, annotated_types.Ge):
                low = ("[", item.ge)
            elif isinstance(item, annotated_types.Lt):
                high = (")", item.lt)
            elif isinstance(item, annotated_types.Le):
                high = ("]", item.le)
    if low and high:
        return f"in {low[0]}{low[1]:g}, {high[1]:g}{high[0]}"
    if low:
        return f"{'>' if low[0] == '(' else '≥'} {low[1]:g}"
    if high:
        return f"{'<' if high[0] == ')' else '≤'} {high[1]:g}"
    return ""


def _bound_of(e) -> str:
    ctx = e.get("ctx") or {}
    for k, sym in (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤")):
        if k in ctx:
            return f"{sym} {ctx[k]:g}"
    return "in range"
