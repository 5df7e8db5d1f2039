"""The stages of a run and the runner that makes each one resumable.

Every stage writes into a hidden working folder that is renamed into place when the stage is
done; then its manifest, ``manifests/<stage>.json``, is written (the fingerprint of its settings
and of its inputs, and the sha256 of every file it wrote). A rerun skips a stage whose manifest
matches its fingerprint and whose files still hash as recorded; anything else (a changed setting,
a changed input, a missing or altered file, a stage killed at any moment) reruns that stage and
every stage that reads from it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

import edge_kd
from edge_kd.errors import UserError
from edge_kd.fileio import atomic_path, sha256_file, write_json
from pipelines.recipe import Recipe, fingerprint

MODEL_STAGES = ("distill", "prune", "cluster", "qat")  # each refines the student the previous one left
FOLDERS = {"export": "tflite"}  # a stage's folder in the run folder, where it is not the stage's name
PUBLISHED = ("report.md", "results.json", "results.csv", "pareto.png")


def keras_verbosity() -> int:
    """Returns 1 (a live progress bar) on a terminal, 2 (one line per epoch) in logs."""
    return 1 if sys.stdout.isatty() else 2


class Interrupted(Exception):
    """Ctrl-C during a stage: carries the stage's name for the resume message."""

    def __init__(self, stage: str):
        super().__init__(stage)
        self.stage = stage


