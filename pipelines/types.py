"""Value types of recipe keys that more than one section uses (stages, the search section).

A leaf of the pipeline: it imports only ``edge_kd``'s config and version helpers, so a stage's settings
and the recipe's schema can both use it without importing each other.
"""
from __future__ import annotations

from typing import Annotated, Optional

from pydantic import AfterValidator

from edge_kd.config import Field, Float, Int, Invalid, Str


def _runtime_version(v):
    from edge_kd.bench.compat import version_key  # reads LiteRT's schema: only when a version is given

    try:
        version_key(v)
    except ValueError:
        raise Invalid("", f"must be a TFLite runtime version such as 2.14 or 2.14.0, got {v!r}") from None
    return v


#: a TFLite runtime version, "2.14" or "2.14.0" (a model must load on it: bundle.min_runtime, search.min_runtime)
RuntimeVersion = Annotated[Str, AfterValidator(_runtime_version)]
Epochs = Annotated[Int, Field(ge=1)]
#: a stage's learning rate; null means the recipe's training.learning_rate (resolved when the recipe loads)
LearningRate = Optional[Annotated[Float, Field(gt=0)]]
