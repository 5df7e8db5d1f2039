"""Recipes: one YAML file describes a run; validated into typed dataclasses before anything runs.

A wrong key, type or value is a one-line UserError naming the key, the bad value and what is
allowed. ``--set section.key=value`` (or ``stage.key=value``) overrides a loaded recipe, typed by
YAML like the file itself.

>>> r = load()                       # the built-in default recipe (recipes/mnist.yaml)
>>> r = apply_overrides(r, ["prune.target_sparsity=0.5", "seed=1"])
>>> r.stages.prune.target_sparsity
0.5
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import typing
from pathlib import Path
from typing import Any, Optional

import yaml

from edge_kd.errors import UserError

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
DEFAULT_RECIPE = RECIPES / "mnist.yaml"

#: the order stages always run in; a recipe picks a subset
STAGE_ORDER = ("teacher", "distill", "baseline", "prune", "cluster", "qat", "export", "benchmark", "bundle", "report")
TRAINING_STAGES = ("distill", "baseline", "prune", "cluster", "qat")
VARIANTS = ("fp32", "fp16", "dynamic", "int8")


def _field(default, *, choices=None, low=None, high=None, low_open=False, help=""):
    meta = {"choices": choices, "low": low, "high": high, "low_open": low_open, "help": help}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass
class DataSpec:
    source: str = _field("mnist", help="mnist, a .npz path, an image folder, or tfds:<name>")
    val_fraction: float = _field(0.1, low=0.0, high=1.0, low_open=True)
    image_size: Optional[list[int]] = _field(None, help="[H, W] to resize image-folder/tfds images")
    limit_train: Optional[int] = _field(None, low=1)
    limit_test: Optional[int] = _field(None, low=1)


@dataclasses.dataclass
class TeacherSpec:
    path: Optional[str] = _field(None, help="a user's .keras/.h5; null: train the teacher")
    trust: bool = _field(False)
    input_range: Optional[list[float]] = _field(None, help="[lo, hi] the teacher maps raw 0..255 pixels to")
    arch: str = _field("cnn_large")
    options: dict = _field({})
    epochs: int = _field(5, low=1)
    learning_rate: Optional[float] = _field(None, low=0.0, low_open=True)


@dataclasses.dataclass
class StudentSpec:
    arch: str = _field("cnn")
    options: dict = _field({}, help="keyword options of models.build, e.g. width")


@dataclasses.dataclass
class TrainingSpec:
    batch_size: int = _field(128, low=1)
    learning_rate: float = _field(2e-3, low=0.0, low_open=True)


MODES = ("teacher", "mean_teacher", "mutual")


@dataclasses.dataclass
class DistillationSpec:
    hard_weight: float = _field(0.1, low=0.0)
    terms: list = _field([{"name": "hinton", "weight": 0.9, "temperature": 4.0}],
                         help="loss terms: [{name: hinton, weight: 0.9, temperature: 4}, ...]")
    mode: str = _field("teacher", choices=MODES,
                       help="where knowledge comes from: teacher (the recipe's teacher and extra_teachers, or none "
                            "for teacher-free terms), mean_teacher (an EMA of the student), mutual (peers, DML)")
    extra_teachers: list = _field([], help="more teachers from files: [{path: b.keras, trust: false, "
                                           "input_range: null}, ...]")
    teacher_weights: Optional[list] = _field(None, help="one weight per teacher (teacher, then extra_teachers); "
                                                        "default: equal")
    combine: str = _field("fixed", choices=("fixed", "confidence"),
                          help="several teachers: fixed weights, or per-example confidence")
    ema_decay: float = _field(0.999, low=0.0, high=1.0, help="mean_teacher: the EMA decay per step, below 1")
    peers: list = _field([{}], help="mutual: the models trained with the student: [{arch: cnn, options: {}}, ...]; "
                                    "arch defaults to the student's")
    export: int = _field(0, low=0, help="mutual: the model exported: 0 the student, i the i-th peer")

    def build_terms(self) -> list:
        """Returns the loss terms of ``terms``, built; a malformed entry is a UserError naming its index."""
        from edge_kd.distill import losses

        built = []
        for i, term in enumerate(self.terms):
            if not isinstance(term, dict) or "name" not in term:
                raise UserError(f"distillation.terms.{i} must be a mapping with a name, got {term!r}")
            try:
                built.append(losses.get(term["name"], **{k: v for k, v in term.items() if k != "name"}))
            except UserError as e:
                raise UserError(f"distillation.terms.{i}: {e}") from None
        return built


@dataclasses.dataclass
class StageSpec:
    enabled: bool = _field(True)


@dataclasses.dataclass
class TrainStageSpec(StageSpec):
    epochs: int = _field(8, low=1)
    learning_rate: Optional[float] = _field(None, low=0.0, low_open=True, help="default: training.learning_rate")
    distill: bool = _field(True, help="distil from the teacher during this stage")


@dataclasses.dataclass
class BaselineStageSpec(StageSpec):
    epochs: Optional[int] = _field(None, low=1, help="default: the distill stage's epochs")


@dataclasses.dataclass
class PruneStageSpec(TrainStageSpec):
    epochs: int = _field(4, low=1)
    learning_rate: Optional[float] = _field(5e-4, low=0.0, low_open=True)
    target_sparsity: float = _field(0.75, low=0.0, high=1.0, low_open=True)
    initial_sparsity: float = _field(0.0, low=0.0, high=1.0)
    schedule: str = _field("polynomial", choices=("polynomial", "constant"))
    end_fraction: float = _field(0.75, low=0.0, high=1.0, low_open=True,
                                 help="fraction of the stage's steps by which the target sparsity is reached")
    frequency: int = _field(50, low=1)
    structured_2_4: bool = _field(False)


@dataclasses.dataclass
class ClusterStageSpec(TrainStageSpec):
    epochs: int = _field(2, low=1)
    learning_rate: Optional[float] = _field(2e-4, low=0.0, low_open=True)
    clusters: int = _field(16, low=2)
    preserve_sparsity: bool = _field(True)


@dataclasses.dataclass
class QATStageSpec(TrainStageSpec):
    epochs: int = _field(2, low=1)
    learning_rate: Optional[float] = _field(1e-4, low=0.0, low_open=True)
    unsupported: str = _field("error", choices=("error", "float"),
                              help="layers the 8-bit scheme cannot quantize: error, or leave them in float")


@dataclasses.dataclass
class ExportStageSpec(StageSpec):
    variants: list = _field(list(VARIANTS), help="variants of the distilled and pruned students")
    int8_io: bool = _field(True)
    representative_samples: int = _field(500, low=1)


@dataclasses.dataclass
class BenchmarkStageSpec(StageSpec):
    threads: list = _field([1, 2])
    min_seconds: float = _field(1.0, low=0.0, help="timed runs last at least this long (benchmark_model: 1 s)")
    warmup_seconds: float = _field(0.5, low=0.0, help="warm-up lasts at least this long (benchmark_model: 0.5 s)")


@dataclasses.dataclass
class BundleStageSpec(StageSpec):
    pick: Optional[str] = _field(None, help="the exported model to bundle, e.g. qat-int8; default: the smallest "
                                            "int8 model within tolerance_pp of the best student")
    tolerance_pp: float = _field(0.5, low=0.0, help="accuracy points the default pick may give up for size")
    golden: int = _field(8, low=1, high=1000, help="real test images stored with their expected outputs")


@dataclasses.dataclass
class Stages:
    teacher: Optional[StageSpec] = None
    distill: Optional[TrainStageSpec] = None
    baseline: Optional[BaselineStageSpec] = None
    prune: Optional[PruneStageSpec] = None
    cluster: Optional[ClusterStageSpec] = None
    qat: Optional[QATStageSpec] = None
    export: Optional[ExportStageSpec] = None
    benchmark: Optional[BenchmarkStageSpec] = None
    bundle: Optional[BundleStageSpec] = None
    report: Optional[StageSpec] = None

    def enabled(self) -> list[str]:
        """Returns the names of the stages this recipe runs, in running order."""
        return [n for n in STAGE_ORDER if getattr(self, n) is not None and getattr(self, n).enabled]


STAGE_TYPES = {"teacher": StageSpec, "distill": TrainStageSpec, "baseline": BaselineStageSpec,
               "prune": PruneStageSpec, "cluster": ClusterStageSpec, "qat": QATStageSpec,
               "export": ExportStageSpec, "benchmark": BenchmarkStageSpec, "bundle": BundleStageSpec,
               "report": StageSpec}


@dataclasses.dataclass
class Recipe:
    name: Optional[str] = _field(None, help="the run folder's name; default <data>-<student>")
    seed: int = _field(0)
    data: DataSpec = dataclasses.field(default_factory=DataSpec)
    teacher: Optional[TeacherSpec] = dataclasses.field(default_factory=TeacherSpec)
    student: StudentSpec = dataclasses.field(default_factory=StudentSpec)
    training: TrainingSpec = dataclasses.field(default_factory=TrainingSpec)
    distillation: DistillationSpec = dataclasses.field(default_factory=DistillationSpec)
    stages: Stages = dataclasses.field(default_factory=Stages)

    def to_dict(self) -> dict:
        """Returns the recipe as plain data (what the run folder's recipe.yaml holds); absent stages are left out."""
        d = dataclasses.asdict(self)
        d["stages"] = {k: v for k, v in d["stages"].items() if v is not None}
        return d

    def run_name(self) -> str:
        """Returns the run folder's name."""
        import re

        if self.name:
            return self.name
        src = self.data.source
        stem = Path(src[5:] if src.startswith("tfds:") else src).stem or "data"
        return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{stem}-{self.student.arch}")

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
        return [{"arch": p.get("arch") or self.student.arch,
                 "options": p.get("options", self.student.options if not p.get("arch") else {})}
                for p in self.distillation.peers]


def fingerprint(obj) -> str:
    """Returns a stable sha256 of JSON-able ``obj``."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def load(path=None) -> Recipe:
    """Returns the validated recipe at ``path`` (default: the built-in MNIST recipe)."""
    return from_dict(read_yaml(path or DEFAULT_RECIPE), where=str(path or DEFAULT_RECIPE.name))


def read_yaml(path) -> dict:
    """Returns the mapping in YAML file ``path``; a missing file or bad syntax is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
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


def from_dict(raw: dict, where: str = "recipe") -> Recipe:
    """Returns a validated Recipe built from plain data ``raw``."""
    recipe = _build(Recipe, raw, "")
    if recipe.teacher is not None and recipe.teacher.path is not None:
        recipe.stages.teacher = None  # a user's teacher replaces the stage that would train one
    _check_semantics(recipe)
    return recipe


def apply_overrides(recipe: Recipe, assignments: list[str]) -> Recipe:
    """Returns a new recipe with ``key.path=value`` assignments applied and validated."""
    raw = recipe.to_dict()
    for text in assignments:
        if "=" not in text:
            raise UserError(f"--set expects key=value (e.g. prune.target_sparsity=0.5), got {text!r}")
        key, _, value_text = text.partition("=")
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise UserError(f"--set expects key=value, got {text!r}")
        if parts[0] in STAGE_ORDER and parts[0] not in Recipe.__dataclass_fields__:
            parts = ["stages", *parts]  # `prune.x=1` is short for `stages.prune.x=1`
        try:
            value = yaml.safe_load(value_text) if value_text.strip() else None
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
    return from_dict(raw, where="--set")


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is list or tp is list:
        return "a list"
    if origin is dict or tp is dict:
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(tp, getattr(tp, "__name__", str(tp)))


def _build(cls, raw, prefix):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{prefix.rstrip('.') or 'recipe'} must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        raise UserError(f"unknown key '{prefix}{unknown[0]}'; allowed: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        key = f"{prefix}{name}"
        value = raw[name]
        if cls is Stages:
            kwargs[name] = None if value is False else _build(STAGE_TYPES[name], value, key + ".")
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(_unwrap(tp)):
            if value is None and typing.get_origin(tp) is typing.Union:
                kwargs[name] = None
            else:
                kwargs[name] = _build(_unwrap(tp), value, key + ".")
            continue
        kwargs[name] = _check_value(key, value, tp, f.metadata)
    return cls(**kwargs)


def _unwrap(tp):
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def _check_value(key, value, tp, meta):
    optional = typing.get_origin(tp) is typing.Union and type(None) in typing.get_args(tp)
    if value is None:
        if optional:
            return None
        raise UserError(f"{key} must be {_type_name(tp)}, got null")
    base = _unwrap(tp)
    origin = typing.get_origin(base) or base
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
        list: isinstance(value, list),
        dict: isinstance(value, dict),
    }.get(origin, True)
    if not ok:
        raise UserError(f"{key} must be {_type_name(tp)}, got {value!r}")
    if origin is float:
        value = float(value)
    choices = meta.get("choices")
    if choices and value not in choices:
        raise UserError(f"{key} must be one of {', '.join(choices)}, got {value!r}")
    low, high, low_open = meta.get("low"), meta.get("high"), meta.get("low_open")
    if origin in (int, float):
        if (low is not None and (value <= low if low_open else value < low)) or (high is not None and value > high):
            if high is None:
                allowed = f"{'>' if low_open else '≥'} {low:g}"
            else:
                allowed = f"in {'(' if low_open else '['}{low:g}, {high:g}]"
            raise UserError(f"{key} must be {allowed}, got {value!r}")
    return value


def _check_semantics(r: Recipe):
    import models

    names = r.stages.enabled()
    for required in ("distill", "export", "benchmark", "report"):
        if required not in names:
            raise UserError(f"stages.{required} is required (a run distils or trains a student, exports, "
                            f"benchmarks and reports); stages given: {', '.join(names) or 'none'}")
    if r.student.arch not in models.available():
        raise UserError(f"student.arch '{r.student.arch}' is unknown; available: {', '.join(models.available())}")
    if r.teacher is not None:
        if r.teacher.path is None and r.teacher.arch not in models.available():
            raise UserError(f"teacher.arch '{r.teacher.arch}' is unknown; available: {', '.join(models.available())}")
        if r.teacher.path is None and "teacher" not in names:
            raise UserError("teacher.path is null, so stages.teacher must train one (or set teacher: null for no teacher)")
        _check_input_range("teacher.input_range", r.teacher.input_range)
    elif "teacher" in names:
        raise UserError("stages.teacher is set but teacher is null; remove the stage or describe the teacher")
    _check_distillation(r)
    if "baseline" in names and not r.distils("distill"):
        raise UserError("stages.baseline compares with the student trained without distillation, but the distill "
                        "stage does not distil (no teacher and no teacher-free term); remove stages.baseline")
    if r.data.image_size is not None and (len(r.data.image_size) != 2 or not all(
            isinstance(v, int) and v > 0 for v in r.data.image_size)):
        raise UserError(f"data.image_size must be [H, W] of positive integers, got {r.data.image_size!r}")
    bad = [v for v in r.stages.export.variants if v not in VARIANTS]
    if bad or not r.stages.export.variants:
        raise UserError(f"stages.export.variants must be a list drawn from {', '.join(VARIANTS)}, got "
                        f"{r.stages.export.variants!r}")
    threads = r.stages.benchmark.threads
    if not threads or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 1 for t in threads):
        raise UserError(f"stages.benchmark.threads must be a list of positive integers, got {threads!r}")
    if r.stages.prune is not None and r.stages.prune.initial_sparsity >= r.stages.prune.target_sparsity:
        raise UserError(f"stages.prune.initial_sparsity must be below target_sparsity "
                        f"({r.stages.prune.target_sparsity:g}), got {r.stages.prune.initial_sparsity:g}")
    if r.name is not None:
        import re

        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", r.name):
            raise UserError(f"name must be letters, digits, '.', '_' or '-', got {r.name!r}")