class Context:
    """What stages share: the recipe, the run folder, the data and the teacher, loaded once when first asked."""

    def __init__(self, recipe: Recipe, run_dir: Path, command: str):
        self.recipe, self.run_dir, self.command = recipe, Path(run_dir), command
        self._bundle = None
        self._teacher = None
        self._extra_teachers = None
        self.teacher_info: dict = {}
        self.manifests: dict[str, dict] = {}

    # -- data and models ---------------------------------------------------------------------------
    @property
    def bundle(self):
        if self._bundle is None:
            from edge_kd import data

            d = self.recipe.data
            self._bundle = data.load(d.source, val_fraction=d.val_fraction, seed=self.recipe.seed,
                                     limit_train=d.limit_train, limit_test=d.limit_test, image_size=d.image_size)
        return self._bundle

    def build_student(self):
        """Returns a fresh student, its weights drawn from the recipe's seed."""
        import models
        from edge_kd.keras import keras

        keras.utils.set_random_seed(self.recipe.seed)
        info = self.bundle.info
        return models.build(self.recipe.student.arch, info.input_shape, info.num_classes, **self.recipe.student.options)

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
            self._teacher, adapted = self._adapt(model, t.input_range)
            self.teacher_info = {**adapted, "trained_by": "edge-kd" if t.path is None else "user",
                                 "file": str(self.teacher_file())}
        return self._teacher

    def teachers(self) -> list:
        """Returns the recipe's teacher followed by ``distillation.extra_teachers``, each adapted and frozen."""
        if self._extra_teachers is None:
            from edge_kd.distill import load_teacher

            self._extra_teachers = [self._adapt(load_teacher(t["path"], trust=t.get("trust", False)),
                                                t.get("input_range"))[0]
                                    for t in self.recipe.distillation.extra_teachers]
        return [self.teacher(), *self._extra_teachers]

    def _adapt(self, model, input_range):
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

    def stage_dir(self, name: str) -> Path:
        """Returns the folder of stage ``name`` in the run folder."""
        return self.run_dir / FOLDERS.get(name, name)

    def manifest_path(self, name: str) -> Path:
        """Returns the path of stage ``name``'s manifest (kept apart, so a bundle folder holds only the bundle)."""
        return self.run_dir / "manifests" / f"{name}.json"

    def last_model_stage(self, before: str) -> str:
        """Returns the latest enabled model stage that runs before ``before`` (whose student it refines)."""
        enabled = self.recipe.stages.enabled()
        earlier = [s for s in MODEL_STAGES if s in enabled and MODEL_STAGES.index(s) < MODEL_STAGES.index(before)]
        return earlier[-1]

    def load_student(self, stage: str):
        """Returns the student model saved by ``stage``."""
        from edge_kd.keras import keras

        path = self.stage_dir(stage) / STAGES[stage].model_file
        if stage == "qat":
            from edge_kd.compress import qat

            # rebuilt from the model it quantized, so the PQAT/PCQAT quantizers come back exactly
            return qat.load(path, base=self.load_student(self.last_model_stage("qat")), cfg=self.qat_config())
        return keras.models.load_model(path, compile=False)

    def qat_config(self):
        """Returns the QAT settings: sparsity-preserving after pruning, cluster-preserving after clustering."""
        from edge_kd.compress import qat

        enabled = self.recipe.stages.enabled()
        return qat.QATConfig(preserve_sparsity="prune" in enabled, preserve_clusters="cluster" in enabled,
                             unsupported=self.recipe.stages.qat.unsupported)

    # -- training ------------------------------------------------------------------------------------
    def distiller(self, student, stage: str, peers=None):
        """Returns a Distiller of ``student`` for ``stage``: with the recipe's loss terms if it distils.

        In mutual mode the peers are ``peers`` or, after the distill stage, the peers it saved.
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
        teachers = self.teachers() if self.recipe.teacher is not None else None
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

    def fit(self, distiller, epochs: int, learning_rate: float, callbacks=()):
        """Trains ``distiller`` with Adam and cosine decay; returns the history as plain lists."""
        from edge_kd.keras import keras

        b, tr = self.bundle, self.recipe.training
        train = b.dataset("train", tr.batch_size, shuffle=True, seed=self.recipe.seed)
        val = b.dataset("val", 512)
        schedule = keras.optimizers.schedules.CosineDecay(learning_rate, max(1, epochs * len(train)))
        distiller.compile(optimizer=keras.optimizers.Adam(schedule))
        history = distiller.fit(train, validation_data=val, epochs=epochs, verbose=keras_verbosity(),
                                callbacks=list(callbacks))
        return {k: [float(v) for v in vs] for k, vs in history.history.items()}

    def steps_per_epoch(self) -> int:
        return int(np.ceil(len(self.bundle.y_train) / self.recipe.training.batch_size))


@dataclasses.dataclass
class Stage:
    """One step of a run: ``run(ctx, folder) -> summary`` writes the stage's files into ``folder``."""

    name: str
    run: callable
    title: callable
    model_file: str | None = None

    def depends_on(self, ctx: Context) -> list[str]:
        """Returns the enabled stages whose outputs this one reads."""
        enabled = ctx.recipe.stages.enabled()
        deps = {
            "teacher": [],
            "distill": [],
            "baseline": [],
            "prune": [ctx.last_model_stage("prune")] if self.name == "prune" else [],
            "cluster": [ctx.last_model_stage("cluster")] if self.name == "cluster" else [],
            "qat": [ctx.last_model_stage("qat")] if self.name == "qat" else [],
            "export": [s for s in ("teacher", *MODEL_STAGES) if s in enabled],
            "benchmark": [s for s in ("teacher", "distill", "baseline", "export") if s in enabled],
            "bundle": ["benchmark"],
            "report": ["benchmark", *(["bundle"] if "bundle" in enabled else [])],
        }[self.name]
        if self.name in MODEL_STAGES and ctx.recipe.distils(self.name) and "teacher" in enabled:
            deps = ["teacher", *deps]
        return deps

    def fingerprint(self, ctx: Context) -> str:
        """Returns the hash of everything this stage's result depends on."""
        r = ctx.recipe
        key = {"stage": self.name, "settings": dataclasses.asdict(getattr(r.stages, self.name)),
               "edge_kd": edge_kd.__version__,
               # what an input stage wrote, not only how it was configured: a rerun of it that wrote
               # other bytes (training is not bit-reproducible) makes this stage rerun too
               "inputs": {d: fingerprint([ctx.manifests[d]["fingerprint"], ctx.manifests[d]["files"]])
                          for d in self.depends_on(ctx)}}
        if self.name in ("teacher", *MODEL_STAGES, "baseline"):
            key.update(seed=r.seed, data=dataclasses.asdict(r.data), training=dataclasses.asdict(r.training))
        if self.name == "teacher":
            key["teacher"] = dataclasses.asdict(r.teacher)
        if self.name in (*MODEL_STAGES, "baseline"):
            key["student"] = dataclasses.asdict(r.student)
        if self.name == "baseline":
            key["epochs"] = _baseline_epochs(r)
        if self.name in MODEL_STAGES and r.distils(self.name):
            key["distillation"] = dataclasses.asdict(r.distillation)
            key["teacher"] = _teacher_key(ctx)
            key["extra_teachers"] = [_file_key(t["path"]) for t in r.distillation.extra_teachers]
        if self.name in ("export", "benchmark", "bundle"):
            key["data"] = dataclasses.asdict(r.data)
            key["seed"] = r.seed
            key["teacher"] = _teacher_key(ctx)
        return fingerprint(key)


