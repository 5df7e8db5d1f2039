"""CIFAR-10 teachers read plain and with ``teacher.flip_average`` (the logits averaged with the mirror image's): top-1
on the validation split the CIFAR-10 recipes hold out at seed 0 (no teacher made here trained on it) and on the test
split of ``../shared/data/cifar10_jpeg75.npz``, through the pipeline's own teacher (``run_models.teacher``: what a
distilling stage and the report read), on the splits' own images.

    python benchmarks/teacher_flip.py builtin:cifar10 tflite_out/teachers/cifar10_fastcnn_50ep.keras

Each file's row (with the command that measured it) replaces the one recorded for the same file (the same sha256)
in ``benchmarks/results/cifar10_teacher_flip.json``; another file of the same name gets a row of its own.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edge_kd.bench import stats
from edge_kd.fileio import write_json

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "cifar10_teacher_flip.json"
RECIPE = "cifar10_teacher"  # seed 0, val_fraction 0.1: the split cifar10_resnet8*.yaml hold out at seed 0


def measure(path: str, recipe=RECIPE, overrides=()) -> dict:
    """Returns the teacher file's top-1 on val and test, plain and flip-averaged, with its sha256."""
    from edge_kd import builtin_teachers
    from edge_kd.fileio import sha256_file
    from pipelines import recipe as recipe_mod
    from pipelines import run_data, run_models
    from pipelines.context import Context

    file = Path(builtin_teachers.resolve(path))
    row, data = {"file": file.name, "sha256": sha256_file(file)}, None
    for flip in (False, True):
        r = recipe_mod.apply_overrides(recipe_mod.load(recipe), [*overrides, f"teacher.path={path}",
                                                                f"teacher.flip_average={str(flip).lower()}"])
        ctx = Context(r, ROOT / "tflite_out" / "teacher-flip", "benchmarks/teacher_flip.py", data=data)
        teacher, data = run_models.teacher(ctx), run_data.load(ctx)  # the data, loaded once, serves both reads
        for split in ("val", "test"):
            row.setdefault(split, {})["flip_average" if flip else "plain"] = stats.keras_accuracy(
                teacher, *data.arrays(split), batch_size=500)
    row["images"] = {split: data.count(split) for split in ("val", "test")}
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("teachers", nargs="+", help="teacher files (.keras), or builtin:cifar10")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    recorded = json.loads(args.out.read_text()) if args.out.is_file() else {}
    rows = {row["sha256"]: row for row in recorded.get("teachers", [])}
    command = "python benchmarks/teacher_flip.py " + " ".join(args.teachers)
    for path in args.teachers:
        row = {**measure(path), "command": command, "machine": stats.machine()}
        rows[row["sha256"]] = row
        print(f"{row['file']}: val {row['val']['plain']:.2%}, flip-averaged {row['val']['flip_average']:.2%}; "
              f"test {row['test']['plain']:.2%}, flip-averaged {row['test']['flip_average']:.2%}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, {"data": "../shared/data/cifar10_jpeg75.npz", "recipe": RECIPE,
                          "teachers": list(rows.values())})
    return 0


if __name__ == "__main__":
    sys.exit(main())
