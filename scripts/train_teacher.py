"""Trains a recipe's teacher (its teacher stage only) into one .keras file, and measures it on the test split.

This is how the teacher shipped inside the package was made; any user can make their own the same way
and pass it to a run with ``--teacher`` (or ``teacher.path``)::

    python scripts/train_teacher.py --recipe fashion_mnist_teacher \\
        --out edge_kd/_data/teachers/fashion_mnist_resnet8w2.keras

It writes the model atomically, its training history and test accuracy beside it as ``<out>.json``
(with the training time and the machine), and prints one line per epoch. Every finished epoch is saved under
``--work`` (default ``tflite_out/teacher-<recipe name>``): the same command run again after a kill or a
Ctrl-C resumes after the last finished epoch, and the time it records is that of every try's finished epochs
(the part of an epoch a stopped try lost is not counted).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from edge_kd.errors import UserError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", required=True, help="a recipe with a teacher section and a teacher stage")
    p.add_argument("--out", required=True, help="the .keras file to write")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    p.add_argument("--work", help="where the finished epochs are kept until the teacher is written "
                                  "(default tflite_out/teacher-<recipe name>)")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _train(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the finished epochs are kept; the same command resumes after the last one", file=sys.stderr)
        return 130


def _train(args) -> int:
    from edge_kd.bench import stats
    from edge_kd.fileio import atomic_path, write_json
    from pipelines import recipe as recipe_mod
    from pipelines import run_data, run_training, runner
    from pipelines.context import Context
    from pipelines.stages.teacher import Teacher

    out = Path(args.out)
    if out.suffix != ".keras":
        raise UserError(f"--out must end in .keras, got {out}")
    r = recipe_mod.apply_overrides(recipe_mod.load(args.recipe), args.set)
    if r.teacher is None or "teacher" not in r.stages.enabled():
        raise UserError(f"recipe {args.recipe} trains no teacher (it needs a teacher section and stages.teacher)")
    stage = Teacher()
    work = Path(args.work or f"tflite_out/teacher-{r.name or Path(args.recipe).stem}")  # mnist.yaml has no name
    ctx = Context(r, work / "run", "python scripts/train_teacher.py")
    stage.check(ctx)
    # its clock counts the saved epochs of earlier tries too
    resume = ctx.begin_stage(stage.name, runner.stage_fingerprint(ctx, stage.name))
    if resume.epochs_done():
        print(f"resuming after epoch {resume.epochs_done()} ({resume.earlier / 60:.1f} min spent before)", flush=True)
    folder = work / "teacher"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    with run_training.scope(ctx, stage):
        summary = stage.run(ctx, folder)
    seconds = resume.seconds()
    from edge_kd.keras import keras

    model = keras.models.load_model(folder / stage.model_file, compile=False)
    data = run_data.load(ctx)
    correct = sum(int((model.predict(x, batch_size=1024, verbose=0).argmax(-1) == y).sum())
                  for x, y in data.batches("test", data.chunk(most=10240)))
    accuracy = correct / data.count("test")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as dst:
        shutil.copyfile(folder / stage.model_file, dst)
    history = json.loads((folder / "history.json").read_text())
    write_json(out.with_suffix(".json"), {
        "command": "python scripts/train_teacher.py " + " ".join(args.argv),
        "recipe": r.to_dict(), "parameters": int(model.count_params()),
        "test_accuracy": accuracy, "val_accuracy": summary["val_accuracy"], "seconds": round(seconds, 1),
        "machine": stats.machine(), "history": history})
    print(f"teacher {r.teacher.arch} {r.teacher.options}: test accuracy {accuracy:.2%} (val "
          f"{summary['val_accuracy']:.2%}), {seconds / 60:.1f} min; wrote {out}")
    shutil.rmtree(work, ignore_errors=True)  # only once the teacher and its record are written
    return 0


if __name__ == "__main__":
    sys.exit(main())