def _teacher_key(ctx: Context):
    t = ctx.recipe.teacher
    if t is None:
        return None
    if t.path is None:
        return {"trained": ctx.manifests.get("teacher", {}).get("fingerprint")}
    return {"file_sha256": _file_key(t.path), "input_range": t.input_range, "trust": t.trust}


def _file_key(path) -> str:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"teacher file not found: {path}")
    return sha256_file(path)


def _baseline_epochs(r: Recipe) -> int:
    return r.stages.baseline.epochs or r.stages.distill.epochs


def _save_model(model, path: Path, scope=None):
    with atomic_path(path) as tmp, (scope() if scope else contextlib.nullcontext()):
        model.save(tmp)


# -- the stages ---------------------------------------------------------------------------------------
def _run_teacher(ctx: Context, out: Path) -> dict:
    import models

    from edge_kd.distill import Distiller
    from edge_kd.keras import keras

    t, info = ctx.recipe.teacher, ctx.bundle.info
    keras.utils.set_random_seed(ctx.recipe.seed)
    model = models.build(t.arch, info.input_shape, info.num_classes, **t.options)
    history = ctx.fit(Distiller(model), t.epochs, t.learning_rate or ctx.recipe.training.learning_rate)
    _save_model(model, out / "teacher.keras")
    write_json(out / "history.json", history)
    return {"val_accuracy": history["val_accuracy"][-1]}


def _run_distill(ctx: Context, out: Path) -> dict:
    r = ctx.recipe
    spec = r.stages.distill
    student, peers = ctx.build_student(), None
    if r.distils("distill") and r.distillation.mode == "mutual":
        # The recipe says which of the models trained together is exported; the others are kept as its peers.
        models = [student, *ctx.build_peers()]
        student = models.pop(r.distillation.export)
        peers = models
    history = ctx.fit(ctx.distiller(student, "distill", peers=peers), spec.epochs,
                      spec.learning_rate or r.training.learning_rate)
    _save_model(student, out / "student.keras")
    for i, peer in enumerate(peers or []):
        (out / "peers").mkdir(exist_ok=True)
        _save_model(peer, out / "peers" / f"peer_{i}.keras")
    write_json(out / "history.json", history)
    return {"val_accuracy": history["val_accuracy"][-1], "distilled": ctx.recipe.distils("distill")}


def _run_baseline(ctx: Context, out: Path) -> dict:
    from edge_kd.distill import Distiller

    r = ctx.recipe
    student = ctx.build_student()  # the same initial weights as the distilled student
    history = ctx.fit(Distiller(student), _baseline_epochs(r), r.stages.distill.learning_rate or r.training.learning_rate)
    _save_model(student, out / "baseline.keras")
    write_json(out / "history.json", history)
    return {"val_accuracy": history["val_accuracy"][-1]}


def _run_prune(ctx: Context, out: Path) -> dict:
    from edge_kd.compress import prune

    spec = ctx.recipe.stages.prune
    steps = spec.epochs * ctx.steps_per_epoch()
    cfg = prune.PruneConfig(target_sparsity=spec.target_sparsity, initial_sparsity=spec.initial_sparsity,
                            schedule=spec.schedule, begin_step=0, end_step=max(1, int(steps * spec.end_fraction)),
                            frequency=spec.frequency, structured_2_4=spec.structured_2_4)
    return _refine(ctx, "prune", out, lambda m: prune.prune(m, cfg, total_steps=steps), prune.strip,
                   callbacks=prune.callbacks())


