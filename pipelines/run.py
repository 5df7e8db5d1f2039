"""One compression run: teacher → distil → baseline → export → benchmark → report.

The run is built in a hidden working folder beside ``<out>/<run>/`` and moved into place only when
every step succeeded, so a failed or interrupted run leaves the previous results untouched and
nothing half-written under the run's name.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from edge_kd.errors import UserError

STUDENT_VARIANTS = ("fp32", "fp16", "dynamic", "int8")


class Progress:
    """Prints one line per step with its elapsed time; Keras' progress bar shows the epochs."""

    def __init__(self, total: int, stream=None):
        self.total, self.done, self.stream = total, 0, stream or sys.stdout

    @contextlib.contextmanager
    def step(self, title: str):
        self.done += 1
        print(f"[{self.done}/{self.total}] {title} ...", file=self.stream, flush=True)
        start = time.perf_counter()
        yield
        print(f"[{self.done}/{self.total}] {title}: done in {time.perf_counter() - start:.1f} s",
              file=self.stream, flush=True)


def keras_verbosity() -> int:
    """Returns 1 (live progress bar) on a terminal, 2 (one line per epoch) in logs."""
    return 1 if sys.stdout.isatty() else 2


def prepare(cfg):
    """Returns ``(bundle, teacher_model_or_None, teacher_info)`` after checking every user input.

    Everything a user can get wrong (data, student name, teacher file and its fit to the data) is
    checked here, before any training, so a mistake costs seconds and writes nothing.
    """
    import models
    from edge_kd import data as data_mod

    if cfg.student not in models.available():
        raise UserError(f"unknown student '{cfg.student}'; available: {', '.join(models.available())}")
    if cfg.teacher is None and cfg.teacher_arch not in models.available():
        raise UserError(f"unknown teacher architecture '{cfg.teacher_arch}'; available: {', '.join(models.available())}")
    teacher = None
    if cfg.teacher is not None:
        from edge_kd.distill import load_teacher

        teacher = load_teacher(cfg.teacher, trust=cfg.trust_teacher)
    bundle = data_mod.load(cfg.data, val_fraction=cfg.val_fraction, seed=cfg.seed, limit_train=cfg.limit_train,
                           limit_test=cfg.limit_test, image_size=cfg.image_size)
    _build_student(cfg, bundle.info)  # an option the architecture lacks fails now, not after training
    info = {}
    if teacher is not None:
        teacher, info = _adapt(teacher, bundle, cfg)
    return bundle, teacher, info


def _adapt(teacher, bundle, cfg):
    from edge_kd.distill import adapt_teacher

    scale = offset = None
    if cfg.teacher_input_range is not None:
        lo, hi = cfg.teacher_input_range
        scale, offset = (hi - lo) / 255.0, lo
    sample = bundle.arrays("val")[0][:32]
    return adapt_teacher(teacher, bundle.info.input_shape, bundle.info.num_classes, bundle.info.input_scale,
                         bundle.info.input_offset, teacher_scale=scale, teacher_offset=offset, sample=sample)


def _optimizer(cfg, steps):
    from edge_kd.keras import keras

    return keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(cfg.learning_rate, max(1, steps)))


def _save_keras(model, path: Path):
    from edge_kd.fileio import atomic_path

    with atomic_path(path) as tmp:
        model.save(tmp)


def _fit(cfg, bundle, model, epochs):
    """Trains ``model`` (a Distiller) for ``epochs`` with validation; returns the Keras history dict."""
    train = bundle.dataset("train", cfg.batch_size, shuffle=True, seed=cfg.seed)
    val = bundle.dataset("val", 512)
    model.compile(optimizer=_optimizer(cfg, epochs * len(train)))
    history = model.fit(train, validation_data=val, epochs=epochs, verbose=keras_verbosity())
    return {k: [float(v) for v in vs] for k, vs in history.history.items()}


def run(cfg, command: str = "python -m pipelines.compress") -> Path:
    """Runs every step for ``cfg``; returns the finished run folder."""
    cfg.validate()
    progress = Progress(total=6 if cfg.teacher is None else 5)
    bundle, teacher, teacher_info = prepare(cfg)
    out = Path(cfg.out)
    final = out / cfg.resolved_run_name()
    work = out / f".{final.name}.partial-{os.getpid()}"
    _clean_stale_partials(out, final.name)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    try:
        results = _run_steps(cfg, bundle, teacher, teacher_info, work, progress, command, final.name)
        _replace_dir(work, final)
        print(f"report: {final / 'report.md'}  (results: {final / 'results.json'})", flush=True)
        _print_summary(results)
        return final
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


def _clean_stale_partials(out: Path, name: str):
    # Working folders of runs killed with -9 never finished; they are never mistaken for results.
    if out.is_dir():
        for p in out.glob(f".{name}.partial-*"):
            pid = p.name.rsplit("-", 1)[-1]
            if not (pid.isdigit() and _alive(int(pid))):
                shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def _replace_dir(src: Path, dst: Path):
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


