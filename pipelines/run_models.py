"""The run's models: the student built fresh or loaded from a stage, the teachers (the teacher stage's or a
user's file, adapted to the student's input and frozen) and the mutual-learning peers."""
from __future__ import annotations

from pathlib import Path

from edge_kd.errors import UserError
from pipelines import run_data


def build_student(ctx):
    """Returns a fresh student, its weights drawn from the recipe's seed."""
    import models
    from edge_kd.keras import keras

    keras.utils.set_random_seed(ctx.recipe.seed)
    info, spec = run_data.load(ctx).info, ctx.recipe.student
    if spec.path is not None:
        return load_student_file(spec.path, info.input_shape, info.num_classes)
    model = models.build(spec.arch, info.input_shape, info.num_classes, **spec.options)
    if spec.weights is not None:
        models.load_weights(model, spec.weights, "student.weights")
    return model


def load_student(ctx, stage: str):
    """Returns the student model saved by ``stage``, loaded anew (a stage that trains gets its own copy)."""
    return ctx.stages[stage].load(ctx)


def saved_student(ctx, stage: str):
    """Returns the student model saved by ``stage``, loaded once per run for the stages that only read it (export,
    benchmark): loading a quantization-aware model rebuilds it through tfmot, seconds each time. Never train it."""
    key = (stage, ctx.manifests.get(stage, {}).get("fingerprint"))
    if key not in ctx.loaded.students:
        ctx.loaded.students[key] = load_student(ctx, stage)
    return ctx.loaded.students[key]


def build_teacher(ctx, input_shape=None):
    """Returns a fresh teacher of the recipe's architecture (what the teacher stage trains), for the data's input
    shape or ``input_shape``; with ``teacher.finetune`` its head (``logits``) is new and zero."""
    import models
    from edge_kd.keras import keras

    t, info = ctx.recipe.teacher, run_data.load(ctx).info
    keras.utils.set_random_seed(ctx.recipe.seed)
    model = models.build(t.architecture(), input_shape or info.input_shape, info.num_classes, **t.options)
    if t.weights is not None:
        models.load_weights(model, t.weights, "teacher.weights", skip=("logits",) if t.finetune else ())
    if t.finetune:
        from edge_kd import bit

        bit.zero_head(model)
    return model


def bit_rule(ctx):
    """Returns the BiT-HyperRule of this run's data (``teacher.finetune: bit``)."""
    from edge_kd import bit

    t, data = ctx.recipe.teacher, run_data.load(ctx)
    return bit.rule(data.count("train"), data.info.source_size, ctx.recipe.training.batch_size, t.bit_scale,
                    t.bit_resolution, seen_at=data.info.input_shape[:2])


def teacher(ctx, compute: str | None = None):
    """Returns the frozen teacher taking the student's input and giving logits (loaded once per strategy).

    ``compute`` (a Keras policy such as ``"mixed_bfloat16"``) gives a copy of it whose layers compute under that
    policy, its outputs in float32, for training only: what is exported and measured is the file's teacher.
    """
    key = (_strategy_key(), compute)
    if key not in ctx.loaded.teachers and compute is not None:  # the float32 teacher's, its head found in float32
        ctx.loaded.teachers[key] = _computing_in(ctx, teacher(ctx), compute, "teacher")
    if key not in ctx.loaded.teachers:
        from edge_kd import builtin_teachers, train

        t = ctx.recipe.teacher
        # float32 even inside a mixed-precision stage: the adapter's log-probabilities need its range
        with train.precision("float32"):
            model = loaded_teacher(teacher_file(ctx), t.trust)
            ctx.loaded.teachers[key], adapted = adapt(ctx, model, t.input_range, t.path, t.flip_average)
        shipped = None if t.path is None else builtin_teachers.name_of(t.path)
        by = "edge-kd" if t.path is None else f"edge-kd, shipped ({shipped})" if shipped else "user"
        # a trained teacher's file is named within the run folder (the run's results may be shared: runner)
        where = str(teacher_file(ctx).relative_to(ctx.run_dir)) if t.path is None else str(teacher_file(ctx))
        ctx.teacher_info = {**adapted, "trained_by": by, "file": where}
    return ctx.loaded.teachers[key]


def extra_teachers(ctx, compute: str | None = None) -> list:
    """Returns ``distillation.extra_teachers``, each loaded, adapted and frozen (``compute``: as ``teacher``'s)."""
    key = (_strategy_key(), compute)
    if key not in ctx.loaded.extra_teachers and compute is not None:
        ctx.loaded.extra_teachers[key] = [_computing_in(ctx, m, compute, t.path) for m, t in zip(
            extra_teachers(ctx), ctx.recipe.distillation.extra_teachers)]
    if key not in ctx.loaded.extra_teachers:
        from edge_kd import train

        with train.precision("float32"):  # as teacher()
            ctx.loaded.extra_teachers[key] = [adapt(ctx, loaded_teacher(t.path, t.trust), t.input_range, t.path)[0]
                                              for t in ctx.recipe.distillation.extra_teachers]
    return ctx.loaded.extra_teachers[key]