def _run_cluster(ctx: Context, out: Path) -> dict:
    from edge_kd.compress import cluster

    spec = ctx.recipe.stages.cluster
    cfg = cluster.ClusterConfig(clusters=spec.clusters, preserve_sparsity=spec.preserve_sparsity)
    return _refine(ctx, "cluster", out, lambda m: cluster.cluster(m, cfg), cluster.strip)


def _refine(ctx: Context, stage: str, out: Path, wrap, strip, callbacks=()) -> dict:
    """Wraps the previous stage's student, trains it in the Distiller for ``stage``, strips and saves it."""
    spec = getattr(ctx.recipe.stages, stage)
    wrapped = wrap(ctx.load_student(ctx.last_model_stage(stage)))
    history = ctx.fit(ctx.distiller(wrapped, stage), spec.epochs, spec.learning_rate, callbacks=callbacks)
    stripped = strip(wrapped)
    _save_model(stripped, out / STAGES[stage].model_file)
    write_json(out / "history.json", history)
    return {"val_accuracy": history["val_accuracy"][-1], "keras_sparsity": _keras_sparsity(stripped)}


def _run_qat(ctx: Context, out: Path) -> dict:
    from edge_kd.compress import qat

    spec = ctx.recipe.stages.qat
    source = ctx.last_model_stage("qat")
    cfg = ctx.qat_config()
    student = ctx.load_student(source)
    quantized = qat.quantize(student, cfg)
    history = ctx.fit(ctx.distiller(quantized, "qat"), spec.epochs, spec.learning_rate)
    _save_model(quantized, out / "qat.keras", scope=qat.scope)
    write_json(out / "history.json", history)
    return {"val_accuracy": history["val_accuracy"][-1], "scheme": qat.scheme_name(cfg), "from": source,
            "float_layers": list(getattr(quantized, "qat_float_layers", ()))}


def _export_plan(ctx: Context) -> list[dict]:
    enabled, variants = ctx.recipe.stages.enabled(), ctx.recipe.stages.export.variants
    plan = []
    if ctx.recipe.teacher is not None:
        plan.append({"name": "teacher-fp32", "stage": "teacher", "role": "teacher", "variant": "fp32"})
    prefixes = {"distill": "student", "prune": "pruned", "cluster": "clustered"}
    for stage in ("distill", "prune", "cluster"):
        if stage in enabled:
            for v in variants:
                plan.append({"name": f"{prefixes[stage]}-{v}", "stage": stage, "role": "student", "variant": v})
    if "qat" in enabled:  # a QAT model exists to become int8; its float variants would only hold fake-quant ops
        plan.append({"name": "qat-int8", "stage": "qat", "role": "student", "variant": "int8"})
    return plan


def _run_export(ctx: Context, out: Path) -> dict:
    from edge_kd.export import tflite
    from edge_kd.fileio import write_bytes

    spec = ctx.recipe.stages.export
    x_train, _ = ctx.bundle.arrays("train")
    rep = x_train[np.random.default_rng(ctx.recipe.seed).permutation(len(x_train))[: spec.representative_samples]]
    loaded = {}
    plan = _export_plan(ctx)
    for item in plan:
        stage = item["stage"]
        if stage not in loaded:
            loaded[stage] = ctx.teacher() if stage == "teacher" else ctx.load_student(stage)
        flat = tflite.convert(loaded[stage], item["variant"], representative=rep if item["variant"] == "int8" else None,
                              int8_io=spec.int8_io)
        write_bytes(out / f"{item['name']}.tflite", flat)
        item["path"] = f"{FOLDERS['export']}/{item['name']}.tflite"
    write_json(out / "exports.json", plan)
    return {"files": len(plan)}