def _check_input_range(key: str, ir) -> None:
    """Raises a UserError unless ``ir`` is None or [lo, hi] numbers with hi > lo."""
    if ir is not None and (not isinstance(ir, list) or len(ir) != 2
                           or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in ir)
                           or not ir[1] > ir[0]):
        raise UserError(f"{key} must be [lo, hi] with hi > lo, got {ir!r}")


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
    if d.extra_teachers and (d.mode != "teacher" or r.teacher is None):
        raise UserError("distillation.extra_teachers adds to the recipe's teacher: it needs mode teacher and a teacher")
    for i, t in enumerate(d.extra_teachers):
        if not isinstance(t, dict) or not isinstance(t.get("path"), str) or set(t) - {"path", "trust", "input_range"}:
            raise UserError(f"distillation.extra_teachers.{i} must be {{path: FILE, trust: false, input_range: null}}, "
                            f"got {t!r}")
        _check_input_range(f"distillation.extra_teachers.{i}.input_range", t.get("input_range"))
        if not isinstance(t.get("trust", False), bool):
            raise UserError(f"distillation.extra_teachers.{i}.trust must be true/false, got {t['trust']!r}")
    if d.teacher_weights is not None:
        n = 1 + len(d.extra_teachers)
        w = d.teacher_weights
        if (len(w) != n or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in w)
                or sum(w) <= 0):
            raise UserError(f"distillation.teacher_weights must be {n} non-negative numbers with a positive sum "
                            f"(teacher, then extra_teachers), got {w!r}")
    if not d.ema_decay < 1.0:
        raise UserError(f"distillation.ema_decay must be in [0, 1), got {d.ema_decay!r}")
    if d.mode == "mutual":
        if not d.peers:
            raise UserError("distillation.peers must name at least one peer for mode mutual, e.g. [{arch: cnn}]")
        for i, p in enumerate(d.peers):
            if not isinstance(p, dict) or set(p) - {"arch", "options"} or not isinstance(p.get("options", {}), dict):
                raise UserError(f"distillation.peers.{i} must be {{arch: NAME, options: {{...}}}}, got {p!r}")
            if p.get("arch") is not None and p["arch"] not in models.available():
                raise UserError(f"distillation.peers.{i}.arch '{p['arch']}' is unknown; available: "
                                f"{', '.join(models.available())}")
        if d.export > len(d.peers):
            raise UserError(f"distillation.export must be 0 (the student) to {len(d.peers)} (the last peer), "
                            f"got {d.export}")
        bad = [t.name for t in built if not t.reads_only_logits()]
        if bad:
            raise UserError(f"distillation.mode mutual works with terms on logits (hinton, dkd, rkd without layers, "
                            f"virtual_teacher); {', '.join(bad)} read layers or own variables")
