"""The bundle stage: the folder an app developer drops in (the chosen .tflite, labels, manifest, golden vectors)."""
from __future__ import annotations

from typing import Annotated, Optional

from edge_kd.config import Field, Float, Int, Str
from edge_kd.errors import UserError
from pipelines import run_data, run_keys
from pipelines.fingerprint import fingerprint
from pipelines.stage import Stage, StageSettings
from pipelines.types import RuntimeVersion


class BundleSettings(StageSettings):
    #: the exported model to bundle, e.g. qat-int8; default: the smallest integer model within tolerance_pp of the
    #: best, by validation accuracy
    pick: Optional[Str] = None
    #: accuracy points the default pick may give up for size
    tolerance_pp: Annotated[Float, Field(ge=0)] = 0.5
    #: real test images stored with their expected outputs
    golden: Annotated[Int, Field(ge=1, le=1000)] = 8
    #: e.g. "2.14": bundle only a model that loads on this TFLite runtime (read from each file's metadata)
    min_runtime: Optional[RuntimeVersion] = None


class Bundle(Stage):
    name = "bundle"
    settings = BundleSettings
    shareable = False  # it names its run (its folder, command, recipe)

    def title(self, recipe):
        return "write the deployable bundle"

    def reads(self, ctx):
        return ["benchmark"]

    def key(self, ctx):
        return {**run_keys.data_key(ctx), "recipe_hash": fingerprint(ctx.recipe.to_dict())}  # the manifest records it

    def check(self, ctx):
        pick = ctx.settings(self.name).pick
        if pick is None and not ctx.settings("benchmark").validation:
            raise UserError("stages.bundle picks its file on the validation split, which benchmark.validation: false "
                            "leaves unmeasured; set it true (or null), or name the file with bundle.pick")
        names = [item["name"] for item in ctx.stages["export"].plan(ctx)]
        if pick is not None and pick not in names:
            raise UserError(f"stages.bundle.pick '{pick}' is not a model this run exports; it exports: "
                            f"{', '.join(names)}")

    def run(self, ctx, out):
        import json

        import numpy as np

        from edge_kd.bench.results import rows_of
        from edge_kd.export import bundle as bundle_mod
        from edge_kd.version import __version__

        r, spec, data = ctx.recipe, ctx.settings(self.name), run_data.load(ctx)
        info = data.info
        rows = rows_of(json.loads((ctx.stage_dir("benchmark") / "models.json").read_text())["models"])
        chosen = bundle_mod.pick(rows, tolerance_pp=spec.tolerance_pp, name=spec.pick, min_runtime=spec.min_runtime)
        split = "test" if data.count("test") else "val"  # a run without a test set: held-out synthetic images
        x_raw = data.raw(split, np.random.default_rng(r.seed).permutation(data.count(split))[: spec.golden])
        bundle_mod.write_bundle(out, ctx.run_dir / chosen.path, class_names=list(info.class_names),
                                input_scale=info.input_scale, input_offset=info.input_offset, golden_x_raw=x_raw,
                                measured=bundle_mod.measured_from(chosen), recipe_hash=fingerprint(r.to_dict()),
                                version=__version__)
        return {"model": chosen.name, "accuracy": chosen.accuracy, "size_bytes": chosen.size_bytes,
                "min_runtime": chosen.min_runtime, "for_runtime": spec.min_runtime,
                # how it was chosen, for the report: named in the recipe, or on the validation split
                "picked_by": "name" if spec.pick is not None else "validation",
                "tolerance_pp": spec.tolerance_pp, "val_accuracy": chosen.val_accuracy}
