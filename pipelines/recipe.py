"""Recipes: one YAML file describes a run; validated once, at load, into the library's own config objects.

Each section is a typed config (``edge_kd.config``): ``data`` is ``edge_kd.data.DataConfig``,
``stages.prune`` holds ``edge_kd.tfmot.config.PruneConfig``'s keys and rules, ``stages.cluster``
``ClusterConfig``'s, and the stages come from ``pipelines.registry``. Loading also builds the loss
terms, checks the model options and resolves every default that comes from elsewhere in the recipe
(a stage's null learning rate is ``training.learning_rate``), so ``recipe.yaml`` in a run folder
holds the values the run used. A wrong key, type or value is a one-line UserError naming the key,
what is allowed and what was given. ``--set section.key=value`` (or ``stage.key=value``)
overrides a loaded recipe, typed by YAML like the file itself.

>>> r = load()                       # the built-in default recipe (pipelines/recipes/fashion_mnist.yaml)
>>> r = apply_overrides(r, ["prune.target_sparsity=0.5", "seed=1"])
>>> r.stages.prune.target_sparsity
0.5
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BeforeValidator, PrivateAttr, create_model, field_validator, model_validator

from edge_kd.augment import AugmentConfig
from edge_kd.config import Bool, Config, Field, Float, Int, Invalid, Str
from edge_kd.data import SYNTHETIC, DataConfig
from edge_kd.distill.options import COMBINE
from edge_kd.errors import UserError
from edge_kd.optim import OptimizerConfig
from pipelines import registry
from pipelines.search.spec import SearchSpec
from pipelines.types import LearningRate

#: the shipped recipes (package data: a wheel install has them); ``--recipe <name>`` runs ``<name>.yaml`` from here
RECIPES = Path(__file__).resolve().parent / "recipes"
DEFAULT_RECIPE = RECIPES / "fashion_mnist.yaml"


def _teacher_file(v):
    """A teacher file as given, or ``builtin:<name>`` as the path of that shipped teacher."""
    if isinstance(v, str):
        from edge_kd import builtin_teachers

        try:
            return builtin_teachers.resolve(v)
        except UserError as e:
            raise Invalid("", str(e)) from None
    return v


TeacherFile = Annotated[Str, BeforeValidator(_teacher_file)]


def _input_range(v):
    ok = (isinstance(v, (list, tuple)) and len(v) == 2
          and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v) and v[1] > v[0])
    if not ok:
        raise Invalid("", f"must be [lo, hi] with hi > lo (the range raw 0..255 pixels are mapped to), got {v!r}")
    return [float(x) for x in v]


InputRange = Annotated[list[float], BeforeValidator(_input_range)]


def _mixed_precision(v):
    if isinstance(v, bool) or v in ("float16", "bfloat16"):
        return v
    raise Invalid("", f"must be true, false, float16 or bfloat16, got {v!r}")


MixedPrecision = Annotated[Union[Bool, Literal["float16", "bfloat16"]], BeforeValidator(_mixed_precision)]


class TeacherSpec(OptimizerConfig):
    """The teacher: a file (``path``), or what the teacher stage trains and how (the optimizer keys are its own)."""

    #: a user's .keras/.h5 or builtin:<name>; null: the teacher stage trains ``arch``
    path: Optional[TeacherFile] = None
    trust: Bool = False
    input_range: Optional[InputRange] = None
    arch: Str = "cnn_large"
    options: dict[str, Any] = {}
    #: a Keras weights file (.h5) the teacher stage starts ``arch`` from, loaded by layer name
    weights: Optional[Str] = None
    epochs: Annotated[Int, Field(ge=1)] = 3
    learning_rate: LearningRate = None
    #: label smoothing of the teacher's own training: off, as smoothed teachers distil worse (Müller et al. 2019)
    label_smoothing: Annotated[Float, Field(ge=0, le=1)] = 0.0
    #: the teacher's logits are the mean of its logits for the image and for its left-right mirror image (test-time
    #: augmentation, twice the teacher's compute): for data whose classes a horizontal flip keeps, such as photos
    flip_average: Bool = False
    #: bit: the teacher stage fine-tunes ``backbone`` from ``weights`` by BiT-HyperRule (edge_kd.bit), which then
    #: sets the optimizer, schedule, MixUp, resolution and augmentation (arch, epochs, learning_rate, the optimizer
    #: keys and stages.teacher.augment are unused)
    finetune: Optional[Literal["bit"]] = None
    #: finetune: a keras.applications name of the registry (resnet50_v2, efficientnet_b0, mobilenet_v2, ...)
    backbone: Optional[Str] = None
    #: finetune: the rule's step counts times this (a compute budget; 1 is the rule)
    bit_scale: Annotated[Float, Field(gt=0, le=1)] = 1.0
    #: finetune: [resize, crop] in place of the rule's resolution (a compute budget; null is the rule)
    bit_resolution: Optional[Annotated[list[Annotated[Int, Field(ge=32)]], Field(min_length=2, max_length=2)]] = None

    @model_validator(mode="after")
    def _finetune(self):
        if self.finetune is None:
            for key in ("backbone", "bit_resolution", "bit_scale"):
                if key in self.model_fields_set and getattr(self, key) != type(self).model_fields[key].default:
                    raise Invalid(key, "is read only with teacher.finetune: bit")
            return self
        if self.path is not None:
            raise Invalid("finetune", "fine-tunes a backbone in the teacher stage, so teacher.path must be null")
        if self.backbone is None:
            raise Invalid("backbone", "must name the keras.applications backbone to fine-tune (resnet50_v2, "
                                      "efficientnet_b0, mobilenet_v2, ...)")
        if self.weights is None:
            raise Invalid("weights", "must be your pretrained backbone's weights (.h5): BiT-HyperRule fine-tunes "
                                     "pretrained weights")
        if self.bit_resolution is not None and not self.bit_resolution[0] >= self.bit_resolution[1]:
            raise Invalid("bit_resolution", f"must be [resize, crop] with resize >= crop, got {self.bit_resolution}")
        return self

    def architecture(self) -> str:
        """Returns the architecture the teacher stage builds: the backbone when fine-tuning, else ``arch``."""
        return self.backbone if self.finetune else self.arch


class StudentSpec(Config):
    arch: Str = "cnn"
    #: keyword options of models.build, e.g. width
    options: dict[str, Any] = {}
    #: a Keras weights file (.h5) the student starts from instead of random weights, loaded by layer name
    weights: Optional[Str] = None
    #: a model file (.keras or .h5, written by tf_keras or Keras 3, trained or not) that is the student, instead of
    #: arch and options; a Keras 3 model is rebuilt in tf_keras (edge_kd.keras3), its outputs checked equal
    path: Optional[Str] = None


class TrainingSpec(OptimizerConfig):
    """How every stage trains (the optimizer's keys are ``edge_kd.train.OptimizerConfig``'s)."""

    batch_size: Annotated[Int, Field(ge=1)] = 128
    learning_rate: Annotated[Float, Field(gt=0)] = 2e-3
    #: label smoothing of the students' cross-entropy (the teacher has its own, teacher.label_smoothing)
    label_smoothing: Annotated[Float, Field(ge=0, le=1)] = 0.0
    #: tf.distribute for the stages that train: none (one device), mirrored (this host's GPUs) or multi_worker (the
    #: hosts TF_CONFIG names, docs/distribution.md); batch_size is then the global batch
    strategy: Literal["none", "mirrored", "multi_worker"] = "none"
    #: multi_worker: the seconds a worker waits for the others: to start, at a barrier, at a collective step; a
    #: worker that died is noticed sooner (heartbeats). Not part of any fingerprint
    worker_timeout: Annotated[Float, Field(gt=0)] = 600.0
    #: the teacher, distill and baseline stages compute in 16 bits: float16 (GPUs, with loss scaling), bfloat16 (CPUs
    #: with AVX512_BF16 or AMX), or true: the one fast on this host (none on other CPUs). Loss terms stay float32,
    #: models are saved in float32, pruning and QAT train in float32; under bfloat16 the frozen teacher computes in
    #: it in every stage that distils
    mixed_precision: MixedPrecision = False


class ExtraTeacher(Config):
    path: TeacherFile
    trust: Bool = False
    input_range: Optional[InputRange] = None


class Peer(Config):
    #: default: the student's architecture (and then its options)
    arch: Optional[Str] = None
    options: dict[str, Any] = {}


class DistillationSpec(Config):
    """The loss of every stage that distils: ``hard_weight · CE + Σ term.weight · term``, and where knowledge comes from."""

    hard_weight: Annotated[Float, Field(ge=0)] = 0.5
    #: loss terms: [{name: hinton, weight: 0.5, temperature: 4}, ...]
    terms: list[dict[str, Any]] = [{"name": "hinton", "weight": 0.5, "temperature": 4.0}]
    #: teacher (the recipe's teacher and extra_teachers, or none for teacher-free terms), mean_teacher (an EMA of
    #: the student), mutual (peers, DML)
    mode: Literal["teacher", "mean_teacher", "mutual"] = "teacher"
    extra_teachers: list[ExtraTeacher] = []
    #: one weight per teacher (teacher, then extra_teachers); default: equal
    teacher_weights: Optional[list[Annotated[Float, Field(ge=0)]]] = None
    combine: Literal[COMBINE] = "fixed"
    #: mean_teacher: the EMA decay per step
    ema_decay: Annotated[Float, Field(ge=0, lt=1)] = 0.999
    #: mutual: the models trained with the student; arch defaults to the student's
    peers: list[Peer] = [Peer()]
    #: mutual: the model exported: 0 the student, i the i-th peer
    export: Annotated[Int, Field(ge=0)] = 0
    #: the teachers see exactly the student's augmented (and mixed) batch; false: the unaugmented images (a
    #: fixed view), their outputs mixed as the labels are
    consistent: Bool = True
    #: with consistent: false, the teachers' logits are computed once per run and no teacher runs per step
    teacher_cache: Bool = False

    def build_terms(self) -> list:
        """Returns the loss terms of ``terms``, built; a malformed entry is a UserError naming its index."""
        from edge_kd.distill import losses

        built = []
        for i, term in enumerate(self.terms):
            if "name" not in term:
                raise UserError(f"distillation.terms.{i} must name its loss (name: hinton, ...), got {term!r}")
            try:
                built.append(losses.get(term["name"], **{k: v for k, v in term.items() if k != "name"}))
            except UserError as e:
                raise UserError(f"distillation.terms.{i}: {e}") from None
        return built


class StagesBase(Config):
    """The stages a recipe runs; ``stage: false`` leaves one out, ``stage: {}`` or ``stage:`` takes its defaults."""

    @model_validator(mode="before")
    @classmethod
    def _absent_or_default(cls, raw):
        if isinstance(raw, dict):
            return {k: (None if v is False else {} if v is None else v) for k, v in raw.items()}
        return raw

    def enabled(self) -> list[str]:
        """Returns the names of the stages this recipe runs, in running order."""
        return [n for n in registry.STAGES if getattr(self, n) is not None and getattr(self, n).enabled]


Stages = create_model("Stages", __base__=StagesBase,
                      **{name: (Optional[stage.settings], None) for name, stage in registry.STAGES.items()})


class Recipe(Config):
    #: the keys filled from elsewhere in the recipe when it loaded (a stage's null learning rate, ...), each with
    #: what the recipe said (null, or the keys of a partial override)
    _derived: dict[str, Any] = PrivateAttr(default_factory=dict)
    #: the run folder's name; default <data>-<student>
    name: Optional[Str] = None
    seed: Int = 0
    data: DataConfig = Field(default_factory=DataConfig)
    #: the training augmentation of every stage that trains; a stage's own ``augment`` overrides keys of it
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    teacher: Optional[TeacherSpec] = Field(default_factory=TeacherSpec)
    student: StudentSpec = Field(default_factory=StudentSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    distillation: DistillationSpec = Field(default_factory=DistillationSpec)
    stages: Stages = Field(default_factory=Stages)
    #: read by pipelines.search only: what it searches over, for what target, within what
    search: Optional[SearchSpec] = None

    @field_validator("name")
    @classmethod
    def _folder_name(cls, v):
        if v is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", v):
            raise Invalid("", f"must be letters, digits, '.', '_' or '-' (a folder name), got {v!r}")
        return v

    @model_validator(mode="after")
    def _whole(self):
        derived = {}
        if self.teacher is not None and self.teacher.path is not None and self.stages.teacher is not None:
            # A teacher file replaces the stage that would train one; `--set teacher.path=null` brings it back.
            derived["stages.teacher"] = _as_given(self.stages.teacher)
            self.stages.teacher = None
        _check(self)
        if self.teacher is not None and self.teacher.learning_rate is None:
            self.teacher.learning_rate = self.training.learning_rate
            derived["teacher.learning_rate"] = None
        for name in self.stages.enabled():
            settings = getattr(self.stages, name)
            said = {k: _as_given(getattr(settings, k)) for k in type(settings).model_fields}
            for k in registry.STAGES[name].resolve(settings, self):
                derived[f"stages.{name}.{k}"] = said[k]
        self._derived = derived
        return self

    def to_dict(self) -> dict:
        """Returns the recipe as plain data (what the run folder's recipe.yaml holds); absent stages are left out."""
        d = self.model_dump()
        d["stages"] = {k: v for k, v in d["stages"].items() if v is not None}
        return d

    def run_name(self) -> str:
        """Returns the run folder's name."""
        if self.name:
            return self.name
        src = self.data.source
        stem = Path(src[5:] if src.startswith("tfds:") else src).stem or "data"
        student = Path(self.student.path).stem if self.student.path else self.student.arch
        return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{stem}-{student}")

    def distils(self, stage: str) -> bool:
        """Returns whether ``stage`` trains with the recipe's loss terms.

        With no teacher in ``teacher`` mode, only terms that need none (a virtual teacher) distil; the
        default Hinton term then falls away and the stage trains on cross-entropy alone.
        """
        from edge_kd.distill import losses

        d = self.distillation
        if not (d.terms and getattr(getattr(self.stages, stage), "distill", False)):
            return False
        if d.mode != "teacher" or self.teacher is not None:
            return True
        return not any(losses.needs_teacher(t["name"]) for t in d.terms)

    def peer_specs(self) -> list[dict]:
        """Returns the mutual-learning peers as {arch, options}, defaults filled from the student."""
        return [{"arch": p.arch or self.student.arch,
                 "options": p.options if p.arch or p.options else self.student.options}
                for p in self.distillation.peers]


def _as_given(value):
    """Returns a setting as the recipe gave it: a config as only the keys it set, anything else as is."""
    if isinstance(value, Config):
        return value.model_dump(exclude_unset=True)
    return value


class _Loader(yaml.SafeLoader):
    """YAML as PyYAML reads it, but for numbers in exponent form without a dot (1e-4, 2E5), which it leaves
    as strings (YAML 1.1) and a learning rate is usually written in."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                              list("-+0123456789"))


def yaml_value(text: str):
    """Returns YAML ``text`` read as a recipe is (1e-4 is a number)."""
    return yaml.load(text, Loader=_Loader)


def load(path=None) -> Recipe:
    """Returns the validated recipe at ``path``, a YAML file or the name of a shipped recipe (``mnist``);
    default: the built-in Fashion-MNIST recipe."""
    return from_dict(read_yaml(locate(path) if path is not None else DEFAULT_RECIPE))


def shipped() -> list[str]:
    """Returns the names of the shipped recipes (``pipelines/recipes/<name>.yaml``)."""
    return sorted(p.stem for p in RECIPES.glob("*.yaml"))


def locate(path) -> Path:
    """Returns the recipe file ``path`` names: the file itself or, where no such file is here, the shipped recipe it
    names (``mnist``, ``mnist.yaml``, or ``recipes/mnist.yaml`` as the shipped recipes' folder was once named);
    anything else is a UserError listing the shipped ones."""
    p = Path(path)
    if p.is_file():
        return p
    if p.suffix in ("", ".yaml") and p.parent in (Path("."), Path("recipes")) and (RECIPES / f"{p.stem}.yaml").is_file():
        return RECIPES / f"{p.stem}.yaml"
    raise UserError(f"recipe not found: {path} (give a YAML file, or a shipped recipe: {', '.join(shipped())})")


def read_yaml(path) -> dict:
    """Returns the mapping in YAML file ``path``; a missing file or bad syntax is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe not found: {path}")
    try:
        raw = yaml_value(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"recipe {path.name}: invalid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read recipe {path}: {e}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"recipe {path.name}: the top level must be a mapping of sections, got {type(raw).__name__}")
    return raw


def from_dict(raw: dict) -> Recipe:
    """Returns a validated Recipe built from plain data ``raw``."""
    if not isinstance(raw, dict):
        raise UserError(f"a recipe must be a mapping of sections, got {raw!r}")
    return Recipe.parse(raw)


def apply_overrides(recipe: Recipe, assignments: list[str]) -> Recipe:
    """Returns a new recipe with ``key.path=value`` assignments applied and validated.

    The keys the recipe derived when it loaded are derived again, so ``--set training.learning_rate=...``
    reaches every stage whose learning rate was null.
    """
    raw = recipe.to_dict()
    for path, said in recipe._derived.items():
        *parents, last = path.split(".")
        node = raw
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node[last] = said
    for text in assignments:
        if "=" not in text:
            raise UserError(f"--set expects key=value (e.g. prune.target_sparsity=0.5), got {text!r}")
        key, _, value_text = text.partition("=")
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise UserError(f"--set expects key=value, got {text!r}")
        if parts[0] in registry.STAGES and parts[0] not in Recipe.model_fields:
            parts = ["stages", *parts]  # `prune.x=1` is short for `stages.prune.x=1`
        try:
            value = yaml_value(value_text) if value_text.strip() else None
        except yaml.YAMLError:
            value = value_text
        node = raw
        for i, p in enumerate(parts[:-1]):
            if isinstance(node, list):
                if not p.isdigit() or int(p) >= len(node):
                    raise UserError(f"--set {key}: '{p}' is not an index of {'.'.join(parts[:i])} "
                                    f"(0..{len(node) - 1})")
                node = node[int(p)]
                continue
            if not isinstance(node, dict):
                raise UserError(f"--set {key}: {'.'.join(parts[:i]) or 'recipe'} has no keys")
            if node.get(p) is None:
                node[p] = {}  # naming a stage that the recipe leaves out adds it with its defaults
            node = node[p]
        last = parts[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise UserError(f"--set {key}: '{last}' is not an index (0..{len(node) - 1})")
            node[int(last)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise UserError(f"--set {key}: {'.'.join(parts[:-1])} has no keys")
    return from_dict(raw)


# -- the rules that span sections ---------------------------------------------------------------------------
def _check(r: Recipe):
    import models

    names = r.stages.enabled()
    required = [n for n, s in registry.STAGES.items() if s.required]
    for n in required:
        if n not in names:
            raise UserError(f"stages.{n} is required (a run trains a student, exports, benchmarks and reports: "
                            f"stages {', '.join(required)}); stages given: {', '.join(names) or 'none'}")
    if r.data.source == SYNTHETIC:
        _check_synthetic(r, names)
    if r.data.val_fraction <= 0:
        raise UserError("data.val_fraction must be > 0: every stage reports its validation accuracy, and settings "
                        f"are chosen on the validation split, never the test split; got {r.data.val_fraction:g}")
    if r.student.path is None:
        models.check_options(r.student.arch, r.student.options, "student")
    elif r.student.weights is not None:
        raise UserError("student.path is a whole model and student.weights the weights of a registry architecture: "
                        "give one of them")
    if r.teacher is not None:
        if r.teacher.path is None:
            if r.teacher.finetune and r.teacher.backbone not in models.APPLICATIONS:
                raise UserError(f"teacher.backbone '{r.teacher.backbone}' is not a keras.applications backbone; "
                                f"available: {', '.join(models.APPLICATIONS)}")
            models.check_options(r.teacher.architecture(), r.teacher.options, "teacher")
            if "teacher" not in names:
                raise UserError("teacher.path is null, so stages.teacher must train one (or set teacher: null for "
                                "no teacher)")
    elif "teacher" in names:
        raise UserError("stages.teacher is set but teacher is null; remove the stage or describe the teacher")
    _check_distillation(r)
    if r.teacher is not None and r.teacher.flip_average and "synthesize" in names:
        raise UserError("teacher.flip_average runs the teacher twice a batch, and stages.synthesize matches its images "
                        "to the statistics of one pass through the teacher's BatchNormalization layers: set "
                        "teacher.flip_average: false in a run that makes its images")
    if r.stages.distill.start == "companion":
        why = "stages.distill.start: companion starts the student from the one the generator was trained against"
        if "synthesize" not in names or r.stages.synthesize.method != "generator":
            raise UserError(f"{why}: it needs stages.synthesize with method generator")
        if "baseline" in names:
            raise UserError(f"{why}, which the teacher shaped, so the baseline (the student alone) cannot start from "
                            "the same weights: remove stages.baseline or start fresh")
        if r.distillation.mode == "mutual":
            raise UserError(f"{why}: distillation.mode mutual trains peers beside it, which have no such weights")
    if "baseline" in names and not r.distils("distill"):
        raise UserError("stages.baseline compares with the student trained without distillation, but the distill "
                        "stage does not distil (no teacher and no teacher-free term); remove stages.baseline")


def _check_synthetic(r: Recipe, names: list[str]):
    """A run without training images: a teacher file to make images from and distil, and no stage that needs labels."""
    why = f"data.source {SYNTHETIC} has no training images"
    if r.teacher is None or r.teacher.path is None:
        raise UserError(f"{why}: give the teacher's file in teacher.path (the images are made from it, and no "
                        "teacher can be trained here)")
    if "synthesize" not in names:
        raise UserError(f"{why}: add stages.synthesize, which makes the images the student is distilled on")
    if "baseline" in names:
        raise UserError(f"{why}, and stages.baseline trains the student on labelled ones: remove stages.baseline")
    if r.distillation.mode != "teacher":
        raise UserError(f"{why}: distillation.mode must be teacher (the teacher's knowledge is all there is)")
    if r.training.strategy == "multi_worker":
        raise UserError(f"{why}, and a multi-worker job checks its training images on every worker before the "
                        "synthesize stage has made them: use training.strategy none or mirrored")
    alone = [n for n in r.stages.enabled() if getattr(getattr(r.stages, n), "distill", None) is False]
    if alone:
        raise UserError(f"{why}: stages.{alone[0]}.distill must stay true (its labels are only the teacher's)")


def _check_distillation(r: Recipe):
    """Validates distillation: terms, and the teachers, mean teacher or peers its mode needs."""
    import models

    d = r.distillation
    built = d.build_terms()
    if d.mode != "teacher" and r.teacher is not None:
        raise UserError(f"distillation.mode {d.mode} needs no teacher ("
                        f"{'an EMA of the student teaches' if d.mode == 'mean_teacher' else 'the peers teach each other'}"
                        "); set teacher: null")
    if r.teacher is None and d.mode == "teacher":
        needy = [t.name for t in built if t.needs_teacher]
        if needy and len(needy) < len(built):
            raise UserError(f"distillation.terms {', '.join(needy)} need a teacher but teacher is null; remove them "
                            f"or name a teacher")
    if d.teacher_cache:
        if d.consistent:
            raise UserError("distillation.teacher_cache needs distillation.consistent: false (a cache holds the "
                            "teachers' logits of the unaugmented images; consistent teachers see each step's view)")
        if d.mode != "teacher" or r.teacher is None:
            raise UserError("distillation.teacher_cache needs mode teacher and a teacher (the cache holds its logits)")
        bad = [t.name for t in built if not t.reads_only_logits()]
        if bad:
            raise UserError(f"distillation.teacher_cache holds logits only; {', '.join(bad)} read layers or own "
                            f"variables: set teacher_cache: false")
    if r.teacher is not None and r.teacher.flip_average:
        tapped = [t.name for t in built if t.teacher_taps()]
        if tapped:
            raise UserError(f"teacher.flip_average averages the teacher's logits over the image and its mirror, but "
                            f"distillation.terms {', '.join(tapped)} read the teacher's layers, which it does not "
                            "average: set teacher.flip_average: false or use terms that read logits")
    if d.extra_teachers and (d.mode != "teacher" or r.teacher is None):
        raise UserError("distillation.extra_teachers adds to the recipe's teacher: it needs mode teacher and a teacher")
    if d.mode == "mutual":
        if not d.peers:
            raise UserError("distillation.peers must name at least one peer for mode mutual, e.g. [{arch: cnn}]")
        for i, p in enumerate(r.peer_specs()):
            models.check_options(p["arch"], p["options"], f"distillation.peers.{i}")
        if d.export > len(d.peers):
            raise UserError(f"distillation.export must be 0 (the student) to {len(d.peers)} (the last peer), "
                            f"got {d.export}")
    if r.training.strategy != "none":  # what the Distiller refuses across replicas, said before anything trains
        if d.mode == "mean_teacher":
            raise UserError(f"distillation.mode mean_teacher updates its teacher inside each step, which is not done "
                            f"across replicas; training.strategy {r.training.strategy} needs another mode, or use "
                            f"training.strategy: none")
        banked = [t.name for t in built if getattr(t, "bank_size", 0)]
        if banked:
            raise UserError(f"distillation.terms {', '.join(banked)} with a memory bank (bank_size > 0) would be "
                            f"written apart by the replicas of training.strategy {r.training.strategy}; use "
                            f"bank_size: 0 (in-batch negatives) or training.strategy: none")
    # the Distiller's own rules, said before anything trains (its terms only where a stage distils with them)
    from edge_kd.distill.distiller import KnowledgeError, check_knowledge

    teachers = 1 + len(d.extra_teachers) if d.mode == "teacher" and r.teacher is not None else 0
    distils = any(r.distils(s) for s in r.stages.enabled())
    try:
        check_knowledge(built if distils else [], teachers, d.teacher_weights, d.combine, d.mode == "mean_teacher",
                        len(d.peers) if d.mode == "mutual" else 0)
    except KnowledgeError as e:  # the argument at fault is the recipe key of the same name
        raise UserError(f"distillation.{e}" if e.key else f"distillation: {e}") from None
