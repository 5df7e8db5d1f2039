"""One run of a recipe: hold its folder, check every input before anything trains, then run the stages into <out>/<run>/."""
from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import yaml

from edge_kd.errors import UserError
from edge_kd.fileio import LOCK_NAME, FolderBusy, exclusive, write_text
from pipelines import run_data, run_models
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


def first_missing(folder: Path) -> Path | None:
    """Returns the outermost folder of ``folder``'s path (itself included) that does not exist yet, or None."""
    missing = None
    for p in (Path(folder), *Path(folder).parents):
        if p.exists():
            return missing
        missing = p
    return missing


@contextlib.contextmanager
def holding(folder: Path, command: str, option: str = "--out", instead: str = "another --out or --run-name"):
    """Holds ``folder`` for this process alone while the block runs (``edge_kd.fileio.exclusive``).

    A folder another process holds is a one-line UserError at once (suggesting ``instead``); when the block fails before it wrote
    anything (an exception other than Ctrl-C out of a block that created the folder), the folders this call
    created are removed again, so a refused run leaves no trace.
    """
    check_out_folder(folder, option)
    created = first_missing(folder)
    try:
        with exclusive(folder, command):
            try:
                yield
            except Exception:
                if created is not None:
                    _remove_if_empty(folder, created)
                raise
    except FolderBusy as e:
        raise UserError(f"{e.folder} is in use by {e.holder}; wait for it to finish, or give {instead}") from None


def _remove_if_empty(folder: Path, up_to: Path) -> None:
    """Removes ``folder`` if it holds nothing but its lock, then each parent up to ``up_to`` while it is empty
    (another run may have made its own folder beside it meanwhile)."""
    folder = Path(folder)
    if {p.name for p in folder.iterdir()} - {LOCK_NAME}:
        return
    (folder / LOCK_NAME).unlink(missing_ok=True)
    p = folder
    while True:
        try:
            p.rmdir()
        except OSError:
            return
        if p == Path(up_to):
            return
        p = p.parent


def preflight(ctx: Context) -> None:
    """Makes every mistake fail now, before the first stage trains: the data, the teachers (their outputs on a
    few training images must be finite), and each enabled stage's own check (layer names, what can be pruned,
    clustered or quantized, the bundle's pick).
    """
    data = run_data.load(ctx)
    job, batch = ctx.cluster, ctx.recipe.training.batch_size
    if job is not None and batch % job.replicas:
        raise UserError(f"training.batch_size {batch} is the global batch, split evenly over the job's "
                        f"{job.replicas} replicas: give a multiple of {job.replicas}")
    if job is not None and data.count("train") < batch:
        raise UserError(f"the data has {data.count('train')} training images, fewer than one global batch "
                        f"(training.batch_size {batch}); across replicas each epoch drops its short last batch")
    if ctx.recipe.teacher is not None and ctx.recipe.teacher.path is not None:
        run_models.teacher(ctx)
    run_models.extra_teachers(ctx)
    for name in ctx.enabled():
        ctx.stages[name].check(ctx)


def agreement_keys(ctx: Context) -> dict:
    """Returns what the workers of a multi-worker job must share, a hash each: the recipe (its files by their
    content, the data apart), the data (``DataBundle.content_digest``: identical copies agree), the code (the
    pipeline's source, the loss terms', TensorFlow's and tf_keras' versions) and the devices of a worker."""
    from edge_kd.fileio import sha256_file
    from edge_kd.keras import keras, tf
    from pipelines import codehash, run_keys
    from pipelines.fingerprint import fingerprint
    from pipelines.runner import stage_modules

    def by_content(v):
        if isinstance(v, dict):
            return {k: by_content(x) for k, x in v.items()}
        if isinstance(v, list):
            return [by_content(x) for x in v]
        if isinstance(v, str) and v and os.path.isfile(v):
            return f"file sha256 {sha256_file(v)}"
        return v

    recipe = ctx.recipe.to_dict()
    recipe["data"] = {k: v for k, v in recipe["data"].items() if k != "source"}
    modules = ["pipelines.run", *sorted({m for n in ctx.enabled() for m in stage_modules(ctx.stages[n], ctx)})]
    job = ctx.cluster
    return {"recipe": fingerprint(by_content(recipe)), "data": run_data.load(ctx).content_digest(),
            "code": fingerprint([codehash.code_hash(modules), tf.__version__, keras.__version__]),
            "devices": fingerprint([sorted(d.rsplit("device:", 1)[-1].split(":")[0]
                                           for d in job.strategy.extended.worker_devices), run_keys.precision(ctx)])}


