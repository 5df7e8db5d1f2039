"""The parts of a stage's fingerprint that several stages share, each rule of "what a result depends on" once.

A stage's own ``key`` combines them; the runner adds its settings, its inputs and its code
(``pipelines.runner.stage_fingerprint``).
"""
from __future__ import annotations

from pathlib import Path

from edge_kd.errors import UserError
from edge_kd.fileio import sha256_file
from pipelines import run_data


def data_key(ctx) -> dict:
    """Returns the data's settings and the digest of what they read (the file, folder or dataset)."""
    r = ctx.recipe
    return {"seed": r.seed, "data": r.data.model_dump(), "data_digest": run_data.load(ctx).source_digest}


def training_key(ctx) -> dict:
    """Returns what a trained student depends on: the data, the training settings and the student."""
    r = ctx.recipe
    weights = None if r.student.weights is None else file_key(ctx, r.student.weights, "student.weights")
    path = None if r.student.path is None else file_key(ctx, r.student.path, "student.path")
    training = {**r.training.model_dump(exclude={"worker_timeout"}), "mixed_precision": precision(ctx)}
    return {**data_key(ctx), "training": training, **replicas_key(ctx),
            "student": r.student.model_dump(), "student_weights": weights, **({"student_file": path} if path else {})}


def precision(ctx):
    """Returns ``training.mixed_precision`` as given, but ``true`` with the type it takes on this host: a run
    folder (or a worker of a job) where ``true`` means another type trains its stages anew."""
    setting = ctx.recipe.training.mixed_precision
    if setting is not True:
        return setting
    return f"true: {mixed_policy(ctx) or 'float32'}"


def mixed_policy(ctx) -> str | None:
    """Returns the Keras policy ``training.mixed_precision`` asks for on this host (None: float32); says once per
    run what ``true`` chose and why."""
    if ctx.loaded.mixed is None:
        from edge_kd import mixed
        from edge_kd.keras import tf

        setting = ctx.recipe.training.mixed_precision
        policy, why = mixed.mixed_policy(setting, gpu=bool(setting is True and tf.config.list_physical_devices("GPU")))
        if setting is True:
            print(f"  mixed_precision: true: {policy or 'float32'} ({why})", flush=True)
        ctx.loaded.mixed = policy or "float32"
    return None if ctx.loaded.mixed == "float32" else ctx.loaded.mixed


def replicas_key(ctx) -> dict:
    """Returns, for a multi-worker job, its replicas (each replica takes its share of every batch, draws its own
    augmentation and keeps its own batch statistics, so their count shapes the result: a job restarted on another
    number of workers trains its stages again); else nothing."""
    if ctx.recipe.training.strategy != "multi_worker":
        return {}
    return {"replicas": ctx.cluster.replicas}


def distillation_key(ctx) -> dict:
    """Returns what distilling depends on: the loss, the teacher and the extra teachers' files (the code of the
    loss's terms is the runner's: ``pipelines.runner.stage_modules``)."""
    r = ctx.recipe
    return {"distillation": r.distillation.model_dump(), "teacher": teacher_key(ctx),
            "extra_teachers": [file_key(ctx, t.path) for t in r.distillation.extra_teachers]}


def teacher_key(ctx):
    """Returns what identifies the teacher: the teacher stage's result, or the user's file and how it is read (with
    ``flip_average`` only when on, so that the keys of runs without it stay what they were)."""
    t = ctx.recipe.teacher
    if t is None:
        return None
    read = {"flip_average": True} if t.flip_average else {}
    if t.path is None:
        return {"trained": ctx.manifests.get("teacher", {}).get("fingerprint"), **read}
    return {"file_sha256": file_key(ctx, t.path), "input_range": t.input_range, "trust": t.trust, **read}


def file_key(ctx, path, what: str = "teacher file") -> str:
    """Returns the sha256 of a user's file (hashed once per run); ``what`` names it in the error of a missing one."""
    path = str(path)
    if path not in ctx.loaded.file_keys:
        if not Path(path).is_file():
            raise UserError(f"{what} not found: {path}")
        ctx.loaded.file_keys[path] = sha256_file(path)
    return ctx.loaded.file_keys[path]
