"""One run of a recipe: check every user input, then run the stages into tflite_out/<run>/."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from edge_kd.fileio import write_text
from pipelines.recipe import Recipe
from pipelines.stages import Context, run_stages


def check_inputs(ctx: Context):
    """Loads the data, builds the student and loads the user's teacher, so a mistake fails before any training."""
    ctx.bundle
    ctx.build_student()
    if ctx.recipe.teacher is not None and ctx.recipe.teacher.path is not None:
        ctx.teacher()


def run(recipe: Recipe, out="tflite_out", command: str = "python -m pipelines.compress", stream=None) -> Path:
    """Runs ``recipe``; returns its run folder, holding every stage's files and the report."""
    from edge_kd.report.report import markdown_table

    stream = stream or sys.stdout
    ctx = Context(recipe, Path(out) / recipe.run_name(), command)
    check_inputs(ctx)
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    write_text(ctx.run_dir / "recipe.yaml",
               f"# resolved recipe of: {command}\n" + yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    run_stages(ctx, stream=stream)
    print(f"report: {ctx.run_dir / 'report.md'}  (results: {ctx.run_dir / 'results.json'})", file=stream, flush=True)
    print(markdown_table(json.loads((ctx.run_dir / "results.json").read_text())), file=stream, flush=True)
    return ctx.run_dir
