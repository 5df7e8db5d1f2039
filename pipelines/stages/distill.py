"""The distill stage: a fresh student (or the synthesize stage's companion) trained with the recipe's loss (or,
without a teacher, on labels alone)."""
from __future__ import annotations

from pathlib import Path

from edge_kd.config import Literal
from pipelines import run_models, run_training
from pipelines.stage import StudentStage, TrainSettings


class DistillSettings(TrainSettings):
    """The first student stage's settings: those of every training stage, and where its student starts."""

    #: fresh: weights drawn from the recipe's seed (or student.weights); companion: the weights of the student the
    #: synthesize stage's generator was trained against (DFAD's own student), so the distillation on the images
    #: goes on from what that student learnt while they were made
    start: Literal["fresh", "companion"] = "fresh"


class Distill(StudentStage):
    name = "distill"
    settings = DistillSettings
    mixed_precision = True
    model_file = "student.keras"
    required = True
    refines = False
    export_prefix = "student"
    keras_row = ("student", "student")

    def title(self, recipe):
        epochs = recipe.stages.distill.epochs
        arch = Path(recipe.student.path).name if recipe.student.path else recipe.student.arch
        if recipe.distils("distill"):
            return f"distil student '{arch}' ({epochs} epochs)"
        return f"train student '{arch}' without a teacher ({epochs} epochs)"

    def reads(self, ctx):
        return [*super().reads(ctx), *(["synthesize"] if ctx.recipe.stages.distill.start == "companion" else [])]

    def check(self, ctx):
        from pipelines.stages.common import check_distiller

        # Every distilling stage uses the same terms and teachers: one check, for the first that distils.
        first = next((s for s in ctx.student_stages() if ctx.recipe.distils(s)), None)
        if first is not None:
            check_distiller(ctx, run_models.build_student(ctx), first)

    def run(self, ctx, out):
        from edge_kd.fileio import write_json
        from pipelines.stages.common import save_model, save_student

        r = ctx.recipe
        spec = r.stages.distill
        student, peers = run_models.build_student(ctx), None
        if spec.start == "companion":  # the file the synthesize stage names (no import: its code is not distill's)
            from models import load_weights

            companion = ctx.manifests["synthesize"]["summary"]["companion"]
            load_weights(student, ctx.stage_dir("synthesize") / companion, "stages.distill.start")
        if r.distils(self.name) and r.distillation.mode == "mutual":
            # The recipe says which of the models trained together is exported; the others are kept as its peers.
            models = [student, *run_models.build_peers(ctx)]
            student = models.pop(r.distillation.export)
            peers = models
        history = run_training.fit(ctx, run_training.distiller(ctx, student, self.name, peers=peers), spec.epochs,
                                   spec.learning_rate)
        saved = save_student(student, out / self.model_file, ctx.stage_dir(self.name).name)
        for i, peer in enumerate(peers or []):
            (out / "peers").mkdir(exist_ok=True)
            save_model(peer, out / "peers" / f"peer_{i}.keras")
        write_json(out / "history.json", history)
        return {"val_accuracy": history["val_accuracy"][-1], "distilled": r.distils(self.name), **saved}
