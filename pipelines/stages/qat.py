"""The QAT stage: quantization-aware training of the previous stage's student, keeping its zeros (PQAT) and
clusters (PCQAT), while it distils; the export stage makes it a full-int8 model."""
from __future__ import annotations

from edge_kd.tfmot.config import Unsupported
from pipelines import run_models, run_training
from pipelines.stage import StudentStage, TrainSettings
from pipelines.types import Epochs, LearningRate


class QATSettings(TrainSettings):
    epochs: Epochs = 2
    learning_rate: LearningRate = 1e-4
    #: a layer the 8-bit scheme cannot quantize: left in float (named on the terminal and in the report),
    #: or a one-line error
    unsupported: Unsupported = "float"


class QAT(StudentStage):
    name = "qat"
    settings = QATSettings
    model_file = "qat.keras"
    export_prefix = "qat"

    def title(self, recipe):
        return (f"quantization-aware training{' while distilling' if recipe.distils(self.name) else ''} "
                f"({recipe.stages.qat.epochs} epochs)")

    def export_variants(self, recipe):
        return ["int8"]  # a QAT model exists to become int8; its float variants would only hold fake-quant ops

    def key(self, ctx):
        return {**super().key(ctx), "qat": run_models.qat_config(ctx).model_dump()}

    def check(self, ctx):
        from edge_kd.tfmot import qat

        # the layers the scheme cannot quantize, by name
        qat.check(run_models.build_student(ctx), run_models.qat_config(ctx))

    def load(self, ctx):
        from edge_kd.tfmot import qat

        # rebuilt from the model it quantized, so the PQAT/PCQAT quantizers come back exactly
        return qat.load(ctx.stage_dir(self.name) / self.model_file,
                        base=run_models.load_student(ctx, self.weights_stage(ctx)), cfg=run_models.qat_config(ctx))

    def weights_stage(self, ctx):
        # a QAT model's variables include its quantizers' ranges; its weights are those of the model it quantized
        return ctx.previous_student(self.name)

    def run(self, ctx, out):
        from edge_kd.fileio import write_json
        from edge_kd.tfmot import qat
        from pipelines.stages.common import save_model

        spec = ctx.settings(self.name)
        source = ctx.previous_student(self.name)
        cfg = run_models.qat_config(ctx)
        student = run_models.load_student(ctx, source)
        quantized = qat.quantize(student, cfg)
        note = qat.float_note(student, quantized.qat_float_layers, cfg)
        if note:
            print(f"  qat: {note}", flush=True)
        history = run_training.fit(ctx, run_training.distiller(ctx, quantized, self.name), spec.epochs,
                                   spec.learning_rate)
        save_model(quantized, out / self.model_file, scope=qat.scope)
        write_json(out / "history.json", history)
        return {"val_accuracy": history["val_accuracy"][-1], "scheme": qat.scheme_name(cfg), "from": source,
                "float_layers": list(quantized.qat_float_layers), **({"float_note": note} if note else {})}
