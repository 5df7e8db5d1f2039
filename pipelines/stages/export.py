"""The export stage: every model of the run as TFLite (the teacher fp32; each student stage in its variants).

``int8_mixed`` keeps some layers in float: those named in ``float_layers`` (Keras layer names) and
the ``float_worst`` layers that add the most error in the stage's ``int8`` file, measured against its
float file on the validation split (never the test split, which only the benchmark reads).
"""
from __future__ import annotations

from typing import Annotated, Optional

from pydantic import model_validator

from edge_kd.config import Bool, Field, Int, Invalid, Literal, Str
from edge_kd.data import SYNTHETIC
from edge_kd.errors import UserError
from edge_kd.export.variants import Variant
from pipelines import run_data, run_keys, run_models
from pipelines.stage import Stage, StageSettings

Models = Literal["all", "final"]
Representative = Literal["train", "synthetic"]


class ExportSettings(StageSettings):
    variants: Annotated[list[Variant], Field(min_length=1)] = ["fp32", "fp16", "dynamic", "int8"]
    int8_io: Bool = True
    representative_samples: Annotated[Int, Field(ge=1)] = 500
    #: what the calibrated variants (int8, int8_mixed, int16x8) are calibrated on: training images, or the images
    #: stages.synthesize makes from the teacher alone (for a user who cannot use the training data); null: train, or
    #: synthetic where the data is (data.source: synthetic)
    representative: Optional[Representative] = None
    #: int8_mixed: these Keras layers stay in float (both keys are unused without int8_mixed in variants)
    float_layers: list[Str] = []
    #: int8_mixed: and so do the N layers that add the most error (measured on validation images)
    float_worst: Annotated[Int, Field(ge=0)] = 0
    #: validation images the float_worst measurement runs on
    float_samples: Annotated[Int, Field(ge=1)] = 256
    #: all: the teacher and every student stage's model; final: only the last student stage's (what a search
    #: candidate ships)
    models: Models = "all"

    @model_validator(mode="after")
    def _mixed(self):
        mixed = "int8_mixed" in self.variants
        if mixed and not (self.float_layers or self.float_worst):
            raise Invalid("variants", "with int8_mixed needs float_layers (layer names) or float_worst (a count) "
                                      "to say which layers stay in float")
        return self