def run(recipe: Recipe, out="tflite_out", command: str = "python -m pipelines.compress", stream=None, store=None,
        data=None, records: list | None = None, checked: bool = False) -> Path | None:
    """Runs ``recipe``; returns its run folder, holding every stage's files and the report.

    ``store`` and ``data``: a stage store shared with other runs (``pipelines.runner``) and the recipe's data,
    already loaded; ``records`` (a list) receives the runner's record of each stage (ran, skipped or shared);
    ``checked``: the caller has run ``preflight`` on this very recipe and data already (a search checks its
    candidates before any trains), so it is not run again.

    With ``training.strategy: multi_worker`` this process first joins the job TF_CONFIG describes
    (``pipelines.multiworker``), before TensorFlow runs anything; every worker checks its inputs, and all of them
    refuse to train unless every one passed and runs the same recipe, data and code. The chief runs as above;
    another worker trains in step with it in a scratch folder, writes nothing under ``out``, and returns None.
    """
    from edge_kd.report.report import chance_warnings, markdown_table, summary_lines
    from pipelines import multiworker

    stream = stream or sys.stdout
    # before TensorFlow runs anything; None unless multi_worker
    job = multiworker.connect(recipe.training, prog=command.split(" --")[0])
    if job is not None and store is not None:
        raise UserError("training.strategy: multi_worker runs one recipe as one job (python -m pipelines.compress); "
                        "runs that share a store, such as a search's candidates, run on one host")
    with contextlib.ExitStack() as held:
        problem = ctx = None
        try:
            if job is None or job.is_chief:
                run_dir = Path(out) / recipe.run_name()
                held.enter_context(holding(run_dir, command))
            else:  # its own copy of what the stages make, thrown away at the end
                run_dir = held.enter_context(multiworker.scratch(job.index))
            ctx = Context(recipe, run_dir, command, data=data, cluster=job)
            if not checked:
                preflight(ctx)
        except UserError as e:
            if job is None:
                raise
            problem = e
        if job is not None:  # every worker passed its checks and runs what the chief runs, or none trains
            job.agree(None if problem else agreement_keys(ctx), problem and str(problem))
            if problem:
                raise problem
        if job is None or job.is_chief:
            write_text(ctx.run_dir / "recipe.yaml",
                       f"# resolved recipe of: {command}\n" + yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        done = run_stages(ctx, stream=stream, store=store)
    if records is not None:
        records.extend(done)
    if job is not None and not job.is_chief:
        print(f"{job.name()}: training done; the chief, {job.name(0)}, writes the run folder and the report",
              file=stream, flush=True)
        return None
    print(f"report: {ctx.run_dir / 'report.md'}  (results: {ctx.run_dir / 'results.json'})", file=stream, flush=True)
    results = json.loads((ctx.run_dir / "results.json").read_text())
    print(markdown_table(results), file=stream, flush=True)
    for line in summary_lines(results):  # the report's answer, last on the terminal where it is seen
        print(line.replace("**", "").replace("`", ""), file=stream, flush=True)
    for i, line in enumerate(chance_warnings(results)):
        print(f"warning: {line}" if i == 0 else f"  - {line}", file=stream, flush=True)
    return ctx.run_dir