def _run_benchmark(ctx: Context, out: Path) -> dict:
    from edge_kd.bench import litert, parity, stats

    r, info = ctx.recipe, ctx.bundle.info
    x_test, y_test = ctx.bundle.arrays("test")
    enabled = r.stages.enabled()
    plan = json.loads((ctx.stage_dir("export") / "exports.json").read_text())
    sources = {}

    def source_model(stage):
        if stage not in sources:
            sources[stage] = ctx.teacher() if stage == "teacher" else ctx.load_student(stage)
        return sources[stage]

    def row(name, role, fmt, variant, stage, rel, file, acc, model, **tflite_figures):
        size, gz = stats.file_sizes(file)
        # a QAT model's variables include its quantizers' ranges; its weights are those of the model it quantized
        counted = source_model(ctx.last_model_stage("qat")) if stage == "qat" else model
        return {"name": name, "role": role, "format": fmt, "variant": variant, "stage": stage, "path": rel,
                "accuracy": float(acc), "size_bytes": int(size), "gzip_bytes": int(gz),
                "params": stats.count_params(counted), "macs": stats.count_macs(counted),
                "input_scale": float(info.input_scale), "input_offset": float(info.input_offset),
                "sparsity": None, "latency": None, "parity": None, "ops": None, **tflite_figures}

    rows = []
    keras_rows = []
    if r.teacher is not None:
        keras_rows.append(("teacher", "teacher", "teacher"))
    keras_rows.append(("student", "student", "distill"))
    if "baseline" in enabled:
        keras_rows.append(("baseline", "baseline", "baseline"))
    for name, role, stage in keras_rows:
        model = source_model(stage)
        file = ctx.teacher_file() if stage == "teacher" else ctx.stage_dir(stage) / STAGES[stage].model_file
        rel = os.path.relpath(file, ctx.run_dir) if stage != "teacher" or r.teacher.path is None else str(file)
        acc = float(np.mean(np.argmax(model.predict(x_test, batch_size=512, verbose=0), -1) == y_test))
        rows.append(row(name, role, "keras", "fp32", stage, rel, file, acc, model))
    sample = x_test[0]
    for item in plan:
        file = ctx.run_dir / item["path"]
        acc = litert.accuracy(file, x_test, y_test)
        b = r.stages.benchmark
        latency = {str(t): litert.latency(file, sample, num_threads=t, min_seconds=b.min_seconds,
                                          min_warmup_seconds=b.warmup_seconds) for t in b.threads}
        model = source_model(item["stage"])
        sparsity = stats.tflite_weight_sparsity(file)
        rows.append(row(item["name"], item["role"], "tflite", item["variant"], item["stage"], item["path"], file, acc,
                        model, latency=latency, sparsity=sparsity["overall"],
                        sparsity_layers={_layer_of(k): v["sparsity"] for k, v in sparsity["layers"].items()},
                        parity=parity.parity(model, file, x_test), ops=parity.ops(file)))
    teacher_acc = rows[0]["accuracy"] if r.teacher is not None else None
    for m in rows:
        m["gap_to_teacher"] = None if teacher_acc is None else teacher_acc - m["accuracy"]
    write_json(out / "models.json", {"models": rows, "runtime": litert.runtime_info(),
                                     "teacher": ctx.teacher_info if r.teacher is not None else None})
    return {"models": len(rows)}


def _run_bundle(ctx: Context, out: Path) -> dict:
    from edge_kd.export import bundle as bundle_mod

    r, spec, info = ctx.recipe, ctx.recipe.stages.bundle, ctx.bundle.info
    rows = json.loads((ctx.stage_dir("benchmark") / "models.json").read_text())["models"]
    chosen = bundle_mod.pick(rows, tolerance_pp=spec.tolerance_pp, name=spec.pick)
    x_raw = ctx.bundle.x_test[np.random.default_rng(r.seed).permutation(len(ctx.bundle.x_test))[: spec.golden]]
    bundle_mod.write_bundle(out, ctx.run_dir / chosen["path"], class_names=list(info.class_names),
                            input_scale=info.input_scale, input_offset=info.input_offset, golden_x_raw=x_raw,
                            measured=bundle_mod.measured_from(chosen), recipe_hash=fingerprint(r.to_dict()),
                            version=edge_kd.__version__)
    return {"model": chosen["name"], "accuracy": chosen["accuracy"], "size_bytes": chosen["size_bytes"]}


