"""The synthesize stage: images made from the teacher alone (DeepInversion, ``edge_kd.datafree``).

It writes ``synthetic/images.npz`` (``x``: uint8 images of the data's shape; ``y``: the class each was made for;
``teacher``: the class the teacher gives it) and ``synthetic/grid.png`` (a row of images per class, which the
report shows). ``stages.export.representative: synthetic`` calibrates the int8 files on them instead of training
images. The images are made a batch at a time from the recipe's seed and the batch's number; each finished batch
is kept in ``.resume/synthesize/``, so a stopped run goes on after its last finished batch and makes the same
images as an uninterrupted one.
"""
from __future__ import annotations

from typing import Annotated, ClassVar, Optional

from edge_kd.config import Field, Int
from edge_kd.datafree import InversionConfig
from edge_kd.errors import UserError
from pipelines import run_data, run_keys, run_models
from pipelines.stage import Stage, StageSettings, library_config

#: images per class in the report's grid
GRID_PER_CLASS = 8


class SynthesizeSettings(StageSettings, InversionConfig):
    """How many images, in batches of how many (a batch's BatchNormalization statistics are what is matched), and
    the optimisation of each batch (``edge_kd.datafree.InversionConfig``)."""

    KEY: ClassVar[str] = "stages.synthesize"
    images: Annotated[Int, Field(ge=1)] = 512
    batch_size: Annotated[Int, Field(ge=2)] = 128
    #: the seed the images are drawn from; null: the recipe's seed
    seed: Optional[Int] = None


class Synthesize(Stage):
    name = "synthesize"
    settings = SynthesizeSettings
    folder = "synthetic"
    resume_unit = "batch"

    def title(self, recipe):
        s = recipe.stages.synthesize
        return f"synthesize {s.images} images from the teacher (DeepInversion, {s.steps} steps a batch)"

    def resolve(self, settings, recipe):
        if settings.seed is None:
            settings.seed = recipe.seed
            return ["seed"]
        return []

    def reads(self, ctx):
        return ["teacher"] if "teacher" in ctx.enabled() else []

    def key(self, ctx):
        # what the images depend on besides the settings: the teacher and the input it takes, never the images of
        # the data (a run without them makes the same images)
        info = run_data.load(ctx).info
        return {"teacher": run_keys.teacher_key(ctx),
                "input": {"shape": list(info.input_shape), "classes": info.num_classes,
                          "scale": info.input_scale, "offset": info.input_offset}}

    def check(self, ctx):
        if ctx.recipe.teacher is None:
            raise UserError("stages.synthesize makes images from the teacher, and the recipe has none (teacher: null)")
        from edge_kd.datafree import require_batchnorm

        # the architecture the teacher stage will train, or the user's file
        require_batchnorm(run_models.build_teacher(ctx) if "teacher" in ctx.enabled() else run_models.teacher(ctx))

    def _inverter(self, ctx):
        from edge_kd.datafree import Inverter

        info = run_data.load(ctx).info
        return Inverter(run_models.teacher(ctx), info.input_shape, info.input_scale, info.input_offset,
                        config=library_config(ctx.settings(self.name), InversionConfig))

    def run(self, ctx, out):
        import numpy as np

        from edge_kd import datafree, interrupt
        from edge_kd.fileio import write_bytes
        from edge_kd.report.images import image_grid_png

        spec, data = ctx.settings(self.name), run_data.load(ctx)
        info = data.info
        inverter = self._inverter(ctx)
        labels = datafree.balanced_labels(spec.images, info.num_classes, spec.seed)
        starts = list(range(0, spec.images, spec.batch_size))
        batches = ctx.resume  # this stage's resume folder (Context.begin_stage): a file per finished batch
        done = batches.epochs_done()
        for i, start in enumerate(starts):
            if i < done:
                continue
            interrupt.check()
            seed = int(np.random.SeedSequence([spec.seed, i]).generate_state(1)[0] % 2**31)

            def progress(step, terms, _i=i):
                if step == spec.steps:
                    print(f"  batch {_i + 1}/{len(starts)}: BN-statistics loss {terms['bn']:.3g}; the teacher puts "
                          f"{terms['accuracy']:.0%} of the batch in the class each image was made for", flush=True)

            x = inverter.synthesize(labels[start:start + spec.batch_size], seed=seed, callback=progress)
            batches.save_arrays(i + 1, {"x": x})
        x = np.concatenate([batches.load_arrays(i + 1)["x"] for i in range(len(starts))])
        teacher = np.argmax(run_models.teacher(ctx).predict(data.normalise(x), verbose=0), -1)
        noise = np.random.default_rng(spec.seed).integers(0, 256, x[:spec.batch_size].shape, dtype=np.uint8)
        np.savez_compressed(out / "images.npz", x=x, y=labels.astype(np.int32), teacher=teacher.astype(np.int32))
        write_bytes(out / "grid.png", image_grid_png(x, labels, info.class_names, GRID_PER_CLASS,
                                                     "images made from the teacher alone (DeepInversion)"))
        return {"images": int(len(x)), "steps": spec.steps, "batch_size": spec.batch_size,
                "teacher_agreement": float(np.mean(teacher == labels)),
                "bn_loss": inverter.statistics_loss(data.normalise(x[:spec.batch_size])),
                "bn_loss_noise": inverter.statistics_loss(data.normalise(noise))}


def images(ctx):
    """Returns (uint8 images, the class each was made for) of the run's synthesize stage."""
    import numpy as np

    with np.load(ctx.stage_dir("synthesize") / "images.npz") as f:
        return f["x"], f["y"]
