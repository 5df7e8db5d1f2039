"""How the stages train: the tf.distribute strategy and precision, the Distiller of a stage, and the fit.

Every stage that trains builds its Distiller here (``distiller``), so a stage's augmentation, label
smoothing, loss terms and teachers follow the recipe in one way; ``fit`` trains it on the run's data,
saving and resuming each epoch inside a stage of the runner.
"""
from __future__ import annotations

import contextlib
import hashlib

import numpy as np

from edge_kd.errors import UserError
from pipelines import run_data, run_keys, run_models


def strategy(ctx):
    """Returns the tf.distribute strategy of ``training.strategy`` (built once), or None for one device.

    A multi-worker job's strategy is the process's, made when the run began (``ctx.cluster``,
    ``pipelines.multiworker``).
    """
    if ctx.recipe.training.strategy == "none":
        return None
    if ctx.recipe.training.strategy == "multi_worker":  # (a Context of such a recipe holds its job)
        return ctx.cluster.strategy
    if ctx.loaded.strategy is None:
        from edge_kd.keras import tf

        # every GPU of this host (the CPU when there is none)
        ctx.loaded.strategy = tf.distribute.MirroredStrategy()
    return ctx.loaded.strategy


def scope(ctx, stage):
    """Returns the context to run ``stage`` in: for a stage that trains, the strategy's scope and, with
    ``training.mixed_precision``, its policy where the stage allows it; else nothing."""
    scopes = contextlib.ExitStack()
    if not stage.trains:
        return scopes
    s = strategy(ctx)
    if s is not None:
        # (MultiWorkerMirroredStrategy's class is named CollectiveAllReduceStrategy)
        kind = (f"MultiWorkerMirroredStrategy over {s.num_replicas_in_sync} replicas on {ctx.cluster.count} workers"
                if ctx.cluster is not None else f"{type(s).__name__} over {s.num_replicas_in_sync} replicas")
        print(f"  {stage.name}: {kind}", flush=True)
        scopes.enter_context(s.scope())
    policy = run_keys.mixed_policy(ctx)
    if policy is not None and stage.mixed_precision:
        from edge_kd import train

        print(f"  {stage.name}: mixed precision ({policy}; loss terms in float32; saved in float32)", flush=True)
        scopes.enter_context(train.precision(policy))
    return scopes


def augmenter(ctx, stage: str):
    """Returns the Augmenter of ``stage`` (its resolved ``augment``), or None where it has none on.

    Its seed comes from the recipe's seed and the stage's name, so a rerun repeats it exactly and the
    baseline (which asks for the distill stage's) sees the very views the distilled student saw.
    """
    from edge_kd.augment import Augmenter

    cfg = ctx.settings(stage).augment
    if cfg is None or not cfg.active():
        return None
    digest = hashlib.sha256(f"{ctx.recipe.seed}:{stage}".encode()).digest()
    return Augmenter(cfg, seed=int.from_bytes(digest[:4], "little"), fill_value=run_data.load(ctx).info.input_offset)


def distiller(ctx, student, stage: str, peers=None, teachers=None, distil: bool = True):
    """Returns a Distiller of ``student`` for ``stage``: with the recipe's loss terms if it distils.

    ``distil=False`` gives the same Distiller without a teacher (the baseline: the same augmentation and
    label smoothing). In mutual mode the peers are ``peers`` or, after the distill stage, the peers it
    saved; the teachers are ``teachers`` or the recipe's (trained or loaded, then adapted).
    """
    from edge_kd.distill.distiller import Distiller

    r = ctx.recipe
    options = {"augment": augmenter(ctx, stage), "label_smoothing": r.training.label_smoothing}
    if not (distil and r.distils(stage)):
        return Distiller(student, **options)
    dist = r.distillation
    common = {"terms": dist.build_terms(), "hard_weight": dist.hard_weight, "consistent": dist.consistent,
              **options}
    if dist.mode == "mean_teacher":
        return Distiller(student, ema_decay=dist.ema_decay, **common)
    if dist.mode == "mutual":
        return Distiller(student, peers=run_models.load_peers(ctx) if peers is None else peers, **common)
    if teachers is None and r.teacher is not None:
        # under bfloat16 the frozen teacher computes in it too, in every stage (its forward is most of a step)
        bfloat16 = run_keys.mixed_policy(ctx) == "mixed_bfloat16"
        teachers = run_models.teachers(ctx, compute="mixed_bfloat16" if bfloat16 else None)
    return Distiller(student, teachers, teacher_weights=dist.teacher_weights, combine=dist.combine, **common)


