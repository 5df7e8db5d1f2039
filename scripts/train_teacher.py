"""Trains a recipe's teacher (its teacher stage only) into one .keras file, and measures it on the test split.

This is how the teacher shipped inside the package was made; any user can make their own the same way
and pass it to a run with ``--teacher`` (or ``teacher.path``)::

    python scripts/train_teacher.py --recipe fashion_mnist_teacher \\
        --out edge_kd/_data/teachers/fashion_mnist_resnet8w2.keras

It writes the model atomically, its training history and test accuracy beside it as ``<out>.json``
(with the wall time and the machine), and prints one line per epoch.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from edge_kd.errors import UserError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", required=True, help="a recipe with a teacher section and a teacher stage")
    p.add_argument("--out", required=True, help="the .keras file to write")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _train(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _train(args) -> int:
    from edge_kd.bench import stats
    from edge_kd.fileio import atomic_path, write_json
    from pipelines import recipe as recipe_mod
    from pipelines import run_data
    from pipelines.context import Context
    from pipelines.stages.teacher import Teacher

    out = Path(args.out)
    if out.suffix != ".keras":
        raise UserError(f"--out must end in .keras, got {out}")
    r = recipe_mod.apply_overrides(recipe_mod.load(args.recipe), args.set)
    if r.teacher is None or "teacher" not in r.stages.enabled():
        raise UserError(f"recipe {args.recipe} trains no teacher (it needs a teacher section and stages.teacher)")
    stage = Teacher()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        ctx = Context(r, Path(tmp) / "run", "python scripts/train_teacher.py")
        stage.check(ctx)
        folder = Path(tmp) / "teacher"
        folder.mkdir()
        summary = stage.run(ctx, folder)
        seconds = time.perf_counter() - start
        from edge_kd.keras import keras

        model = keras.models.load_model(folder / stage.model_file, compile=False)
        data = run_data.load(ctx)
        correct = sum(int((model.predict(x, batch_size=1024, verbose=0).argmax(-1) == y).sum())
                      for x, y in data.batches("test", data.chunk(most=10240)))
        accuracy = correct / data.count("test")
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out) as dst:
            shutil.copyfile(folder / stage.model_file, dst)
        history = __import__("json").loads((folder / "history.json").read_text())
    write_json(out.with_suffix(".json"), {
        "command": "python scripts/train_teacher.py " + " ".join(args.argv),
        "recipe": r.to_dict(), "parameters": int(model.count_params()),
        "test_accuracy": accuracy, "val_accuracy": summary["val_accuracy"], "seconds": round(seconds, 1),
        "machine": stats.machine(), "history": history})
    print(f"teacher {r.teacher.arch} {r.teacher.options}: test accuracy {accuracy:.2%} (val "
          f"{summary['val_accuracy']:.2%}), {seconds / 60:.1f} min; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
