"""The synthesize stage: images made from the teacher alone (``edge_kd.datafree``), by DeepInversion (each batch
optimised from noise) or by a generator trained against a companion student (``method: generator``).

It writes ``synthetic/images.npz`` (``x``: uint8 images of the data's shape; ``y``: the class each was made for;
``teacher``: the class the teacher gives it), ``synthetic/grid.png`` (a row of images per class, which the
report shows) and, by the generator, ``synthetic/companion.h5`` (the weights of the student it was trained
against). ``stages.export.representative: synthetic`` calibrates the int8 files on them instead of training
images, and ``data.source: synthetic`` trains the run's student on them (``pipelines.run_data``). The images are
made a part at a time (a DeepInversion batch, a generator round) from the stage's seed and the part's number; each
finished part is kept in ``.resume/synthesize/``, so a stopped run goes on after its last finished part and makes
the same images as an uninterrupted one.
"""
from __future__ import annotations

from typing import Annotated, ClassVar, Literal, Optional

from pydantic import model_validator

from edge_kd.config import Field, Int, Invalid
from edge_kd.datafree import GeneratorConfig, InversionConfig
from edge_kd.errors import UserError
from pipelines import run_data, run_keys, run_models
from pipelines.stage import Stage, StageSettings, library_config

#: images per class in the report's grid
GRID_PER_CLASS = 8
#: the generator method's companion student (tf_keras weights), in the stage's folder
COMPANION = "companion.h5"


class SynthesizeSettings(StageSettings, InversionConfig):
    """How many images, by which method, and how each method works: DeepInversion's optimisation of each batch
    (the keys of ``edge_kd.datafree.InversionConfig``, at the top level) or the adversarial generator's training
    (``generator``, ``edge_kd.datafree.GeneratorConfig``)."""

    KEY: ClassVar[str] = "stages.synthesize"
    #: deepinversion: optimise each batch of images from noise; generator: train a generator against a student
    method: Literal["deepinversion", "generator"] = "deepinversion"
    images: Annotated[Int, Field(ge=1)] = 512
    #: images optimised together (DeepInversion), or the generator's batch: a batch's BatchNormalization
    #: statistics are what is matched
    batch_size: Annotated[Int, Field(ge=2)] = 128
    #: the seed the images are drawn from; null: the recipe's seed
    seed: Optional[Int] = None
    generator: GeneratorConfig = Field(default_factory=GeneratorConfig)

    @model_validator(mode="after")
    def _a_share_per_round(self):
        if self.method == "generator" and self.images < self.generator.rounds:
            raise Invalid("images", f"must be at least generator.rounds ({self.generator.rounds}): each round draws "
                                    f"an equal share of the images, got {self.images}")
        return self


