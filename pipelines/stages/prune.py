"""The prune stage: magnitude pruning of the previous stage's student to a target sparsity, while it distils."""
from __future__ import annotations

from edge_kd.tfmot.config import PruneConfig
from pipelines import run_data, run_models
from pipelines.stage import StudentStage, TrainSettings, library_config
from pipelines.types import Epochs, LearningRate


class PruneSettings(TrainSettings, PruneConfig):
    """The stage's training settings and tfmot's pruning settings (``PruneConfig``, whose rules apply)."""

    epochs: Epochs = 4
    learning_rate: LearningRate = 5e-4

    def config(self) -> PruneConfig:
        """Returns the library's PruneConfig of these settings."""
        return library_config(self, PruneConfig)


class Prune(StudentStage):
    name = "prune"
    settings = PruneSettings
    model_file = "pruned.keras"
    export_prefix = "pruned"

    def title(self, recipe):
        s = recipe.stages.prune
        return (f"prune to {s.target_sparsity:.0%}{' 2:4' if s.structured_2_4 else ''}"
                f"{' while distilling' if recipe.distils(self.name) else ''} ({s.epochs} epochs)")

    def total_steps(self, ctx) -> int:
        return ctx.settings(self.name).epochs * run_data.steps_per_epoch(ctx)

    def check(self, ctx):
        from edge_kd.tfmot import prune

        prune.check(run_models.build_student(ctx), ctx.settings(self.name).config(), self.total_steps(ctx))

    def run(self, ctx, out):
        from edge_kd.tfmot import prune
        from pipelines.stages.common import refine

        cfg, steps = ctx.settings(self.name).config(), self.total_steps(ctx)
        return refine(self, ctx, out, lambda m: prune.prune(m, cfg, total_steps=steps), prune.strip,
                      callbacks=prune.callbacks())
