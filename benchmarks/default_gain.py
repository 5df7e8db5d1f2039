"""The default run's promise, measured: the distilled student against the same student trained alone, per seed.

Runs the built-in default recipe (``python -m pipelines.compress`` with no arguments, here at each
``--seeds``; the run's seed sets the student's initial weights, the data order, the validation split
and the augmentation, the same for the distilled student and its baseline), and reads from each run:
the teacher, the distilled student, the baseline (all Keras, test split, and the distill/baseline
validation accuracy), the final pruned PQAT int8 model through LiteRT (accuracy, bytes) and the
run's wall time. With ``--tfmot`` it also runs, at each seed, ``pipelines/recipes/fashion_mnist_tfmot_only.yaml``
(the same student, augmentation, epochs, pruning and PQAT, without a teacher: what
tensorflow-model-optimization alone gives) and compares the final int8 models. Prints a table and the
targets of issue 11, and writes ``benchmarks/results/default_gain.json``.

    python benchmarks/default_gain.py --seeds 0 1 2 --tfmot
    python benchmarks/default_gain.py --seeds 0 --set prune=false --set qat=false   # quicker, for tuning on val
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

from edge_kd.bench import stats
from edge_kd.bench.results import rows_of
from edge_kd.fileio import write_json
from pipelines import recipe as recipe_mod
from pipelines.run import run
from pipelines.runner import seconds_before, stage_seconds

ROOT = Path(__file__).resolve().parents[1]
#: issue 11's targets for the default run
MIN_GAIN_PP, MAX_INT8_BYTES, MAX_GAP_PP, MAX_MINUTES = 0.5, 30_000, 2.0, 10.0


def _run(r, out: Path, what: str, recorded: bool = False):
    """Runs ``r`` into ``out`` (or goes on with it where an earlier invocation stopped); returns its folder, its
    time and its models' figures. The time is this call's wall time and what earlier invocations spent on the
    stages it did not redo (``runner.seconds_before``), so a run finished over several sittings states its whole
    cost. ``recorded``: runs nothing and reads the finished run folder as it is (a run an earlier version of the
    code made, which would otherwise train again); its time is then the sum of its stages' recorded times."""
    if recorded:
        run_dir = Path(out) / r.run_name()
        if not (run_dir / "results.json").is_file():
            raise SystemExit(f"--recorded: {run_dir} holds no finished run (no results.json); run it first")
        seconds = sum(stage_seconds(run_dir).values())
    else:
        records, start = [], time.perf_counter()
        run_dir = run(r, out=out, command=f"benchmarks/{Path(sys.argv[0]).name} ({what})", stream=io.StringIO(),
                      records=records)
        seconds = time.perf_counter() - start + seconds_before(run_dir, records)
    models = rows_of(json.loads((run_dir / "results.json").read_text())["models"])
    return run_dir, seconds, {m.name: m for m in models}


def stage_val(run_dir: Path, stage: str):
    """Returns the validation accuracy a finished run's ``stage`` recorded in its manifest (None where it has none)."""
    manifest = json.loads((Path(run_dir) / "manifests" / f"{stage}.json").read_text())
    return manifest.get("summary", {}).get("val_accuracy")


def tfmot_only(seed: int, out: Path, recipe: str = "fashion_mnist_tfmot_only", name: str = "tfmot-only",
               extra=(), recorded: bool = False) -> dict:
    """Runs ``recipe`` (the distilling recipe's stages without a teacher) at ``seed`` (``recorded``: reads its
    finished folder, see ``_run``); returns its final int8 model's figures."""
    r = recipe_mod.apply_overrides(recipe_mod.load(recipe), [f"seed={seed}", f"name={name}-seed{seed}", *extra])
    run_dir, seconds, models = _run(r, out, f"tfmot-only, seed {seed}", recorded)
    return {"tfmot_int8": models["qat-int8"].accuracy, "tfmot_int8_bytes": models["qat-int8"].size_bytes,
            "tfmot_seconds": round(seconds, 1), "tfmot_run": str(run_dir)}


