"""A run's context: its recipe, its folder and the stages it runs, with the state its stages share.

The jobs the stages share live in their own modules, each a few functions of the context, so that
the source a stage imports is exactly the code it runs (``pipelines.codehash``):

- ``pipelines.run_data``: the run's data, loaded once;
- ``pipelines.run_models``: students, teachers (trained, a user's file, adapted) and peers;
- ``pipelines.run_training``: the tf.distribute strategy and precision, the Distiller of a stage, the fit;
- ``pipelines.run_keys``: the parts of a fingerprint that several stages share.

This module holds where things are (the run layout) and which stages run (the chain of student
stages). The stages receive a ``Context`` and never import this module.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_kd.errors import UserError
from pipelines import registry

if TYPE_CHECKING:
    from pipelines.recipe import Recipe


@dataclasses.dataclass
class Loaded:
    """What the ``run_*`` modules load once per run and keep on its context."""

    data: Any = None  # the DataBundle (run_data.load)
    data_made: Any = None  # for data.source synthetic: the synthesize stage's result that bundle holds
    teachers: dict = dataclasses.field(default_factory=dict)  # per tf.distribute strategy: a model lives with the
    extra_teachers: dict = dataclasses.field(default_factory=dict)  # strategy it was built under (run_models)
    strategy: Any = None  # training.strategy's tf.distribute strategy (run_training.strategy)
    mixed: Any = None  # training.mixed_precision's policy here, "float32" for none (run_keys.mixed_policy)
    teacher_cache: Any = None  # the teachers' logits of train and val (run_training.teacher_cache)
    students: dict = dataclasses.field(default_factory=dict)  # the stages' saved students, read-only (run_models)
    file_keys: dict = dataclasses.field(default_factory=dict)  # the sha256 of each user file (run_keys.file_key)


class Context:
    """The recipe, the run folder and the stages of one run, with what its stages load once (in ``pipelines.run_*``)."""

    def __init__(self, recipe: "Recipe", run_dir: Path, command: str, data=None, cluster=None):
        """``data``: the recipe's data, already loaded (runs of one search share it); default: loaded when used.
        ``cluster``: the multi-worker job this process is a worker of (``pipelines.multiworker.Cluster``), or None; on a
        worker other than the chief, ``run_dir`` is its scratch folder; a recipe of ``training.strategy: multi_worker``
        needs it."""
        if recipe.training.strategy == "multi_worker" and cluster is None:
            raise UserError("training.strategy: multi_worker runs through pipelines.run.run, which joins the workers of "
                            "TF_CONFIG before TensorFlow runs anything")
        self.recipe, self.run_dir, self.command = recipe, Path(run_dir), command
        self.cluster = cluster
        self.stages = registry.STAGES
        #: the manifest of each stage finished (or found finished) in this run, by name
        self.manifests: dict[str, dict] = {}
        #: the epoch checkpoints of the stage running now (``begin_stage``), which its fit saves and resumes
        self.resume = None
        #: how the teacher was read and adapted, for the report (``run_models.teacher``)
        self.teacher_info: dict = {}
        #: what the run_* modules load once per run (read them through those modules)
        self.loaded = Loaded(data=data)

    # -- where things are --------------------------------------------------------------------------------
    def stage_dir(self, name: str) -> Path:
        """Returns the folder of stage ``name`` in the run folder."""
        return self.run_dir / (self.stages[name].folder or name)

    def manifest_path(self, name: str) -> Path:
        """Returns the path of stage ``name``'s manifest (kept apart, so a bundle folder holds only the bundle)."""
        return self.run_dir / "manifests" / f"{name}.json"

    def resume_root(self) -> Path:
        """Returns the folder of the running stages' epoch checkpoints (``.resume`` in the run folder)."""
        return self.run_dir / ".resume"

    def epoch_checkpoints(self, name: str, fingerprint: str):
        """Returns the ``EpochCheckpoints`` of stage ``name`` with ``fingerprint``."""
        from edge_kd.train import EpochCheckpoints

        return EpochCheckpoints(self.resume_root() / name, key=fingerprint)

    def begin_stage(self, name: str, fingerprint: str):
        """Makes stage ``name``'s fit save (and resume from) its epochs, and starts timing the stage (its saved work
        counting with what earlier sittings spent on it); returns its ``EpochCheckpoints``."""
        self.resume = self.epoch_checkpoints(name, fingerprint)
        self.resume.start_clock()
        return self.resume

    # -- which stages run ----------------------------------------------------------------------------------
    def enabled(self) -> list[str]:
        """Returns the names of the stages this run has, in running order."""
        return self.recipe.stages.enabled()

    def student_stages(self) -> list[str]:
        """Returns the enabled stages that leave a student model, in order (distill, prune, cluster, qat)."""
        chain = registry.student_stages()
        return [n for n in self.enabled() if n in chain]

    def previous_student(self, before: str) -> str:
        """Returns the enabled student stage that runs last before ``before`` (whose student it refines)."""
        chain = self.student_stages()
        return chain[chain.index(before) - 1] if before in chain else chain[-1]

    def settings(self, name: str):
        """Returns stage ``name``'s settings."""
        return getattr(self.recipe.stages, name)