def _run_report(ctx: Context, out: Path) -> dict:
    import datetime as dt

    from edge_kd.report import report

    r, info = ctx.recipe, ctx.bundle.info
    bench = json.loads((ctx.stage_dir("benchmark") / "models.json").read_text())
    histories, summaries = {}, {}
    for stage in r.stages.enabled():
        h = ctx.stage_dir(stage) / "history.json"
        if h.is_file():
            histories[stage] = json.loads(h.read_text())
        summaries[stage] = ctx.manifests.get(stage, {}).get("summary", {})
    results = {
        "run": ctx.run_dir.name, "command": ctx.command,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "data": {"name": info.name, "num_classes": info.num_classes, "input_shape": list(info.input_shape),
                 "class_names": list(info.class_names), "train_size": int(len(ctx.bundle.y_train)),
                 "val_size": int(len(ctx.bundle.y_val)), "test_size": int(len(ctx.bundle.y_test))},
        "teacher": bench["teacher"],
        "distillation": _distillation_summary(r),
        "stages": r.stages.enabled(),
        "stage_summaries": summaries,
        "bundle": ({"path": os.path.relpath(ctx.stage_dir("bundle"), ctx.run_dir), **summaries.get("bundle", {})}
                   if "bundle" in r.stages.enabled() else None),
        "runtime": bench["runtime"],
        "models": bench["models"],
        "history": histories,
    }
    report.write_report(out, results)
    return {"published": list(PUBLISHED)}


def _distillation_summary(r: Recipe):
    if not r.distils("distill"):
        return None
    dist = r.distillation
    d = {"mode": dist.mode, "hard_weight": dist.hard_weight}
    if dist.extra_teachers:
        d.update(teachers=1 + len(dist.extra_teachers), combine=dist.combine)
    if dist.mode == "mean_teacher":
        d["ema_decay"] = dist.ema_decay
    if dist.mode == "mutual":
        d["peers"] = ", ".join(p["arch"] for p in r.peer_specs())
    for t in r.distillation.terms:
        d.update({(k if k != "weight" else f"{t['name']}_weight"): v for k, v in t.items() if k != "name"})
        d["loss"] = "+".join(x["name"] for x in r.distillation.terms)
    d["epochs"] = r.stages.distill.epochs
    return d


def _layer_of(tensor_name: str) -> str:
    """Returns the Keras layer a TFLite weight tensor belongs to ("cnn/quant_logits/MatMul;..." -> "logits")."""
    parts = tensor_name.split(";")[0].split("/")
    layer = parts[1] if len(parts) > 2 else parts[0]
    for prefix in ("quant_", "prune_low_magnitude_", "cluster_"):
        layer = layer[len(prefix):] if layer.startswith(prefix) else layer
    return layer


def _keras_sparsity(model) -> float:
    zeros = total = 0
    for layer in model.layers:
        kernel = getattr(layer, "kernel", None) if not hasattr(layer, "depthwise_kernel") else layer.depthwise_kernel
        if kernel is not None:
            k = kernel.numpy()
            zeros += int(np.sum(k == 0))
            total += k.size
    return zeros / total if total else 0.0


STAGES = {
    "teacher": Stage("teacher", _run_teacher, lambda r: f"train teacher '{r.teacher.arch}' ({r.teacher.epochs} epochs)",
                     "teacher.keras"),
    "distill": Stage("distill", _run_distill,
                     lambda r: (f"distil student '{r.student.arch}' ({r.stages.distill.epochs} epochs)" if r.distils("distill")
                                else f"train student '{r.student.arch}' without a teacher ({r.stages.distill.epochs} epochs)"),
                     "student.keras"),
    "baseline": Stage("baseline", _run_baseline,
                      lambda r: f"train the same student without a teacher ({_baseline_epochs(r)} epochs, same seed)",
                      "baseline.keras"),
    "prune": Stage("prune", _run_prune,
                   lambda r: (f"prune to {r.stages.prune.target_sparsity:.0%}"
                              f"{' 2:4' if r.stages.prune.structured_2_4 else ''}"
                              f"{' while distilling' if r.distils('prune') else ''} ({r.stages.prune.epochs} epochs)"),
                   "pruned.keras"),
    "cluster": Stage("cluster", _run_cluster,
                     lambda r: (f"cluster to {r.stages.cluster.clusters} weights per layer"
                                f"{' while distilling' if r.distils('cluster') else ''} ({r.stages.cluster.epochs} epochs)"),
                     "clustered.keras"),
    "qat": Stage("qat", _run_qat,
                 lambda r: (f"quantization-aware training{' while distilling' if r.distils('qat') else ''} "
                            f"({r.stages.qat.epochs} epochs)"),
                 "qat.keras"),
    "export": Stage("export", _run_export, lambda r: "export TFLite models"),
    "benchmark": Stage("benchmark", _run_benchmark,
                       lambda r: f"benchmark with LiteRT at {', '.join(map(str, r.stages.benchmark.threads))} thread(s)"),
    "bundle": Stage("bundle", _run_bundle, lambda r: "write the deployable bundle"),
    "report": Stage("report", _run_report, lambda r: "write report"),
}


