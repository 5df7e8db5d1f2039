"""One run of a recipe: check every input before anything trains, then run the stages into <out>/<run>/."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import yaml

from edge_kd.errors import UserError
from edge_kd.fileio import write_text
from pipelines.context import Context
from pipelines.recipe import Recipe
from pipelines.runner import run_stages


def check_out_folder(run_dir: Path, option: str = "--out") -> None:
    """Raises a UserError unless ``run_dir`` is, or can be made, a writable folder (nothing is created)."""
    run_dir = Path(run_dir)
    for p in (run_dir, *run_dir.parents):
        if p.exists():
            if not p.is_dir():
                raise UserError(f"{option}: {p} is a file, not a folder; the run folder {run_dir} cannot go under it")
            if not os.access(p, os.W_OK | os.X_OK):
                raise UserError(f"{option}: cannot write into {p} (permission denied)")
            return


def preflight(ctx: Context) -> None:
    """Makes every mistake fail now, before the first stage trains: the output folder, the data, the teachers,
    and each enabled stage's own check (layer names, what can be pruned, clustered or quantized, the bundle's pick).
    """
    check_out_folder(ctx.run_dir)
    ctx.bundle
    if ctx.recipe.teacher is not None and ctx.recipe.teacher.path is not None:
        ctx.teacher()
    ctx.extra_teachers()
    for name in ctx.enabled():
        ctx.stages[name].check(ctx)


def run(recipe: Recipe, out="tflite_out", command: str = "python -m pipelines.compress", stream=None, store=None,
        data=None, records: list | None = None) -> Path:
    """Runs ``recipe``; returns its run folder, holding every stage's files and the report.

    ``store`` and ``data``: a stage store shared with other runs (``pipelines.runner``) and the recipe's data,
    already loaded; ``records`` (a list) receives the runner's record of each stage (ran, skipped or shared).
    """
    from edge_kd.report.report import markdown_table

    stream = stream or sys.stdout
    ctx = Context(recipe, Path(out) / recipe.run_name(), command, data=data)
    preflight(ctx)
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    write_text(ctx.run_dir / "recipe.yaml",
               f"# resolved recipe of: {command}\n" + yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    done = run_stages(ctx, stream=stream, store=store)
    if records is not None:
        records.extend(done)
    print(f"report: {ctx.run_dir / 'report.md'}  (results: {ctx.run_dir / 'results.json'})", file=stream, flush=True)
    print(markdown_table(json.loads((ctx.run_dir / "results.json").read_text())), file=stream, flush=True)
    return ctx.run_dir
