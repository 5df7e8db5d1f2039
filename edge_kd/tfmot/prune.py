"""Magnitude pruning of Conv2D and Dense kernels with tensorflow-model-optimization, trained in the Distiller.

``prune`` wraps the prunable layers of a Functional/Sequential model in tfmot's ``PruneLowMagnitude``
(named ``prune_low_magnitude_<name>``; the wrapped layer keeps its original name, which
``edge_kd.distill.taps.find_layer`` finds); ``callbacks()`` must go to ``fit``; ``strip`` returns the
plain model with the sparse kernels. The input model is copied, never modified.

Example (runnable; a real run distils from a teacher)::

    import numpy as np
    import models
    from edge_kd.tfmot import prune
    from edge_kd.distill import Distiller

    student = models.build("cnn", (28, 28, 1), 10)
    wrapped = prune.prune(student, prune.PruneConfig(target_sparsity=0.5, frequency=4), total_steps=8)
    print(wrapped.prune_plan.pruned)          # ('block1_conv', 'block2_conv', 'logits')
    d = Distiller(wrapped)
    d.compile(optimizer="adam")
    x, y = np.random.rand(64, 28, 28, 1).astype("float32"), np.random.randint(0, 10, 64)
    d.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=prune.callbacks())   # 8 steps
    sparse = prune.strip(wrapped)
    print((sparse.get_layer("logits").kernel.numpy() == 0).mean())                # 0.5

Steps count training batches from 1. Masks are updated at steps ``begin_step + k·frequency`` up to
``end_step``; the target is reached at the last such step, so ``end_step`` is moved down to it when
it does not fall on one (and ``frequency`` shrinks to the whole window when the window is shorter).
With ``structured_2_4`` tfmot computes a fixed 2-of-4 mask once, at step 1, and the schedule does not
apply: every group of 4 consecutive kernel weights along the input-channel axis keeps its 2 largest.
"""
from __future__ import annotations

import dataclasses

from edge_kd.tfmot import common
from edge_kd.tfmot.config import PruneConfig
from edge_kd.errors import UserError
from edge_kd.keras import keras

import tensorflow_model_optimization as tfmot  # noqa: E402  (after edge_kd.keras: resolves to tf_keras)

# tfmot's PruneRegistry gives these a "kernel" to prune; edge-kd prunes exactly these classes.
PRUNABLE = (keras.layers.Conv2D, keras.layers.Dense)


@dataclasses.dataclass(frozen=True)
class PrunePlan:
    """What ``prune`` does: layers it wraps, layers with kernels it leaves dense (with why), the effective schedule."""

    pruned: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...]
    schedule: str
    begin_step: int
    end_step: int
    frequency: int


def plan(model, cfg: PruneConfig, total_steps: int) -> PrunePlan:
    """Returns the PrunePlan of pruning ``model`` with ``cfg`` over ``total_steps`` training steps."""
    common.require_graph_model(model, "pruning")
    total_steps = common.check_int("prune total_steps", total_steps, 1)
    pruned, skipped = [], []
    for layer in common.iter_layers(model):
        reason = _skip_reason(layer, cfg)
        if reason is None:
            pruned.append(layer.name)
        elif reason:
            skipped.append((layer.name, reason))
    if cfg.structured_2_4:
        return PrunePlan(tuple(pruned), tuple(skipped), "2:4 (mask fixed at step 1)", 0, 1, 1)
    begin, end, frequency = _steps(cfg, total_steps)
    if cfg.schedule == "polynomial":
        text = f"polynomial {cfg.initial_sparsity:g} -> {cfg.target_sparsity:g}"
    else:
        text = f"constant {cfg.target_sparsity:g}"
    return PrunePlan(tuple(pruned), tuple(skipped), text, begin, end, frequency)


def check(model, cfg: PruneConfig, total_steps: int) -> PrunePlan:
    """Returns the PrunePlan, raising the UserError ``prune`` would raise (so a run can fail before it trains)."""
    common.require_graph_model(model, "pruning")
    common.refuse_wrapped(model, "pruning")
    p = plan(model, cfg, total_steps)
    if not p.pruned:
        why = "; ".join(f"{n}: {r}" for n, r in p.skipped) or "it has no Conv2D or Dense layer"
        raise UserError(f"nothing to prune in model {model.name!r} ({why})")
    return p


