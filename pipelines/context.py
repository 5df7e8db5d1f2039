"""What the stages of one run share: the recipe, the run folder, the data and the teachers, each loaded once.

Also the parts of a fingerprint that several stages have in common (``training_key``,
``distillation_key``, ``data_key``), so each rule of "what a result depends on" is written once.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edge_kd.errors import UserError
from edge_kd.fileio import sha256_file

if TYPE_CHECKING:
    from pipelines.recipe import Recipe


class Context:
    """The recipe, the run folder and what the stages load from them (the data, the teachers), loaded when asked."""

    def __init__(self, recipe: "Recipe", run_dir: Path, command: str):
        from pipelines import registry

        self.recipe, self.run_dir, self.command = recipe, Path(run_dir), command
        self.stages = registry.STAGES
        self._bundle = None
        self._teacher = None
        self._extra_teachers = None
        self._file_keys: dict[str, str] = {}
        self.teacher_info: dict = {}
        self.manifests: dict[str, dict] = {}

    # -- where things are --------------------------------------------------------------------------------
    def stage_dir(self, name: str) -> Path:
        """Returns the folder of stage ``name`` in the run folder."""
        return self.run_dir / (self.stages[name].folder or name)

    def manifest_path(self, name: str) -> Path:
        """Returns the path of stage ``name``'s manifest (kept apart, so a bundle folder holds only the bundle)."""
        return self.run_dir / "manifests" / f"{name}.json"

    def enabled(self) -> list[str]:
        """Returns the names of the stages this run has, in running order."""
        return self.recipe.stages.enabled()

    def student_stages(self) -> list[str]:
        """Returns the enabled stages that leave a student model, in order (distill, prune, cluster, qat)."""
        from pipelines.stage import StudentStage

        return [n for n in self.enabled() if isinstance(self.stages[n], StudentStage)]

    def previous_student(self, before: str) -> str:
        """Returns the enabled student stage that runs last before ``before`` (whose student it refines)."""
        chain = self.student_stages()
        return chain[chain.index(before) - 1] if before in chain else chain[-1]

    def settings(self, name: str):
        """Returns stage ``name``'s settings."""
        return getattr(self.recipe.stages, name)

    # -- data and models --------------------------------------------------------------------------------------
    @property
    def bundle(self):
        """The run's data (loaded on first use)."""
        if self._bundle is None:
            from edge_kd import data

            self._bundle = data.load_config(self.recipe.data, seed=self.recipe.seed)
        return self._bundle

    def build_student(self):
        """Returns a fresh student, its weights drawn from the recipe's seed."""
        import models
        from edge_kd.keras import keras

        keras.utils.set_random_seed(self.recipe.seed)
        info = self.bundle.info
        return models.build(self.recipe.student.arch, info.input_shape, info.num_classes, **self.recipe.student.options)

    def build_teacher(self):
        """Returns a fresh teacher of the recipe's architecture (what the teacher stage trains)."""
        import models
        from edge_kd.keras import keras

        t, info = self.recipe.teacher, self.bundle.info
        keras.utils.set_random_seed(self.recipe.seed)
        return models.build(t.arch, info.input_shape, info.num_classes, **t.options)

    def teacher(self):
        """Returns the frozen teacher taking the student's input and giving logits."""
        if self._teacher is None:
            from edge_kd.keras import keras

            t = self.recipe.teacher
            if t.path is None:
                model = keras.models.load_model(self.stage_dir("teacher") / "teacher.keras", compile=False)
            else:
                from edge_kd.distill import load_teacher

                model = load_teacher(t.path, trust=t.trust)
            self._teacher, adapted = self.adapt(model, t.input_range)
            self.teacher_info = {**adapted, "trained_by": "edge-kd" if t.path is None else "user",
                                 "file": str(self.teacher_file())}
        return self._teacher

    def extra_teachers(self) -> list:
        """Returns ``distillation.extra_teachers``, each loaded, adapted and frozen."""
        if self._extra_teachers is None:
            from edge_kd.distill import load_teacher

            self._extra_teachers = [self.adapt(load_teacher(t.path, trust=t.trust), t.input_range)[0]
                                    for t in self.recipe.distillation.extra_teachers]
        return self._extra_teachers

    def adapt(self, model, input_range):
        """Returns ``adapt_teacher`` of ``model`` for this run's data: (frozen logits model, description)."""
        from edge_kd.distill import adapt_teacher

        info = self.bundle.info
        scale = offset = None
        if input_range is not None:
            lo, hi = input_range
            scale, offset = (hi - lo) / 255.0, float(lo)
        return adapt_teacher(model, info.input_shape, info.num_classes, info.input_scale, info.input_offset,
                             teacher_scale=scale, teacher_offset=offset, sample=self.bundle.arrays("val")[0][:32])

    def teacher_file(self) -> Path:
        t = self.recipe.teacher
        return self.stage_dir("teacher") / "teacher.keras" if t.path is None else Path(t.path).resolve()

    def load_student(self, stage: str):
        """Returns the student model saved by ``stage``."""
        return self.stages[stage].load(self)

    def qat_config(self):
        """Returns the QAT settings: sparsity-preserving after pruning, cluster-preserving after clustering."""
        from edge_kd.compress.config import QATConfig

        enabled = self.enabled()
        return QATConfig(preserve_sparsity="prune" in enabled, preserve_clusters="cluster" in enabled,
                             unsupported=self.recipe.stages.qat.unsupported)

    # -- training ------------------------------------------------------------------------------------------
    def distiller(self, student, stage: str, peers=None, teachers=None):
        """Returns a Distiller of ``student`` for ``stage``: with the recipe's loss terms if it distils.

        In mutual mode the peers are ``peers`` or, after the distill stage, the peers it saved; the
        teachers are ``teachers`` or the recipe's (trained or loaded, then adapted).
        """
        from edge_kd.distill import Distiller

        if not self.recipe.distils(stage):
            return Distiller(student)
        dist = self.recipe.distillation
        common = {"terms": dist.build_terms(), "hard_weight": dist.hard_weight}
        if dist.mode == "mean_teacher":
            return Distiller(student, ema_decay=dist.ema_decay, **common)
        if dist.mode == "mutual":
            return Distiller(student, peers=self.load_peers() if peers is None else peers, **common)
        if teachers is None and self.recipe.teacher is not None:
            teachers = [self.teacher(), *self.extra_teachers()]
        return Distiller(student, teachers, teacher_weights=dist.teacher_weights, combine=dist.combine, **common)

    def build_peers(self) -> list:
        """Returns fresh mutual-learning peers, each drawn from its own seed (recipe seed + its number)."""
        import models
        from edge_kd.keras import keras

        info, peers = self.bundle.info, []
        for i, p in enumerate(self.recipe.peer_specs(), start=1):
            keras.utils.set_random_seed(self.recipe.seed + i)
            peers.append(models.build(p["arch"], info.input_shape, info.num_classes, **p["options"]))
        return peers

    def load_peers(self) -> list:
        """Returns the peers the distill stage trained beside the exported student."""
        from edge_kd.keras import keras

        return [keras.models.load_model(self.stage_dir("distill") / "peers" / f"peer_{i}.keras", compile=False)
                for i in range(len(self.recipe.distillation.peers))]

    def fit(self, model, epochs: int, learning_rate: float, callbacks=()) -> dict:
        """Trains ``model`` (a Distiller) on the run's data; returns the history as plain lists."""
        from edge_kd import train

        b, tr = self.bundle, self.recipe.training
        return train.fit(model, b.dataset("train", tr.batch_size, shuffle=True, seed=self.recipe.seed), epochs,
                         learning_rate, validation=b.dataset("val", 512), callbacks=callbacks)

    def steps_per_epoch(self) -> int:
        return int(np.ceil(len(self.bundle.y_train) / self.recipe.training.batch_size))

    # -- what results depend on ---------------------------------------------------------------------------
    def data_key(self) -> dict:
        """Returns the data's settings and the digest of what they read (the file, folder or dataset)."""
        return {"seed": self.recipe.seed, "data": self.recipe.data.model_dump(), "data_digest": self.bundle.source_digest}

    def training_key(self) -> dict:
        """Returns what a trained student depends on: the data, the training settings and the student."""
        r = self.recipe
        return {**self.data_key(), "training": r.training.model_dump(), "student": r.student.model_dump()}

    def distillation_key(self) -> dict:
        """Returns what distilling depends on: the loss, the teacher and the extra teachers' files."""
        r = self.recipe
        return {"distillation": r.distillation.model_dump(), "teacher": self.teacher_key(),
                "extra_teachers": [self.file_key(t.path) for t in r.distillation.extra_teachers]}

    def teacher_key(self):
        """Returns what identifies the teacher: the teacher stage's result, or the user's file and how it is read."""
        t = self.recipe.teacher
        if t is None:
            return None
        if t.path is None:
            return {"trained": self.manifests.get("teacher", {}).get("fingerprint")}
        return {"file_sha256": self.file_key(t.path), "input_range": t.input_range, "trust": t.trust}

    def file_key(self, path) -> str:
        """Returns the sha256 of a user's file (hashed once per run)."""
        path = str(path)
        if path not in self._file_keys:
            if not Path(path).is_file():
                raise UserError(f"teacher file not found: {path}")
            self._file_keys[path] = sha256_file(path)
        return self._file_keys[path]
