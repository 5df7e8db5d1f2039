"""The optional cluster stage: weight clustering of the previous stage's student, while it distils."""
from __future__ import annotations

from edge_kd.tfmot.config import ClusterConfig
from pipelines import run_models
from pipelines.stage import StudentStage, TrainSettings, library_config
from pipelines.types import Epochs, LearningRate


class ClusterSettings(TrainSettings, ClusterConfig):
    """The stage's training settings and tfmot's clustering settings (``ClusterConfig``, whose rules apply)."""

    epochs: Epochs = 2
    learning_rate: LearningRate = 2e-4

    def config(self) -> ClusterConfig:
        """Returns the library's ClusterConfig of these settings."""
        return library_config(self, ClusterConfig)


class Cluster(StudentStage):
    name = "cluster"
    settings = ClusterSettings
    model_file = "clustered.keras"
    export_prefix = "clustered"

    def title(self, recipe):
        s = recipe.stages.cluster
        return (f"cluster to {s.clusters} weights per layer{' while distilling' if recipe.distils(self.name) else ''}"
                f" ({s.epochs} epochs)")

    def check(self, ctx):
        from edge_kd.tfmot import cluster

        cluster.check(run_models.build_student(ctx), ctx.settings(self.name).config())

    def run(self, ctx, out):
        from edge_kd.tfmot import cluster
        from pipelines.stages.common import refine

        cfg = ctx.settings(self.name).config()
        return refine(self, ctx, out, lambda m: cluster.cluster(m, cfg), cluster.strip)