# -- the runner ------------------------------------------------------------------------------------------
def read_manifest(path: Path) -> dict | None:
    """Returns the stage manifest at ``path``, or None where there is none or it is unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def is_finished(folder: Path, manifest_path: Path, expected_fingerprint: str) -> dict | None:
    """Returns the manifest if the stage in ``folder`` finished with ``expected_fingerprint`` and its files are intact."""
    m = read_manifest(manifest_path)
    if not m or m.get("fingerprint") != expected_fingerprint:
        return None
    for rel, digest in m.get("files", {}).items():
        f = folder / rel
        if not f.is_file() or sha256_file(f) != digest:
            return None
    return m


def _clean_partials(run_dir: Path):
    # Working folders of stages killed with -9 never finished; they are never mistaken for results.
    for p in run_dir.glob(".*.partial-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if not (pid.isdigit() and _alive(int(pid))) or int(pid) == os.getpid():
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def run_stages(ctx: Context, stream=None) -> list[dict]:
    """Runs (or skips, when finished and unchanged) every enabled stage; returns one record per stage."""
    stream = stream or sys.stdout
    names = ctx.recipe.stages.enabled()
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    _clean_partials(ctx.run_dir)
    records = []
    for i, name in enumerate(names, 1):
        stage = STAGES[name]
        fp = stage.fingerprint(ctx)
        folder = ctx.stage_dir(name)
        manifest = is_finished(folder, ctx.manifest_path(name), fp)
        label = f"[{i}/{len(names)}] {name}"
        if manifest is not None:
            print(f"{label}: finished earlier with the same settings and inputs, skipped", file=stream, flush=True)
            ctx.manifests[name] = manifest
            records.append({"stage": name, "skipped": True})
            continue
        print(f"{label}: {stage.title(ctx.recipe)} ...", file=stream, flush=True)
        work = ctx.run_dir / f".{folder.name}.partial-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        start = time.perf_counter()
        try:
            summary = stage.run(ctx, work)
        except KeyboardInterrupt:
            shutil.rmtree(work, ignore_errors=True)
            raise Interrupted(name) from None
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        seconds = time.perf_counter() - start
        files = {str(p.relative_to(work)): sha256_file(p) for p in sorted(work.rglob("*")) if p.is_file()}
        manifest = {"stage": name, "fingerprint": fp, "seconds": round(seconds, 2), "summary": summary,
                    "files": files, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        _swap_into_place(work, folder)
        # Written last: a kill before this leaves no manifest, or an older one whose hashes no longer match.
        write_json(ctx.manifest_path(name), manifest)
        ctx.manifests[name] = manifest
        records.append({"stage": name, "skipped": False, "seconds": seconds})
        print(f"{label}: done in {seconds:.1f} s", file=stream, flush=True)
    _publish_report(ctx)
    return records


def _swap_into_place(work: Path, folder: Path):
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    if folder.exists():
        os.replace(folder, old)
    os.replace(work, folder)
    shutil.rmtree(old, ignore_errors=True)


def _publish_report(ctx: Context):
    """Copies the report stage's files to the run folder's top level, where a user looks for them."""
    from edge_kd.fileio import write_bytes

    src = ctx.stage_dir("report")
    for name in PUBLISHED:
        f = src / name
        dst = ctx.run_dir / name
        if f.is_file() and (not dst.is_file() or dst.read_bytes() != f.read_bytes()):
            write_bytes(dst, f.read_bytes())