def prune(model, cfg: PruneConfig, total_steps: int) -> keras.Model:
    """Returns a copy of ``model`` with its prunable layers wrapped for pruning; ``.prune_plan`` says which."""
    p = check(model, cfg, total_steps)
    params = {"pruning_schedule": _schedule(cfg, p)}
    if cfg.structured_2_4:
        params["sparsity_m_by_n"] = (2, 4)
    chosen = {id(layer) for layer in common.iter_layers(model) if _skip_reason(layer, cfg) is None}

    def wrap(fresh, original):
        if id(original) in chosen:
            return tfmot.sparsity.keras.prune_low_magnitude(fresh, **params)
        return fresh

    wrapped = common.clone_with(model, wrap)
    wrapped.prune_plan = p
    return wrapped


def callbacks() -> list:
    """Returns the Keras callbacks a pruning fit needs (tfmot's UpdatePruningStep)."""
    return [tfmot.sparsity.keras.UpdatePruningStep()]


def strip(model) -> keras.Model:
    """Returns a plain copy of a pruning-wrapped ``model``: every wrapper replaced by its layer with masked weights."""
    common.require_graph_model(model, "prune.strip")
    for layer in common.iter_layers(model):
        if isinstance(layer, common.PruneLowMagnitude) and layer.built:
            # UpdatePruningStep masks the weights at each epoch's end; a fit stopped mid-epoch has not yet.
            layer.pruning_obj.weight_mask_op()
    with keras.utils.custom_object_scope(common.custom_objects(model)):
        stripped = tfmot.sparsity.keras.strip_pruning(model)
    # strip_pruning shares layers with the wrapped model; a copy owns its layers and graph.
    return common.clone_with(stripped)


def _skip_reason(layer, cfg: PruneConfig) -> str | None:
    """None: prune it; "": not a kernel layer, not worth a mention; else why a layer with a kernel stays dense."""
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        return "tfmot 0.8.1 prunes no weight of DepthwiseConv2D (its PruneRegistry lists none)"
    if type(layer) in PRUNABLE:
        if cfg.structured_2_4:
            channels = int(layer.kernel.shape[-2])
            if channels % 4:
                return f"2:4 sparsity needs input channels in multiples of 4, it has {channels}"
        return None
    if isinstance(layer, keras.Model) or not any("kernel" in w.name or "embeddings" in w.name for w in layer.weights):
        return ""
    return f"{type(layer).__name__} is not pruned (edge-kd prunes Conv2D and Dense)"


def _steps(cfg: PruneConfig, total_steps: int) -> tuple[int, int, int]:
    """Returns (begin, end, frequency) such that the last mask update, at ``end``, reaches the target."""
    begin = cfg.begin_step
    end = cfg.end_step if cfg.end_step is not None else max(begin + 1, int(total_steps * cfg.end_fraction))
    if end > total_steps:
        raise UserError(f"prune.end_step {end} is beyond the {total_steps} training steps; the target sparsity "
                        f"would never be reached")
    if begin >= end:
        raise UserError(f"prune.begin_step {begin} leaves no pruning step in {total_steps} training steps")
    window = end - begin
    if window < cfg.frequency:
        return begin, end, window
    return begin, begin + (window // cfg.frequency) * cfg.frequency, cfg.frequency


def _schedule(cfg: PruneConfig, p: PrunePlan):
    if cfg.structured_2_4:
        # Unused by tfmot with sparsity_m_by_n, but the wrapper requires one.
        return tfmot.sparsity.keras.ConstantSparsity(0.5, begin_step=0, frequency=1)
    if cfg.schedule == "polynomial":
        return tfmot.sparsity.keras.PolynomialDecay(cfg.initial_sparsity, cfg.target_sparsity, p.begin_step,
                                                    p.end_step, frequency=p.frequency)
    return tfmot.sparsity.keras.ConstantSparsity(cfg.target_sparsity, p.begin_step, p.end_step,
                                                 frequency=p.frequency)