class Synthesize(Stage):
    name = "synthesize"
    settings = SynthesizeSettings
    folder = "synthetic"

    def title(self, recipe):
        s = recipe.stages.synthesize
        if s.method == "generator":
            return (f"synthesize {s.images} images from the teacher (a generator trained against a student, "
                    f"{s.generator.steps} iterations)")
        return f"synthesize {s.images} images from the teacher (DeepInversion, {s.steps} steps a batch)"

    def resume_unit(self, recipe):
        return "round" if recipe.stages.synthesize.method == "generator" else "batch"

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
        key = {"teacher": run_keys.teacher_key(ctx),
               "input": {"shape": list(info.input_shape), "classes": info.num_classes,
                         "scale": info.input_scale, "offset": info.input_offset}}
        if ctx.settings(self.name).method == "generator":  # trained against a fresh student of the recipe's
            r = ctx.recipe
            key["companion"] = {"seed": r.seed, "student": r.student.model_dump(), **{
                k: run_keys.file_key(ctx, getattr(r.student, k), f"student.{k}") for k in ("weights", "path")
                if getattr(r.student, k) is not None}}
        return key

    def check(self, ctx):
        if ctx.recipe.teacher is None:
            raise UserError("stages.synthesize makes images from the teacher, and the recipe has none (teacher: null)")
        from edge_kd.datafree import require_batchnorm

        # the architecture the teacher stage will train, or the user's file
        require_batchnorm(run_models.build_teacher(ctx) if "teacher" in ctx.enabled() else run_models.teacher(ctx))
        from edge_kd import data

        cfg, spec = ctx.recipe.data, ctx.settings(self.name)
        per_class = spec.images // run_data.load(ctx).info.num_classes
        held = data.held_out(per_class, cfg.val_fraction)
        if cfg.source == data.SYNTHETIC and not 1 <= held < per_class:
            # the run's images are its training and validation splits, held out per class (data.synthetic_bundle)
            raise UserError(f"stages.synthesize.images {spec.images} is {per_class} per class, of which "
                            f"data.val_fraction {cfg.val_fraction:g} holds out {held}: a run without training images "
                            "needs both splits; make more images")

    def _inverter(self, ctx):
        from edge_kd.datafree import Inverter

        info = run_data.load(ctx).info
        return Inverter(run_models.teacher(ctx), info.input_shape, info.input_scale, info.input_offset,
                        config=library_config(ctx.settings(self.name), InversionConfig))

    def run(self, ctx, out):
        import numpy as np

        from edge_kd.fileio import write_bytes
        from edge_kd.report.images import image_grid_png

        spec, data = ctx.settings(self.name), run_data.load(ctx)
        info = data.info
        from edge_kd import datafree

        labels = datafree.balanced_labels(spec.images, info.num_classes, spec.seed)
        make = self._by_generator if spec.method == "generator" else self._by_inversion
        x, figures = make(ctx, spec, labels, out)
        inverter = self._inverter(ctx)  # the BN-statistics loss of either method's images, measured alike
        teacher = np.argmax(run_models.teacher(ctx).predict(data.normalise(x), verbose=0), -1)
        noise = np.random.default_rng(spec.seed).integers(0, 256, x[:spec.batch_size].shape, dtype=np.uint8)
        np.savez_compressed(out / "images.npz", x=x, y=labels.astype(np.int32), teacher=teacher.astype(np.int32))
        how = "a generator trained against a student" if spec.method == "generator" else "DeepInversion"
        # the last images of each class: a generator's latest rounds (its first are from a barely trained one)
        write_bytes(out / "grid.png", image_grid_png(x[::-1], labels[::-1], info.class_names, GRID_PER_CLASS,
                                                     f"images made from the teacher alone ({how})"))
        return {"method": spec.method, "images": int(len(x)), "batch_size": spec.batch_size,
                "teacher_agreement": float(np.mean(teacher == labels)),
                "bn_loss": inverter.statistics_loss(data.normalise(x[-spec.batch_size:])),
                "bn_loss_noise": inverter.statistics_loss(data.normalise(noise)), **figures}

    def _by_inversion(self, ctx, spec, labels, out):
        """DeepInversion: each batch optimised from noise, kept as it finishes."""
        import numpy as np

        from edge_kd import interrupt

        inverter = self._inverter(ctx)
        starts = list(range(0, spec.images, spec.batch_size))
        batches = ctx.resume  # this stage's resume folder (Context.begin_stage): a file per finished batch
        for i, start in enumerate(starts):
            if i < batches.epochs_done():
                continue
            interrupt.check()
            seed = int(np.random.SeedSequence([spec.seed, i]).generate_state(1)[0] % 2**31)

            def progress(step, terms, _i=i):
                if step == spec.steps:
                    print(f"  batch {_i + 1}/{len(starts)}: BN-statistics loss {terms['bn']:.3g}; the teacher puts "
                          f"{terms['accuracy']:.0%} of the batch in the class each image was made for", flush=True)

            x = inverter.synthesize(labels[start:start + spec.batch_size], seed=seed, callback=progress)
            batches.save_arrays(i + 1, {"x": x})
        return np.concatenate([batches.load_arrays(i + 1)["x"] for i in range(len(starts))]), {"steps": spec.steps}

    def _by_generator(self, ctx, spec, labels, out):
        """The adversarial generator: trained a round at a time against a fresh student of the recipe's, an equal
        share of the images drawn at the end of each round (the generator as it stood then). That student's weights,
        as the last round left them, are kept in ``out/COMPANION`` (``stages.distill.start: companion`` starts the
        run's student from them)."""
        import numpy as np

        from edge_kd import interrupt
        from edge_kd.datafree import AdversarialSynthesizer

        g, info = spec.generator, run_data.load(ctx).info
        synth = AdversarialSynthesizer(run_models.teacher(ctx), run_models.build_student(ctx), info.input_shape,
                                       info.num_classes, info.input_scale, info.input_offset, config=g,
                                       batch_size=spec.batch_size, seed=spec.seed)
        rounds = ctx.resume  # a file per finished round: its images, and for the last the state to go on from
        done = rounds.epochs_done()
        if done:
            synth.restore(rounds.load_arrays(done))
        steps = np.diff(np.linspace(0, g.steps, g.rounds + 1).round().astype(int))
        share = np.linspace(0, spec.images, g.rounds + 1).round().astype(int)
        for r in range(done, g.rounds):
            interrupt.check()

            def progress(step, terms, _r=r):
                print(f"  round {_r + 1}/{g.rounds}, iteration {step}/{g.steps}: teacher cross-entropy "
                      f"{terms['ce']:.3g}, BN-statistics loss {terms['bn']:.3g}, "
                      f"teacher-student gap {terms['gap']:.3g}"
                      + (f", within-class diversity {terms['diversity']:.3g}" if "diversity" in terms else ""),
                      flush=True)

            synth.train(int(steps[r]), callback=progress)
            interrupt.check()
            seed = int(np.random.SeedSequence([spec.seed, r]).generate_state(1)[0] % 2**31)
            x = synth.sample(labels[share[r]:share[r + 1]], seed=seed)
            rounds.save_arrays(r + 1, {"x": x, **synth.state()})
            if r:
                rounds.trim_arrays(r, ["x"])
        x = np.concatenate([rounds.load_arrays(r + 1)["x"] for r in range(g.rounds)])
        synth.student.save_weights(out / COMPANION)  # as the last round left it (restored above if it ran before)
        return x, {"steps": g.steps, "rounds": g.rounds, "companion": COMPANION}


def images(ctx):
    """Returns (uint8 images, the class each was made for) of the run's synthesize stage."""
    import numpy as np

    with np.load(ctx.stage_dir("synthesize") / "images.npz") as f:
        return f["x"], f["y"]
