"""What a stage is: one object that owns its settings, its inputs, its fingerprint, its title, its files and its run.

A stage subclasses ``Stage`` in a module of its own under ``pipelines/stages/`` and is listed, in
running order, in ``pipelines/registry.py``. Everything else follows from that: the recipe gains a
``stages.<name>`` section typed by ``settings``, the runner builds it in a hidden folder, swaps it
into place and records ``manifests/<name>.json`` with the fingerprint of

- its settings and the parts of the recipe named by ``key``,
- the files written by the stages named by ``reads``,
- the edge-kd source its module can import (``pipelines.codehash``),

and skips it on a rerun while that fingerprint and its files are unchanged.

Stages that leave a student model (``StudentStage``) form a chain: each refines the student the
previous enabled one left (distill → prune → cluster → qat), and the export stage converts each.
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Optional

from edge_kd.augment import AugmentConfig
from edge_kd.config import Bool, Config
from pipelines import run_keys
from pipelines.types import Epochs, LearningRate


class StageSettings(Config):
    """The settings every stage has; a stage's own type adds its keys."""

    enabled: Bool = True


class AugmentedSettings(StageSettings):
    """A stage that trains: its augmentation is the recipe's ``augment``, with the keys it gives here replaced."""

    augment: Optional[AugmentConfig] = None


class TrainSettings(AugmentedSettings):
    """A stage that trains the student: for how long, how fast, and whether it distils."""

    epochs: Epochs = 8
    learning_rate: LearningRate = None
    distill: Bool = True


def resolve_augment(settings: AugmentedSettings, recipe) -> list[str]:
    """Sets a stage's ``augment`` to the recipe's, with the keys the stage gave replaced; returns ``["augment"]``."""
    own = {} if settings.augment is None else settings.augment.model_dump(include=settings.augment.model_fields_set)
    settings.augment = AugmentConfig(**{**recipe.augment.model_dump(), **own})
    return ["augment"]


def library_config(settings: Config, cls: type[Config]) -> Config:
    """Returns the library config ``cls`` (e.g. PruneConfig) made of the fields a stage's settings share with it."""
    return cls(**{k: getattr(settings, k) for k in cls.model_fields})


class Stage:
    """One step of a run. Subclasses set the class attributes and override what they need."""

    #: the stage's name: its recipe key (``stages.<name>``), manifest and, unless ``folder`` says otherwise, folder
    name: ClassVar[str]
    settings: ClassVar[type[StageSettings]] = StageSettings
    #: the folder in the run folder, where it is not ``name``
    folder: ClassVar[Optional[str]] = None
    #: the model file it writes, where it writes one
    model_file: ClassVar[Optional[str]] = None
    #: a recipe without this stage is refused
    required: ClassVar[bool] = False
    #: (name, role) of this stage's Keras model's row in the benchmark, where it has one
    keras_row: ClassVar[Optional[tuple[str, str]]] = None
    #: it trains a model, so it runs in training.strategy's scope
    trains: ClassVar[bool] = False
    #: it may train under training.mixed_precision (not the tfmot stages: pruning and QAT stay in float32)
    mixed_precision: ClassVar[bool] = False
    #: its result holds nothing of the run it belongs to beyond its fingerprint, so runs sharing a store
    #: (``pipelines.runner``) may share it
    shareable: ClassVar[bool] = True

    def title(self, recipe) -> str:
        """Returns what the stage does, in a few words, for its progress line."""
        return self.name

    def resume_unit(self, recipe) -> str:
        """Returns what the stage saves as it goes (``Context.begin_stage``'s checkpoints), for its resume lines."""
        return "epoch"

    def resolve(self, settings: StageSettings, recipe) -> list[str]:
        """Fills in, when the recipe loads, the settings whose default comes from elsewhere in the recipe.

        Returns the keys it filled, so that a later ``--set`` of what they come from reaches them too.
        """
        return []

    def reads(self, ctx) -> list[str]:
        """Returns the enabled stages whose files this stage reads (their changes rerun it)."""
        return []

    def key(self, ctx) -> dict:
        """Returns the parts of the recipe (beyond its own settings) that its result depends on."""
        return {}

    def check(self, ctx) -> None:
        """Raises the UserError a run would meet in this stage, before any stage trains (default: none)."""

    def run(self, ctx, out: Path) -> dict:  # pragma: no cover - abstract
        """Writes the stage's files into the empty folder ``out``; returns a small summary for the manifest."""
        raise NotImplementedError

    def weights_stage(self, ctx) -> str:
        """Returns the stage whose model holds this stage's weights (to count parameters and MACs): itself."""
        return self.name

    def publish(self, ctx) -> None:
        """Runs after every run that has this stage, finished now or earlier (the report copies its files up)."""

    def load(self, ctx):
        """Returns the Keras model this stage saved."""
        from edge_kd.keras import keras

        return keras.models.load_model(ctx.stage_dir(self.name) / self.model_file, compile=False)

    def __repr__(self):
        return f"<stage {self.name}>"


class StudentStage(Stage):
    """A stage that leaves the student model: the first one builds it, each later one refines the last one's."""

    settings: ClassVar[type[StageSettings]] = TrainSettings
    trains = True
    #: its exported files are named ``<export_prefix>-<variant>.tflite``
    export_prefix: ClassVar[str]
    #: False for the first stage of the chain, which starts from a fresh student
    refines: ClassVar[bool] = True

    def export_variants(self, recipe) -> list[str]:
        """Returns the TFLite variants the export stage makes of this stage's student."""
        return list(recipe.stages.export.variants)

    def reads(self, ctx):
        deps = []
        if ctx.recipe.distils(self.name) and "teacher" in ctx.enabled():
            deps.append("teacher")
        if self.refines:
            deps.append(ctx.previous_student(self.name))
        return deps

    def key(self, ctx):
        distils = ctx.recipe.distils(self.name)
        return {**run_keys.training_key(ctx), **(run_keys.distillation_key(ctx) if distils else {})}

    def resolve(self, settings, recipe):
        derived = resolve_augment(settings, recipe)
        if settings.learning_rate is None:
            settings.learning_rate = recipe.training.learning_rate
            derived.append("learning_rate")
        return derived
