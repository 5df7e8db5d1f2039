"""The run's data: the recipe's ``data`` section loaded once per run (``edge_kd.data``).

A run without training images (``data.source: synthetic``) trains on the images its synthesize stage made: its
bundle is the classes and input shape alone until that stage has finished, then those images (the teacher's class
of each its label), loaded once.
"""
from __future__ import annotations

import numpy as np


def load(ctx):
    """Returns the run's ``DataBundle`` (train, val and test splits), loaded on first use."""
    from edge_kd import data

    cfg = ctx.recipe.data
    if cfg.source == data.SYNTHETIC:
        made = synthetic_key(ctx)
        if ctx.loaded.data is None or ctx.loaded.data_made != made:
            x = y = None
            if made is not None:
                with np.load(ctx.stage_dir("synthesize") / "images.npz") as f:
                    x, y = f["x"], f["teacher"]
            ctx.loaded.data = data.synthetic_bundle(cfg, x, y, seed=ctx.recipe.seed, digest=made or "")
            ctx.loaded.data_made = made
        return ctx.loaded.data
    if ctx.loaded.data is None:
        ctx.loaded.data = data.load_config(cfg, seed=ctx.recipe.seed)
    return ctx.loaded.data


def synthetic_key(ctx) -> str | None:
    """Returns, once the synthesize stage has finished in this run, a hash of its result (fingerprint and files);
    else None."""
    m = ctx.manifests.get("synthesize")
    if m is None or "files" not in m:
        return None
    from pipelines.fingerprint import fingerprint

    return fingerprint([m["fingerprint"], m["files"]])


def steps_per_epoch(ctx) -> int:
    """Returns the training steps of one epoch at the recipe's batch size (before a run without training images has
    made them, of the share of the synthesize stage's images that is not held out)."""
    from edge_kd import data

    n = load(ctx).count("train")
    if ctx.recipe.data.source == data.SYNTHETIC and synthetic_key(ctx) is None:
        n = int(ctx.settings("synthesize").images * (1 - ctx.recipe.data.val_fraction))
    return int(np.ceil(max(n, 1) / ctx.recipe.training.batch_size))
