"""What the stages of one run share: the recipe, the run folder, the data and the teachers, each loaded once.

Also the parts of a fingerprint that several stages have in common (``training_key``,
``distillation_key``, ``data_key``), so each rule of "what a result depends on" is written once.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edge_kd.errors import UserError
from edge_kd.fileio import sha256_file

if TYPE_CHECKING:
    from pipelines.recipe import Recipe


class Context:
    """The recipe, the run folder and what the stages load from them (the data, the teachers), loaded when asked."""

    def __init__(self, recipe: "Recipe", run_dir: Path, command: str, data=None):
        """``data``: the recipe's data, already loaded (runs of one search share it); default: loaded when used."""
        from pipelines import registry

        self.recipe, self.run_dir, self.command = recipe, Path(run_dir), command
        self.stages = registry.STAGES
        self._bundle = data
        self._teachers = {}  # per tf.distribute strategy: a model lives with the strategy it was built under
        self._extra_teachers = {}
        self._teacher_cache = None
        self._strategy = None
        self._file_keys: dict[str, str] = {}
        self.teacher_info: dict = {}
        self.manifests: dict[str, dict] = {}
        self._resume = None  # the epoch checkpoints of the stage running now

    def resume_root(self) -> Path:
        """Returns the folder of the running stages' epoch checkpoints (``.resume`` in the run folder)."""
        return self.run_dir / ".resume"

    def epoch_checkpoints(self, name: str, fingerprint: str):
        """Returns the ``EpochCheckpoints`` of stage ``name`` with ``fingerprint``."""
        from edge_kd.train import EpochCheckpoints

        return EpochCheckpoints(self.resume_root() / name, key=fingerprint)

    def begin_stage(self, name: str, fingerprint: str):
        """Makes stage ``name``'s fit save (and resume from) its epochs; returns its ``EpochCheckpoints``."""
        self._resume = self.epoch_checkpoints(name, fingerprint)
        return self._resume

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
        info, spec = self.bundle.info, self.recipe.student
        if spec.path is not None:
            return load_student(spec.path, info.input_shape, info.num_classes)
        model = models.build(spec.arch, info.input_shape, info.num_classes, **spec.options)
        if spec.weights is not None:
            models.load_weights(model, spec.weights, "student.weights")
        return model

    def build_teacher(self, input_shape=None):
        """Returns a fresh teacher of the recipe's architecture (what the teacher stage trains), for the data's
        input shape or ``input_shape``; with ``teacher.finetune`` its head (``logits``) is new and zero."""
        import models
        from edge_kd.keras import keras

        t, info = self.recipe.teacher, self.bundle.info
        keras.utils.set_random_seed(self.recipe.seed)
        model = models.build(t.architecture(), input_shape or info.input_shape, info.num_classes, **t.options)
        if t.weights is not None:
            models.load_weights(model, t.weights, "teacher.weights", skip=("logits",) if t.finetune else ())
        if t.finetune:
            from edge_kd import bit

            bit.zero_head(model)
        return model

    def bit_rule(self):
        """Returns the BiT-HyperRule of this run's data (``teacher.finetune: bit``)."""
        from edge_kd import bit

        t, info = self.recipe.teacher, self.bundle.info
        return bit.rule(self.bundle.count("train"), info.source_size, self.recipe.training.batch_size, t.bit_scale,
                        t.bit_resolution, seen_at=info.input_shape[:2])

    def teacher(self):
        """Returns the frozen teacher taking the student's input and giving logits."""
        key = self._strategy_key()
        if key not in self._teachers:
            from edge_kd import train
            from edge_kd.keras import keras

            t = self.recipe.teacher
            # float32 even inside a mixed-precision stage: the adapter's log-probabilities need its range
            with train.precision("float32"):
                model = loaded_teacher(self.teacher_file(), t.trust)
                self._teachers[key], adapted = self.adapt(model, t.input_range, t.path)
            from edge_kd import builtin_teachers

            shipped = None if t.path is None else builtin_teachers.name_of(t.path)
            by = "edge-kd" if t.path is None else f"edge-kd, shipped ({shipped})" if shipped else "user"
            # a trained teacher's file is named within the run folder (the run's results may be shared: runner)
            where = str(self.teacher_file().relative_to(self.run_dir)) if t.path is None else str(self.teacher_file())
            self.teacher_info = {**adapted, "trained_by": by, "file": where}
        return self._teachers[key]

    def extra_teachers(self) -> list:
        """Returns ``distillation.extra_teachers``, each loaded, adapted and frozen."""
        key = self._strategy_key()
        if key not in self._extra_teachers:
            from edge_kd import train

            with train.precision("float32"):  # as teacher()
                self._extra_teachers[key] = [self.adapt(loaded_teacher(t.path, t.trust), t.input_range, t.path)[0]
                                             for t in self.recipe.distillation.extra_teachers]
        return self._extra_teachers[key]

    def strategy(self):
        """Returns the tf.distribute strategy of ``training.strategy`` (built once), or None for one device."""
        if self.recipe.training.strategy == "none":
            return None
        if self._strategy is None:
            from edge_kd.keras import tf

            self._strategy = tf.distribute.MirroredStrategy()  # every GPU of this host (the CPU when there is none)
        return self._strategy

    def training_scope(self, stage):
        """Returns the context to run ``stage`` in: for a stage that trains, the strategy's scope and, with
        ``training.mixed_precision``, the mixed_float16 policy where the stage allows it; else nothing."""
        import contextlib

        scopes = contextlib.ExitStack()
        if not stage.trains:
            return scopes
        strategy = self.strategy()
        if strategy is not None:
            print(f"  {stage.name}: {type(strategy).__name__} over {strategy.num_replicas_in_sync} replicas",
                  flush=True)
            scopes.enter_context(strategy.scope())
        if self.recipe.training.mixed_precision and stage.mixed_precision:
            from edge_kd import train

            print(f"  {stage.name}: mixed precision ({train.MIXED}; loss terms in float32; saved in float32)",
                  flush=True)
            scopes.enter_context(train.precision(train.MIXED))
        return scopes

    @staticmethod
    def _strategy_key() -> int:
        from edge_kd.keras import tf

        return id(tf.distribute.get_strategy())

    def adapt(self, model, input_range, source=None):
        """Returns ``adapt_teacher`` of ``model`` for this run's data: (frozen logits model, description).

        ``source`` (the teacher's file) prefixes its errors, such as outputs that are not finite.
        """
        from edge_kd.distill import adapt_teacher

        info = self.bundle.info
        scale = offset = None
        if input_range is not None:
            lo, hi = input_range
            scale, offset = (hi - lo) / 255.0, float(lo)
        try:
            return adapt_teacher(model, info.input_shape, info.num_classes, info.input_scale, info.input_offset,
                                 teacher_scale=scale, teacher_offset=offset, sample=self.bundle.first("train", 8)[0])
        except UserError as e:
            if source is None:
                raise
            raise UserError(f"{Path(source).name}: {e}") from None

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
    def augmenter(self, stage: str):
        """Returns the Augmenter of ``stage`` (its resolved ``augment``), or None where it has none on.

        Its seed comes from the recipe's seed and the stage's name, so a rerun repeats it exactly and the
        baseline (which asks for the distill stage's) sees the very views the distilled student saw.
        """
        from edge_kd.augment import Augmenter

        cfg = self.settings(stage).augment
        if cfg is None or not cfg.active():
            return None
        digest = hashlib.sha256(f"{self.recipe.seed}:{stage}".encode()).digest()
        return Augmenter(cfg, seed=int.from_bytes(digest[:4], "little"), fill_value=self.bundle.info.input_offset)

    def distiller(self, student, stage: str, peers=None, teachers=None, distil: bool = True):
        """Returns a Distiller of ``student`` for ``stage``: with the recipe's loss terms if it distils.

        ``distil=False`` gives the same Distiller without a teacher (the baseline: the same augmentation and
        label smoothing). In mutual mode the peers are ``peers`` or, after the distill stage, the peers it
        saved; the teachers are ``teachers`` or the recipe's (trained or loaded, then adapted).
        """
        from edge_kd.distill import Distiller

        r = self.recipe
        options = {"augment": self.augmenter(stage), "label_smoothing": r.training.label_smoothing}
        if not (distil and r.distils(stage)):
            return Distiller(student, **options)
        dist = r.distillation
        common = {"terms": dist.build_terms(), "hard_weight": dist.hard_weight, "consistent": dist.consistent,
                  **options}
        if dist.mode == "mean_teacher":
            return Distiller(student, ema_decay=dist.ema_decay, **common)
        if dist.mode == "mutual":
            return Distiller(student, peers=self.load_peers() if peers is None else peers, **common)
        if teachers is None and r.teacher is not None:
            teachers = [self.teacher(), *self.extra_teachers()]
        return Distiller(student, teachers, teacher_weights=dist.teacher_weights, combine=dist.combine, **common)

    def teacher_cache(self, distiller) -> dict:
        """Returns the teachers' logits of the train and val images, (images, teachers, classes) each, computed once."""
        if self._teacher_cache is None:
            import time

            start = time.perf_counter()
            self._teacher_cache = {split: _predict(distiller.teacher_logits, self.bundle, split)
                                   for split in ("train", "val")}
            print(f"  teacher cache: logits of {sum(len(v) for v in self._teacher_cache.values())} images in "
                  f"{time.perf_counter() - start:.1f} s", flush=True)
        return self._teacher_cache

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

    def fit(self, model, epochs: int, learning_rate: float, callbacks=(), optimizer=None) -> dict:
        """Trains ``model`` (a Distiller) on the run's data; returns the history as plain lists.

        ``optimizer`` (an ``OptimizerConfig``, or what ``train.fit`` takes in its place) defaults to the recipe's
        ``training``.

        With ``distillation.teacher_cache`` and a Distiller that can use it, each batch carries the
        teachers' cached logits and no teacher runs during training. Inside a stage of the runner, the fit saves
        each epoch and resumes where a stopped run of the same stage left off (``begin_stage``).
        """
        from edge_kd import train

        b, tr = self.bundle, self.recipe.training
        cache = (self.teacher_cache(model) if self.recipe.distillation.teacher_cache and model.uses_cache()
                 else {"train": None, "val": None})
        # Across replicas a short last batch could leave one replica no examples (NaN batch statistics)
        replicated = model.distribute_strategy.num_replicas_in_sync > 1
        from edge_kd.keras import tf

        def batches(epochs):  # each epoch's order from the seed and its number: a resumed fit sees the same
            return b.dataset("train", tr.batch_size, seed=self.recipe.seed, teacher_logits=cache["train"],
                             drop_remainder=replicated, epochs=epochs)

        try:
            return train.fit(model, batches, epochs, learning_rate,
                             validation=b.dataset("val", 512, teacher_logits=cache["val"]), callbacks=callbacks,
                             optimizer=optimizer or tr, resume=self._resume)
        except tf.errors.OpError as e:  # a streamed image whose header read but whose pixels do not decode
            if not b.streamed or "Decode" not in str(e) and "PIL" not in str(e):
                raise
            print("  an image failed to decode; finding which ...", flush=True)
            import re

            bad = next((f for split in ("train", "val") if (f := getattr(b, f"x_{split}").undecodable())), None)
            what = f"image {bad}" if bad else f"an image of {self.recipe.data.source}"
            reason = re.sub(r"\{\{[^}]*\}\}\s*", "", e.message.splitlines()[0]).strip()[:200]
            raise UserError(f"cannot decode {what} while training: {reason}") from None

    def steps_per_epoch(self) -> int:
        return int(np.ceil(self.bundle.count("train") / self.recipe.training.batch_size))

    # -- what results depend on ---------------------------------------------------------------------------
    def data_key(self) -> dict:
        """Returns the data's settings and the digest of what they read (the file, folder or dataset)."""
        return {"seed": self.recipe.seed, "data": self.recipe.data.model_dump(), "data_digest": self.bundle.source_digest}

    def training_key(self) -> dict:
        """Returns what a trained student depends on: the data, the training settings and the student."""
        r = self.recipe
        weights = None if r.student.weights is None else self.file_key(r.student.weights, "student.weights")
        path = None if r.student.path is None else self.file_key(r.student.path, "student.path")
        return {**self.data_key(), "training": r.training.model_dump(), "student": r.student.model_dump(),
                "student_weights": weights, **({"student_file": path} if path else {})}

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

    def file_key(self, path, what: str = "teacher file") -> str:
        """Returns the sha256 of a user's file (hashed once per run); ``what`` names it in the error of a missing one."""
        path = str(path)
        if path not in self._file_keys:
            if not Path(path).is_file():
                raise UserError(f"{what} not found: {path}")
            self._file_keys[path] = sha256_file(path)
        return self._file_keys[path]