def one(seed: int, out: Path, extra: list[str], recipe: str | None = None, name: str = "default",
        recorded: bool = False) -> dict:
    """Runs ``recipe`` (the default one when None) at ``seed`` (``recorded``: reads its finished folder, see
    ``_run``); returns what it measured."""
    r = recipe_mod.apply_overrides(recipe_mod.load(recipe), [f"seed={seed}", f"name={name}-seed{seed}", *extra])
    run_dir, seconds, models = _run(r, out, f"seed {seed}", recorded)
    val = {s: stage_val(run_dir, s) for s in ("distill", "baseline")}
    final = models.get("qat-int8")
    return {"seed": seed, "seconds": round(seconds, 1), "teacher": models["teacher"].accuracy,
            "distilled": models["student"].accuracy, "baseline": models["baseline"].accuracy,
            "distilled_val": val["distill"], "baseline_val": val["baseline"],
            "gain_pp": 100 * (models["student"].accuracy - models["baseline"].accuracy),
            "final_int8": None if final is None else final.accuracy,
            "final_int8_bytes": None if final is None else final.size_bytes, "run": str(run_dir)}


def summarise(rows: list[dict]) -> dict:
    """Returns mean ± sample std of each figure over the seeds, and each target met or not."""
    keys = ("teacher", "distilled", "baseline", "distilled_val", "baseline_val", "gain_pp", "final_int8",
            "final_int8_bytes", "seconds", "tfmot_int8", "tfmot_gain_pp")
    s = {k: stats.mean_std([r[k] for r in rows]) for k in keys if all(r.get(k) is not None for r in rows)}
    targets = {"gain_mean_at_least_0.5_pp": s["gain_pp"][0] >= MIN_GAIN_PP,
               "gain_at_every_seed": all(r["gain_pp"] > 0 for r in rows)}
    if "final_int8" in s:
        targets["final_int8_at_most_30_KB"] = all(r["final_int8_bytes"] <= MAX_INT8_BYTES for r in rows)
        targets["final_int8_within_2_pp_of_teacher"] = all(
            100 * (r["teacher"] - r["final_int8"]) <= MAX_GAP_PP for r in rows)
        targets["run_at_most_10_min"] = all(r["seconds"] <= 60 * MAX_MINUTES for r in rows)
    if "tfmot_gain_pp" in s:
        targets["int8_at_least_0.5_pp_above_tfmot_only"] = s["tfmot_gain_pp"][0] >= MIN_GAIN_PP
    return {"stats": {k: {"mean": m, "std": sd} for k, (m, sd) in s.items()}, "targets": targets}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default=str(ROOT / "tflite_out" / "bench-default"))
    p.add_argument("--set", action="append", default=[], dest="extra",
                   help="overrides of the default recipe (key=value)")
    p.add_argument("--tfmot", action="store_true", help="also run pipelines/recipes/fashion_mnist_tfmot_only.yaml per seed")
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "default_gain.json"))
    args = p.parse_args(argv)
    rows = []
    for seed in args.seeds:
        row = one(seed, Path(args.out), args.extra)
        if args.tfmot:
            row.update(tfmot_only(seed, Path(args.out)))
            if row["final_int8"] is not None:
                row["tfmot_gain_pp"] = 100 * (row["final_int8"] - row["tfmot_int8"])
        rows.append(row)
        final = "" if row["final_int8"] is None else (f", final int8 {100 * row['final_int8']:.2f} % "
                                                      f"({row['final_int8_bytes']:,} B)")
        print(f"seed {seed}: teacher {100 * row['teacher']:.2f} %, distilled {100 * row['distilled']:.2f} % "
              f"(val {100 * row['distilled_val']:.2f}), alone {100 * row['baseline']:.2f} % "
              f"(val {100 * row['baseline_val']:.2f}): {row['gain_pp']:+.2f} pp{final}; {row['seconds']:.0f} s",
              flush=True)
        if args.tfmot:
            print(f"        tfmot only: final int8 {100 * row['tfmot_int8']:.2f} %; {row['tfmot_seconds']:.0f} s",
                  flush=True)
    summary = summarise(rows)
    st = summary["stats"]
    print("\n| figure (test split unless val) | mean ± std |\n|---|---:|")
    for k, v in st.items():
        scale = 1 if k in ("gain_pp", "tfmot_gain_pp", "final_int8_bytes", "seconds") else 100
        print(f"| {k} | {scale * v['mean']:.2f} ± {scale * v['std']:.2f} |")
    for k, ok in summary["targets"].items():
        print(f"target {k}: {'met' if ok else 'MISSED'}")
    write_json(args.json, {
        "command": "python benchmarks/default_gain.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": stats.machine(), "rows": rows,
        **summary})
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
