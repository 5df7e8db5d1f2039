"""The settings of pruning, clustering and QAT: typed configs, each the one statement of its rules.

Kept apart from the wrappers so that a recipe is validated without importing
tensorflow-model-optimization; ``edge_kd.tfmot.prune.PruneConfig`` and the others are these.

>>> PruneConfig(target_sparsity=0.5, frequency=50).end_fraction
1.0
"""
from __future__ import annotations

from typing import Annotated, ClassVar, Literal, Optional

from pydantic import model_validator

from edge_kd.config import Bool, Config, Field, Float, Int, Invalid

Schedule = Literal["polynomial", "constant"]
Init = Literal["kmeans_plus_plus", "density_based", "linear", "random"]
#: what becomes of a layer the scheme cannot quantize: a one-line error, or left in float
Unsupported = Literal["error", "float"]
MAX_CLUSTERS = 256  # an int8 kernel holds at most 256 distinct values


class PruneConfig(Config):
    """Settings of magnitude pruning; a wrong value is a UserError naming the key, the value and what is allowed.

    The target is reached at ``end_step``, or, when that is None, at ``end_fraction`` of the steps
    ``prune`` is given (the rest fine-tunes at the target sparsity).
    """

    KEY: ClassVar[str] = "prune"
    target_sparsity: Annotated[Float, Field(gt=0, lt=1)] = 0.75
    schedule: Schedule = "polynomial"
    initial_sparsity: Annotated[Float, Field(ge=0, lt=1)] = 0.0
    begin_step: Annotated[Int, Field(ge=0)] = 0
    end_step: Optional[Annotated[Int, Field(ge=1)]] = None
    end_fraction: Annotated[Float, Field(gt=0, le=1)] = 1.0
    frequency: Annotated[Int, Field(ge=1)] = 100
    structured_2_4: Bool = False

    @model_validator(mode="after")
    def _ordered(self):
        if self.schedule == "polynomial" and not self.initial_sparsity < self.target_sparsity:
            raise Invalid("initial_sparsity", f"must be below target_sparsity ({self.target_sparsity:g}), got "
                                              f"{self.initial_sparsity!r}")
        if self.end_step is not None and not self.end_step > self.begin_step:
            raise Invalid("end_step", f"must be above begin_step ({self.begin_step}), got {self.end_step!r}")
        return self


class ClusterConfig(Config):
    """Settings of weight clustering; a wrong value is a UserError naming the key, the value and what is allowed."""

    KEY: ClassVar[str] = "cluster"
    clusters: Annotated[Int, Field(ge=2, le=MAX_CLUSTERS)] = 16
    preserve_sparsity: Bool = True
    init: Init = "kmeans_plus_plus"

    @model_validator(mode="after")
    def _enough_clusters(self):
        # tfmot needs more than 2 clusters when one of them is the kept zero.
        if self.preserve_sparsity and self.clusters < 3:
            raise Invalid("clusters", f"must be at least 3 with preserve_sparsity (one cluster is the kept zero), "
                                      f"got {self.clusters}")
        return self


class QATConfig(Config):
    """Settings of quantization-aware training; a wrong value is a UserError naming the key, value and allowed."""

    KEY: ClassVar[str] = "qat"
    preserve_sparsity: Bool = True
    preserve_clusters: Bool = False
    unsupported: Unsupported = "float"