def load_student(path, input_shape, num_classes):
    """Returns the student saved at ``path`` (.keras or .h5; a Keras 3 file rebuilt as its tf_keras twin), freshly
    loaded, giving logits (a softmax head is cut off: the Distiller and the exported files work on logits); a file
    of another input shape or class count is a one-line UserError."""
    from edge_kd import keras3
    from edge_kd.distill import logits_model
    from edge_kd.errors import UserError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"student.path: file not found: {path}")
    model = keras3.load_model(path, False, "student")
    if not getattr(model, "_is_graph_network", False) or len(model.inputs) != 1 or len(model.outputs) != 1:
        raise UserError(f"student {path.name}: give a Functional or Sequential model with one input and one output")
    if tuple(model.input_shape[1:]) != tuple(input_shape) or model.output_shape[-1] != num_classes:
        raise UserError(f"student {path.name} takes {tuple(model.input_shape[1:])} and predicts "
                        f"{model.output_shape[-1]} classes; the data has {tuple(input_shape)} and {num_classes}")
    return logits_model(model)[0]


#: teacher models loaded in this process, by file (path, size, modification time), trust and tf.distribute strategy
_LOADED: dict[tuple, object] = {}


def loaded_teacher(path, trust: bool):
    """Returns the teacher model saved at ``path`` (a user's file, builtin:<name>, or one the teacher stage trained),
    loaded once per process for the strategy in scope: the runs of a search share it, as every check of a run does.

    A file replaced since (a retrained teacher) is loaded anew. The model is only read from: each run adapts it.
    """
    from edge_kd import builtin_teachers
    from edge_kd.distill import load_teacher
    from edge_kd.keras import tf

    resolved = Path(builtin_teachers.resolve(str(path))).resolve()
    try:
        st = resolved.stat()
    except OSError:
        return load_teacher(resolved, trust=trust)  # its own error says what is wrong with the file
    key = (str(resolved), st.st_size, st.st_mtime_ns, bool(trust), id(tf.distribute.get_strategy()))
    if key not in _LOADED:
        _LOADED[key] = load_teacher(resolved, trust=trust)
    return _LOADED[key]


def _predict(fn, bundle, split: str) -> np.ndarray:
    """Returns ``fn`` of ``split``'s images, computed a batch at a time in order, as one float32 array."""
    from edge_kd.keras import tf

    call = tf.function(fn)
    out = [call(tf.constant(x)).numpy() for x, _ in bundle.batches(split, bundle.chunk(most=1024))]
    if not out:  # an empty split (val_fraction 0): no rows, of the right shape
        out = [call(tf.zeros((0, *bundle.info.input_shape))).numpy()]
    return np.concatenate(out).astype(np.float32)
