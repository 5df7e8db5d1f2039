"""The teacher stage: trains the recipe's teacher architecture when the user brings no teacher of their own."""
from __future__ import annotations

from pipelines.stage import AugmentedSettings, Stage, resolve_augment


class Teacher(Stage):
    name = "teacher"
    mixed_precision = True
    trains = True
    settings = AugmentedSettings
    model_file = "teacher.keras"
    keras_row = ("teacher", "teacher")

    def title(self, recipe):
        return f"train teacher '{recipe.teacher.arch}' ({recipe.teacher.epochs} epochs)"

    def resolve(self, settings, recipe):
        return resolve_augment(settings, recipe)

    def key(self, ctx):
        tr = ctx.recipe.training
        t = ctx.recipe.teacher
        return {**ctx.data_key(), "batch_size": tr.batch_size, "strategy": tr.strategy,
                "mixed_precision": tr.mixed_precision, "teacher": t.model_dump(),
                "weights": None if t.weights is None else ctx.file_key(t.weights, "teacher.weights")}

    def check(self, ctx):
        ctx.build_teacher()  # the architecture and its options build for this data

    def run(self, ctx, out):
        from edge_kd.distill import Distiller
        from edge_kd.fileio import write_json
        from pipelines.stages.common import save_model

        t = ctx.recipe.teacher
        model = ctx.build_teacher()
        distiller = Distiller(model, augment=ctx.augmenter(self.name), label_smoothing=t.label_smoothing)
        history = ctx.fit(distiller, t.epochs, t.learning_rate, optimizer=t)
        save_model(model, out / self.model_file)
        write_json(out / "history.json", history)
        return {"val_accuracy": history["val_accuracy"][-1]}