def teachers(ctx, compute: str | None = None) -> list:
    """Returns the teacher and the extra teachers (what a stage in mode teacher distils from)."""
    return [teacher(ctx, compute), *extra_teachers(ctx, compute)]


def _computing_in(ctx, adapted, compute: str, name: str):
    """Returns the adapted teacher ``adapted``'s copy computing under ``compute`` (``edge_kd.train.computing_in``:
    the same weights, float32 outputs), frozen; ``adapted`` itself, with a line saying why, where no such copy can
    be made or run (a subclassed model; a layer without a kernel in that type)."""
    import numpy as np

    from edge_kd import train
    from edge_kd.keras import tf

    try:
        copy = train.computing_in(adapted, compute)
        copy(np.zeros((1, *run_data.load(ctx).info.input_shape), np.float32), training=False)
    except (NotImplementedError, TypeError, ValueError, KeyError, AttributeError, tf.errors.OpError) as e:
        print(f"  {name}: computes in float32 (no {compute} copy: {type(e).__name__}: "
              f"{(str(e).splitlines() or [''])[0][:200]})", flush=True)
        return adapted
    copy.trainable = False
    return copy


def _strategy_key() -> int:
    from edge_kd.keras import tf

    return id(tf.distribute.get_strategy())


def adapt(ctx, model, input_range, source=None, flip_average: bool = False):
    """Returns ``adapt_teacher`` of ``model`` for this run's data: (frozen logits model, description).

    ``source`` (the teacher's file) prefixes its errors, such as outputs that are not finite; ``flip_average``: the
    logits averaged with the mirror image's (``teacher.flip_average``).
    """
    from edge_kd.distill.teacher import adapt_teacher

    data = run_data.load(ctx)
    info = data.info
    scale = offset = None
    if input_range is not None:
        lo, hi = input_range
        scale, offset = (hi - lo) / 255.0, float(lo)
    if data.count("train"):
        sample = data.first("train", 8)[0]
    else:  # a run without training images (before its synthesize stage): what its outputs look like on noise
        import numpy as np

        sample = data.normalise(np.random.default_rng(0).integers(0, 256, (8, *info.input_shape), dtype=np.uint8))
    try:
        return adapt_teacher(model, info.input_shape, info.num_classes, info.input_scale, info.input_offset,
                             teacher_scale=scale, teacher_offset=offset, sample=sample, flip_average=flip_average)
    except UserError as e:
        if source is None:
            raise
        raise UserError(f"{Path(source).name}: {e}") from None


def teacher_file(ctx) -> Path:
    """Returns the teacher's file: the teacher stage's, or the user's."""
    t = ctx.recipe.teacher
    return ctx.stage_dir("teacher") / "teacher.keras" if t.path is None else Path(t.path).resolve()


def qat_config(ctx):
    """Returns the QAT settings: sparsity-preserving after pruning, cluster-preserving after clustering."""
    from edge_kd.tfmot.config import QATConfig

    enabled = ctx.enabled()
    return QATConfig(preserve_sparsity="prune" in enabled, preserve_clusters="cluster" in enabled,
                     unsupported=ctx.recipe.stages.qat.unsupported)


def build_peers(ctx) -> list:
    """Returns fresh mutual-learning peers, each drawn from its own seed (recipe seed + its number)."""
    import models
    from edge_kd.keras import keras

    info, peers = run_data.load(ctx).info, []
    for i, p in enumerate(ctx.recipe.peer_specs(), start=1):
        keras.utils.set_random_seed(ctx.recipe.seed + i)
        peers.append(models.build(p["arch"], info.input_shape, info.num_classes, **p["options"]))
    return peers


def load_peers(ctx) -> list:
    """Returns the peers the distill stage trained beside the exported student."""
    from edge_kd.keras import keras

    return [keras.models.load_model(ctx.stage_dir("distill") / "peers" / f"peer_{i}.keras", compile=False)
            for i in range(len(ctx.recipe.distillation.peers))]


def load_student_file(path, input_shape, num_classes):
    """Returns the student saved at ``path`` (.keras or .h5; a Keras 3 file rebuilt as its tf_keras twin), freshly
    loaded, giving logits (a softmax head is cut off: the Distiller and the exported files work on logits); a file
    of another input shape or class count is a one-line UserError."""
    from edge_kd import keras3
    from edge_kd.distill.teacher import logits_model

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
    from edge_kd.distill.teacher import load_teacher
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
