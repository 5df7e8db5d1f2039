"""The recipe's ``search`` section: the space of candidates, the accuracy target, the constraints, the budget.

Read by ``pipelines.search`` only (``pipelines.compress`` ignores it); its command-line options set
the same keys. Every key has a default but the target: ``target_accuracy`` or ``max_drop``.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Optional

from edge_kd.config import Config, Field, Float, Int, Str
from edge_kd.export.variants import SEARCHABLE, SearchableVariant
from pipelines.types import RuntimeVersion


class StudentChoice(Config):
    #: default: the recipe's student.arch
    arch: Optional[Str] = None
    #: the architecture's options (models.options_of), replacing the recipe's student.options
    options: dict[str, Any] = {}
    #: a weights file this student starts from (student.weights)
    weights: Optional[Str] = None


class SearchSpec(Config):
    """What ``pipelines.search`` searches over, for what, within what."""

    #: the students to try; null: the recipe's student at each of ``widths`` (its width, or its hidden sizes, times it)
    students: Optional[Annotated[list[StudentChoice], Field(min_length=1)]] = None
    widths: Annotated[list[Annotated[Float, Field(gt=0)]], Field(min_length=1)] = [0.5, 0.75, 1.0, 1.5]
    #: target sparsities of the prune stage; 0 is no pruning; null: [0.5, 0.75] (with a prune stage in the recipe)
    sparsity: Optional[Annotated[list[Annotated[Float, Field(ge=0, lt=1)]], Field(min_length=1)]] = None
    #: the quantization variants a candidate may ship (int8_mixed is the selective one: its worst layers in float)
    variants: Annotated[list[SearchableVariant], Field(min_length=1)] = list(SEARCHABLE)
    #: alternatives of the loss, each {hard_weight, terms} as in the distillation section; empty: the recipe's
    losses: list[dict[str, Any]] = []
    #: the target, on the validation split: at least this accuracy (a fraction), or at most max_drop points below
    #: the teacher's validation accuracy
    target_accuracy: Optional[Annotated[Float, Field(gt=0, le=1)]] = None
    max_drop: Optional[Annotated[Float, Field(ge=0, le=100)]] = None
    #: constraints on the shipped file: size in KB (1024 bytes), latency in ms (batch 1, at the benchmark's first
    #: thread count), the oldest TFLite runtime it must load on
    max_kb: Optional[Annotated[Float, Field(gt=0)]] = None
    max_latency_ms: Optional[Annotated[Float, Field(gt=0)]] = None
    min_runtime: Optional[RuntimeVersion] = None
    #: what "smallest" means: file size, latency, or gzip size (where sparsity pays)
    objective: Literal["size", "latency", "gzip"] = "size"
    #: the budget: how many points of the space are trained at all, and the wall time of one invocation
    max_candidates: Annotated[Int, Field(ge=1)] = 24
    max_minutes: Optional[Annotated[Float, Field(gt=0)]] = None
    #: successive halving: ``rungs`` rounds, each training 1/eta as many candidates eta times as long as the one
    #: before; the last at the recipe's epochs
    rungs: Annotated[Int, Field(ge=1, le=4)] = 2
    eta: Annotated[Int, Field(ge=2)] = 3
