"""Helpers the stage modules share."""
from __future__ import annotations

import contextlib
from pathlib import Path

from pipelines import run_models, run_training


def save_model(model, path: Path, scope=None) -> None:
    """Saves Keras ``model`` to ``path`` atomically (inside ``scope()`` when given, e.g. QAT's custom objects).

    A model trained under mixed precision is saved as its float32 copy: the next stages and the export
    read float32 models.
    """
    from edge_kd.fileio import atomic_path
    from edge_kd.train import float32_copy

    with atomic_path(path) as tmp, (scope() if scope else contextlib.nullcontext()):
        float32_copy(model).save(tmp)


def save_student(model, path: Path, folder: str) -> dict:
    """Saves float student ``model`` to ``path`` (tf_keras) and beside it as a Keras 3 file (``<stem>_keras3.keras``,
    which plain ``keras.saving.load_model`` opens, its outputs checked equal); returns the stage summary's entry:
    {"keras3_file": its path in the run folder, whose folder ``folder`` is the stage's} or, for a model Keras 3
    cannot hold (or when making the copy fails: the tf_keras file, the stage's result, is kept either way),
    {"keras3_file": None, "keras3_reason": why}."""
    from edge_kd import keras3
    from edge_kd.errors import UserError, first_line
    from edge_kd.train import float32_copy

    model = float32_copy(model)  # once, for both files
    save_model(model, path)
    k3_path = path.with_name(f"{path.stem}_keras3.keras")
    try:
        keras3.save_keras3(model, k3_path, f"Keras 3 copy of {path.name}")
    except UserError as e:
        return {"keras3_file": None, "keras3_reason": str(e)}
    except Exception as e:  # a Keras 3 failure must not cost the stage its trained student
        return {"keras3_file": None, "keras3_reason": keras3.short(f"making it failed: {type(e).__name__}: "
                                                                   f"{first_line(e)}")}
    return {"keras3_file": f"{folder}/{k3_path.name}"}


def keras_sparsity(model) -> float:
    """Returns the share of exact zeros in the kernels of ``model``'s conv, depthwise and dense layers."""
    import numpy as np

    zeros = total = 0
    for layer in model.layers:
        kernel = getattr(layer, "kernel", None) if not hasattr(layer, "depthwise_kernel") else layer.depthwise_kernel
        if kernel is not None:
            k = kernel.numpy()
            zeros += int(np.sum(k == 0))
            total += k.size
    return zeros / total if total else 0.0


def refine(stage, ctx, out: Path, wrap, strip, callbacks=()) -> dict:
    """Wraps the previous stage's student, trains it in the Distiller for ``stage``, strips and saves it."""
    from edge_kd.fileio import write_json

    spec = ctx.settings(stage.name)
    wrapped = wrap(run_models.load_student(ctx, ctx.previous_student(stage.name)))
    history = run_training.fit(ctx, run_training.distiller(ctx, wrapped, stage.name), spec.epochs, spec.learning_rate,
                               callbacks=callbacks)
    stripped = strip(wrapped)
    saved = save_student(stripped, out / stage.model_file, ctx.stage_dir(stage.name).name)
    write_json(out / "history.json", history)
    return {"val_accuracy": history["val_accuracy"][-1], "keras_sparsity": keras_sparsity(stripped), **saved}


def check_distiller(ctx, student, stage: str) -> None:
    """Builds the Distiller ``stage`` trains ``student`` in, from fresh models: every layer a term reads must exist.

    The teachers are the user's (loaded and adapted) or, where a stage of this run trains the teacher,
    a fresh one of its architecture: the same layers, before any training.
    """
    from edge_kd.distill import taps
    from edge_kd.errors import UserError

    r = ctx.recipe
    teachers = None
    if r.distillation.mode == "teacher" and r.teacher is not None:
        first = (run_models.adapt(ctx, run_models.build_teacher(ctx), r.teacher.input_range,
                                  flip_average=r.teacher.flip_average)[0]
                 if r.teacher.path is None else run_models.teacher(ctx))
        teachers = [first, *run_models.extra_teachers(ctx)]
    for i, term in enumerate(r.distillation.build_terms()):
        for side, model, names in (("student", student, term.student_taps()),
                                   ("teacher", teachers[0] if teachers else None, term.teacher_taps())):
            for layer in names if model is not None else ():
                try:
                    taps.find_layer(model, layer)
                except UserError as e:
                    raise UserError(f"distillation.terms.{i} ({term.name}) reads {side} layer '{layer}': {e}") from None
    peers = run_models.build_peers(ctx) if r.distillation.mode == "mutual" else None
    run_training.distiller(ctx, student, stage, peers=peers, teachers=teachers)  # builds every term on a batch of two