class Export(Stage):
    name = "export"
    settings = ExportSettings
    folder = "tflite"
    required = True

    def title(self, recipe):
        return "export TFLite models"

    def resolve(self, settings, recipe):
        if settings.representative is None:
            settings.representative = "synthetic" if recipe.data.source == SYNTHETIC else "train"
            return ["representative"]
        if settings.representative == "train" and recipe.data.source == SYNTHETIC:
            raise UserError(f"stages.export.representative: train has no training images with data.source "
                            f"{SYNTHETIC}; use synthetic (the default)")
        return []

    def reads(self, ctx):
        synthetic = ctx.settings(self.name).representative == "synthetic"
        return [n for n in ctx.enabled() if n == "teacher" or n in ctx.student_stages()
                or (n == "synthesize" and synthetic)]

    def key(self, ctx):
        return {**run_keys.data_key(ctx), "teacher": run_keys.teacher_key(ctx)}

    def plan(self, ctx) -> list[dict]:
        """Returns one entry per file to write: name, the stage whose model it converts, role and variant."""
        plan, final = [], ctx.settings(self.name).models == "final"
        if ctx.recipe.teacher is not None and not final:
            plan.append({"name": "teacher-fp32", "stage": "teacher", "role": "teacher", "variant": "fp32"})
        for n in ctx.student_stages()[-1:] if final else ctx.student_stages():
            stage = ctx.stages[n]
            plan += [{"name": f"{stage.export_prefix}-{v}", "stage": n, "role": "student", "variant": v}
                     for v in stage.export_variants(ctx.recipe)]
        return plan

    def check(self, ctx):
        spec = ctx.settings(self.name)
        if spec.representative == "synthetic" and "synthesize" not in ctx.enabled():
            raise UserError("stages.export.representative: synthetic calibrates on the images stages.synthesize makes "
                            "from the teacher; add that stage (--set stages.synthesize={})")
        if spec.float_layers and "int8_mixed" in spec.variants:  # Keras layer names: an untrained student has them
            import numpy as np

            from edge_kd.export import tflite

            x = np.zeros((1, *run_data.load(ctx).info.input_shape), np.float32)
            self.known_layers(spec, self.layer_tensors(tflite.convert(run_models.build_student(ctx), "fp32"), x))

    @staticmethod
    def layer_tensors(flat: bytes, x) -> dict:
        """Returns {Keras layer: [the op output tensors it is fused into]} of a float TFLite file."""
        from edge_kd.bench import layer_error

        ops, _ = layer_error.op_outputs(flat, x)
        by_layer: dict = {}
        for op in ops:
            for name in op["outputs"]:
                for layer in layer_error.layer_name(name).split("+"):
                    by_layer.setdefault(layer, []).append(name)
        return by_layer

    @staticmethod
    def known_layers(spec, by_layer: dict):
        """Raises a UserError naming the layers there are when ``float_layers`` names one the graph lacks."""
        unknown = [n for n in spec.float_layers if n not in by_layer]
        if unknown:
            raise UserError(f"stages.export.float_layers: no layer {', '.join(map(repr, unknown))} in the student's "
                            f"TFLite graph; its layers: {', '.join(sorted(by_layer))}")

    def run(self, ctx, out):
        import numpy as np

        from edge_kd import interrupt
        from edge_kd.export import tflite
        from edge_kd.fileio import write_bytes, write_json

        spec = ctx.settings(self.name)
        rep = self.representative(ctx, spec)
        flats = {}
        plan = self.plan(ctx)
        # one model at a time, saved once for all its variants; int8_mixed is made from the model's int8 and fp32
        # files, so those come first
        for stage in dict.fromkeys(item["stage"] for item in plan):
            model = run_models.teacher(ctx) if stage == "teacher" else run_models.saved_student(ctx, stage)
            items = sorted((i for i in plan if i["stage"] == stage), key=lambda i: i["variant"] == "int8_mixed")
            with tflite.saved_model(model) as saved:
                for item in items:
                    interrupt.check()
                    variant = item["variant"]
                    float_tensors = None
                    if variant == "int8_mixed":
                        float_tensors, item["float_layers"] = self.float_tensors(ctx, spec, model, rep, flats, stage,
                                                                                 saved)
                    flat = tflite.convert(model, variant, representative=rep if variant in tflite.CALIBRATED else None,
                                          int8_io=spec.int8_io, float_tensors=float_tensors, saved=saved)
                    flats[(stage, variant)] = flat
                    write_bytes(out / f"{item['name']}.tflite", flat)
                    item["path"] = f"{self.folder}/{item['name']}.tflite"
                    item["calibration"] = spec.representative if variant in tflite.CALIBRATED else None
        write_json(out / "exports.json", plan)
        return {"files": len(plan)}

    @staticmethod
    def representative(ctx, spec):
        """Returns the model inputs the calibrated variants are calibrated on: ``representative_samples`` training
        images drawn by the seed (in a run without training images, its synthetic ones), or with ``representative:
        synthetic`` beside real data, the first of the synthesize stage's (their classes shuffled and balanced)."""
        import numpy as np

        data = run_data.load(ctx)
        if spec.representative == "synthetic" and ctx.recipe.data.source != SYNTHETIC:
            from pipelines.stages import synthesize

            x, _ = synthesize.images(ctx)
            return data.normalise(x[: spec.representative_samples])
        picked = np.random.default_rng(ctx.recipe.seed).permutation(data.count("train"))
        rep, _ = data.arrays("train", picked[: spec.representative_samples])  # reads only these, streamed or not
        return rep

    def float_tensors(self, ctx, spec, model, rep, flats, stage, saved) -> tuple[list[str], list[str]]:
        """Returns (the op output tensors int8_mixed keeps in float, their layer names) for ``stage``'s model
        (``saved``: its ``tflite.saved_model`` folder)."""
        from edge_kd.bench import layer_error
        from edge_kd.export import tflite

        def flat(variant):
            if (stage, variant) not in flats:
                flats[(stage, variant)] = tflite.convert(model, variant, representative=rep, int8_io=spec.int8_io,
                                                         saved=saved)
            return flats[(stage, variant)]

        by_layer = self.layer_tensors(flat("fp32"), rep[:1])
        self.known_layers(spec, by_layer)
        chosen = [t for n in spec.float_layers for t in by_layer[n]]
        if spec.float_worst:
            x_val, _ = run_data.load(ctx).first("val", spec.float_samples)
            errors = layer_error.layer_errors(flat("fp32"), flat("int8"), x_val)
            chosen += [t for t in layer_error.worst_tensors(errors, spec.float_worst) if t not in chosen]
        if not chosen:
            raise UserError(f"stages.export: no layer of the {stage} model's int8 file adds error on the validation "
                            "images, so int8_mixed has nothing to keep in float; name layers in float_layers")
        return chosen, [layer_error.layer_name(t) for t in chosen]
