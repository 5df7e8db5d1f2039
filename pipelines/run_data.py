"""The run's data: the recipe's ``data`` section loaded once per run (``edge_kd.data``)."""
from __future__ import annotations

import numpy as np


def load(ctx):
    """Returns the run's ``DataBundle`` (train, val and test splits), loaded on first use."""
    if ctx.loaded.data is None:
        from edge_kd import data

        ctx.loaded.data = data.load_config(ctx.recipe.data, seed=ctx.recipe.seed)
    return ctx.loaded.data


def steps_per_epoch(ctx) -> int:
    """Returns the training steps of one epoch at the recipe's batch size."""
    return int(np.ceil(load(ctx).count("train") / ctx.recipe.training.batch_size))
