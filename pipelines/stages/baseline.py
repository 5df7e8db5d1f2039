"""The baseline stage: the same student, same initial weights, epochs and learning rate, trained without a teacher.

It is what every claim of a distillation gain is measured against.
"""
from __future__ import annotations

from typing import Optional

from pipelines import run_keys, run_models, run_training
from pipelines.stage import Stage, StageSettings
from pipelines.types import Epochs


class BaselineSettings(StageSettings):
    epochs: Optional[Epochs] = None  # null: the distill stage's epochs (resolved when the recipe loads)


class Baseline(Stage):
    name = "baseline"
    mixed_precision = True
    trains = True
    settings = BaselineSettings
    model_file = "baseline.keras"
    keras_row = ("baseline", "baseline")

    def title(self, recipe):
        return f"train the same student without a teacher ({recipe.stages.baseline.epochs} epochs, same seed)"

    def resolve(self, settings, recipe):
        if settings.epochs is None:
            settings.epochs = recipe.stages.distill.epochs
            return ["epochs"]
        return []

    def key(self, ctx):
        distill = ctx.recipe.stages.distill
        return {**run_keys.training_key(ctx), "learning_rate": distill.learning_rate,
                "augment": distill.augment.model_dump()}

    def run(self, ctx, out):
        from edge_kd.fileio import write_json
        from pipelines.stages.common import save_student

        r = ctx.recipe
        student = run_models.build_student(ctx)  # the same initial weights as the distilled student
        # The distill stage's augmentation, drawn from the same seed: only the teacher differs.
        history = run_training.fit(ctx, run_training.distiller(ctx, student, "distill", distil=False),
                                   r.stages.baseline.epochs, r.stages.distill.learning_rate)
        saved = save_student(student, out / self.model_file, ctx.stage_dir(self.name).name)
        write_json(out / "history.json", history)
        return {"val_accuracy": history["val_accuracy"][-1], **saved}
