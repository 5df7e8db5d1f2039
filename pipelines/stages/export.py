"""The export stage: every model of the run as TFLite (the teacher fp32; each student stage in its variants)."""
from __future__ import annotations

from typing import Annotated

from edge_kd.config import Bool, Field, Int, Literal
from pipelines.stage import Stage, StageSettings, StudentStage

Variant = Literal["fp32", "fp16", "dynamic", "int8"]


class ExportSettings(StageSettings):
    variants: Annotated[list[Variant], Field(min_length=1)] = ["fp32", "fp16", "dynamic", "int8"]
    int8_io: Bool = True
    representative_samples: Annotated[Int, Field(ge=1)] = 500


class Export(Stage):
    name = "export"
    settings = ExportSettings
    folder = "tflite"
    required = True

    def title(self, recipe):
        return "export TFLite models"

    def reads(self, ctx):
        return [n for n in ctx.enabled() if n == "teacher" or isinstance(ctx.stages[n], StudentStage)]

    def key(self, ctx):
        return {**ctx.data_key(), "teacher": ctx.teacher_key()}

    def plan(self, ctx) -> list[dict]:
        """Returns one entry per file to write: name, the stage whose model it converts, role and variant."""
        plan = []
        if ctx.recipe.teacher is not None:
            plan.append({"name": "teacher-fp32", "stage": "teacher", "role": "teacher", "variant": "fp32"})
        for n in ctx.student_stages():
            stage = ctx.stages[n]
            plan += [{"name": f"{stage.export_prefix}-{v}", "stage": n, "role": "student", "variant": v}
                     for v in stage.export_variants(ctx.recipe)]
        return plan

    def run(self, ctx, out):
        import numpy as np

        from edge_kd.export import tflite
        from edge_kd.fileio import write_bytes, write_json

        spec = ctx.settings(self.name)
        x_train, _ = ctx.bundle.arrays("train")
        rep = x_train[np.random.default_rng(ctx.recipe.seed).permutation(len(x_train))[: spec.representative_samples]]
        loaded = {}
        plan = self.plan(ctx)
        for item in plan:
            stage = item["stage"]
            if stage not in loaded:
                loaded[stage] = ctx.teacher() if stage == "teacher" else ctx.load_student(stage)
            flat = tflite.convert(loaded[stage], item["variant"], representative=rep if item["variant"] == "int8" else None,
                                  int8_io=spec.int8_io)
            write_bytes(out / f"{item['name']}.tflite", flat)
            item["path"] = f"{self.folder}/{item['name']}.tflite"
        write_json(out / "exports.json", plan)
        return {"files": len(plan)}
