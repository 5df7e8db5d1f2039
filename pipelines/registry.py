"""The stages of a run, in running order: the one list the recipe, the runner and the report derive from.

Adding a stage is one module under ``pipelines/stages/`` (a ``Stage`` subclass, see ``pipelines.stage``)
and one entry here, at the place in the order where it runs.
"""
from __future__ import annotations

from pipelines.stage import Stage, StudentStage
from pipelines.stages import (baseline, benchmark, bundle, cluster, distill, export, prune, qat, report, synthesize,
                              teacher)

STAGES: dict[str, Stage] = {s.name: s for s in (
    teacher.Teacher(),
    synthesize.Synthesize(),
    distill.Distill(),
    baseline.Baseline(),
    prune.Prune(),
    cluster.Cluster(),
    qat.QAT(),
    export.Export(),
    benchmark.Benchmark(),
    bundle.Bundle(),
    report.Report(),
)}


def student_stages() -> list[str]:
    """Returns the stages that leave a student model, in running order (distill, prune, cluster, qat)."""
    return [name for name, stage in STAGES.items() if isinstance(stage, StudentStage)]