def _run_steps(cfg, bundle, teacher, teacher_info, work: Path, progress: Progress, command: str, run_name: str) -> dict:
    import models
    from edge_kd.bench import litert, stats
    from edge_kd.distill import Distiller, hinton
    from edge_kd.export import tflite
    from edge_kd.fileio import write_bytes, write_json
    from edge_kd.keras import keras
    from edge_kd.report import report

    info = bundle.info
    write_json(work / "config.json", {"command": command, **cfg.to_dict()})
    histories = {}

    if teacher is None:
        with progress.step(f"train teacher '{cfg.teacher_arch}' ({cfg.teacher_epochs} epochs)"):
            keras.utils.set_random_seed(cfg.seed)
            teacher = models.build(cfg.teacher_arch, info.input_shape, info.num_classes)
            histories["teacher"] = _fit(cfg, bundle, Distiller(teacher), cfg.teacher_epochs)
            _save_keras(teacher, work / "teacher.keras")
            teacher_path = "teacher.keras"
        teacher_info = {"head": "logits", "trained_by": "edge-kd", "arch": cfg.teacher_arch}
    else:
        teacher_path = str(Path(cfg.teacher).resolve())
        teacher_info = {**teacher_info, "trained_by": "user", "file": teacher_path}
    teacher.trainable = False

    with progress.step(f"distil student '{cfg.student}' (T={cfg.temperature:g}, alpha={cfg.alpha:g}, {cfg.epochs} epochs)"):
        keras.utils.set_random_seed(cfg.seed)
        student = _build_student(cfg, info)
        histories["student"] = _fit(cfg, bundle, hinton(student, teacher, cfg.alpha, cfg.temperature), cfg.epochs)
        _save_keras(student, work / "student.keras")

    with progress.step(f"train the same student without a teacher ({cfg.epochs} epochs, same seed)"):
        keras.utils.set_random_seed(cfg.seed)  # the same initial weights as the distilled student
        baseline = _build_student(cfg, info)
        histories["baseline"] = _fit(cfg, bundle, Distiller(baseline), cfg.epochs)
        _save_keras(baseline, work / "baseline.keras")

    x_train, _ = bundle.arrays("train")
    rep_idx = np.random.default_rng(cfg.seed).permutation(len(x_train))[: cfg.representative_samples]
    representative = x_train[rep_idx]
    exported = []
    with progress.step(f"export TFLite: teacher fp32, student {', '.join(STUDENT_VARIANTS)}"):
        for role, model, variants in (("teacher", teacher, ("fp32",)), ("student", student, STUDENT_VARIANTS)):
            for variant in variants:
                rel = f"tflite/{role}-{variant}.tflite"
                flat = tflite.convert(model, variant, representative=representative if variant == "int8" else None,
                                      int8_io=cfg.int8_io)
                write_bytes(work / rel, flat)
                exported.append((role, model, variant, rel))

    x_test, y_test = bundle.arrays("test")
    models_out = []
    with progress.step(f"benchmark with LiteRT: accuracy on {len(y_test)} test images, latency at "
                       f"{', '.join(map(str, cfg.threads))} thread(s)"):
        keras_rows = (("teacher", "teacher", teacher, teacher_path),
                      ("student", "student", student, "student.keras"),
                      ("baseline", "baseline", baseline, "baseline.keras"))
        for name, role, model, rel in keras_rows:
            acc = _keras_accuracy(model, x_test, y_test)
            file = Path(rel) if Path(rel).is_absolute() else work / rel
            size, gz = stats.file_sizes(file)
            models_out.append(_row(name, role, "keras", "fp32", rel, acc, size, gz, model, info, None, stats))
        sample = x_test[0]
        for role, model, variant, rel in exported:
            acc = litert.accuracy(work / rel, x_test, y_test)
            lat = {str(t): litert.latency(work / rel, sample, num_threads=t) for t in cfg.threads}
            size, gz = stats.file_sizes(work / rel)
            models_out.append(_row(f"{role}-{variant}", role, "tflite", variant, rel, acc, size, gz, model, info, lat, stats))
        teacher_acc = models_out[0]["accuracy"]
        for m in models_out:
            m["gap_to_teacher"] = teacher_acc - m["accuracy"]

    with progress.step("write report"):
        results = {
            "run": run_name,
            "command": command,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "data": {"name": info.name, "num_classes": info.num_classes, "input_shape": list(info.input_shape),
                     "class_names": list(info.class_names), "train_size": int(len(bundle.y_train)),
                     "val_size": int(len(bundle.y_val)), "test_size": int(len(y_test))},
            "teacher": teacher_info,
            "distillation": {"loss": "hinton", "temperature": cfg.temperature, "alpha": cfg.alpha, "epochs": cfg.epochs},
            "runtime": litert.runtime_info(),
            "models": models_out,
            "history": histories,
        }
        report.write_report(work, results)
    return results


def _build_student(cfg, info):
    import inspect

    import models

    has_width = "width" in inspect.signature(models._REGISTRY[cfg.student]).parameters
    # A width the architecture cannot take is passed on, so models.build names the error.
    kw = {"width": cfg.student_width} if has_width or cfg.student_width != 1.0 else {}
    return models.build(cfg.student, info.input_shape, info.num_classes, **kw)


def _keras_accuracy(model, x, y) -> float:
    logits = model.predict(x, batch_size=512, verbose=0)
    return float(np.mean(np.argmax(logits, -1) == y))


def _row(name, role, fmt, variant, rel, acc, size, gz, model, info, latency, stats) -> dict:
    return {"name": name, "role": role, "format": fmt, "variant": variant, "path": rel, "accuracy": acc,
            "size_bytes": int(size), "gzip_bytes": int(gz), "params": stats.count_params(model),
            "macs": stats.count_macs(model), "input_scale": float(info.input_scale),
            "input_offset": float(info.input_offset), "latency": latency}


def _print_summary(results):
    from edge_kd.report.report import markdown_table

    print(markdown_table(results), flush=True)