def teacher_cache(ctx, model) -> dict:
    """Returns the teachers' logits of the train and val images, (images, teachers, classes) each, computed once."""
    if ctx.loaded.teacher_cache is None:
        import time

        start = time.perf_counter()
        data = run_data.load(ctx)
        ctx.loaded.teacher_cache = {split: _predict(model.teacher_logits, data, split)
                                    for split in ("train", "val")}
        print(f"  teacher cache: logits of {sum(len(v) for v in ctx.loaded.teacher_cache.values())} images in "
              f"{time.perf_counter() - start:.1f} s", flush=True)
    return ctx.loaded.teacher_cache


def fit(ctx, model, epochs: int, learning_rate: float, callbacks=(), optimizer=None) -> dict:
    """Trains ``model`` (a Distiller) on the run's data; returns the history as plain lists.

    ``optimizer`` (an ``OptimizerConfig``, or what ``train.fit`` takes in its place) defaults to the recipe's
    ``training``.

    With ``distillation.teacher_cache`` and a Distiller that can use it, each batch carries the
    teachers' cached logits and no teacher runs during training. Inside a stage of the runner, the fit saves
    each epoch and resumes where a stopped run of the same stage left off (``Context.begin_stage``).
    """
    from edge_kd import train
    from edge_kd.keras import tf

    b, tr = run_data.load(ctx), ctx.recipe.training
    cache = (teacher_cache(ctx, model) if ctx.recipe.distillation.teacher_cache and model.uses_cache()
             else {"train": None, "val": None})
    # Across replicas a short last batch could leave one replica no examples (NaN batch statistics)
    replicated = model.distribute_strategy.num_replicas_in_sync > 1

    def batches(epochs, input_context=None):  # each epoch's order from the seed and its number: a resumed fit sees
        # the same; in a multi-worker job each worker takes its replicas' slices of every global batch
        return b.dataset("train", tr.batch_size, seed=ctx.recipe.seed, teacher_logits=cache["train"],
                         drop_remainder=replicated, epochs=epochs, input_context=input_context)

    try:
        return train.fit(model, batches, epochs, learning_rate,
                         validation=b.dataset("val", 512, teacher_logits=cache["val"]), callbacks=callbacks,
                         optimizer=optimizer or tr, resume=ctx.resume)
    except tf.errors.OpError as e:  # a streamed image whose header read but whose pixels do not decode
        if not b.streamed or "Decode" not in str(e) and "PIL" not in str(e):
            raise
        print("  an image failed to decode; finding which ...", flush=True)
        import re

        bad = next((f for split in ("train", "val") if (f := getattr(b, f"x_{split}").undecodable())), None)
        what = f"image {bad}" if bad else f"an image of {ctx.recipe.data.source}"
        reason = re.sub(r"\{\{[^}]*\}\}\s*", "", e.message.splitlines()[0]).strip()[:200]
        raise UserError(f"cannot decode {what} while training: {reason}") from None


def _predict(fn, data, split: str) -> np.ndarray:
    """Returns ``fn`` of ``split``'s images, computed a batch at a time in order, as one float32 array."""
    from edge_kd.keras import tf

    call = tf.function(fn)
    out = [call(tf.constant(x)).numpy() for x, _ in data.batches(split, data.chunk(most=1024))]
    if not out:  # an empty split (val_fraction 0): no rows, of the right shape
        out = [call(tf.zeros((0, *data.info.input_shape))).numpy()]
    return np.concatenate(out).astype(np.float32)
