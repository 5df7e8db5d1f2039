"""MLPerf Tiny's task on CIFAR-10: ResNet-8 distilled from the built-in teacher against ResNet-8 alone, and the
KD + prune + PQAT int8 file against tensorflow-model-optimization alone, per seed.

At each ``--seeds`` it runs ``pipelines/recipes/cifar10_resnet8.yaml`` (the teacher ``builtin:cifar10``; the
distilled ResNet-8, the same ResNet-8 trained alone with the same data, augmentation, epochs and initial
weights; pruned to 50 % and PQAT while distilling; int8 through LiteRT) and
``pipelines/recipes/cifar10_tfmot_only.yaml`` (the same stages without the teacher). Every run resumes where
a stopped one left off (stage by stage, epoch by epoch), so the command can be run again after a kill. The
settings are the recipes'; tune them on the validation split (``distilled_val`` / ``baseline_val``), never on
the test split. Figures are on ``cifar10_jpeg75.npz`` (CIFAR-10 stored as JPEG q75): they compare with
each other, not with published CIFAR-10 tables. Prints a table and the targets of issue 25, and writes
``benchmarks/results/cifar10.json``.

``--recorded SEED ...`` reads those seeds' finished folders as they are instead of running them (runs that an
earlier version of the code made, which would otherwise train again; each row says whether it was read).
``--kept SEED ...`` takes those seeds' rows from the results JSON as an earlier invocation wrote them (its run
folders gone, say on another session's machine; each row names the commit and the machine that measured it). The JSON is
written after every seed, so a long benchmark can be finished over several sittings; rows that distil from
teachers of different accuracy are refused.

``--mlperf`` measures MLPerf Tiny's quality target instead: at each seed it runs
``pipelines/recipes/cifar10_resnet8_mlperf.yaml`` (the same ResNet-8 distilled 100 epochs from the same teacher;
int8 through LiteRT, no pruning) and writes ``benchmarks/results/cifar10_mlperf.json``.

    python benchmarks/cifar10.py --seeds 0 1 2            # each row has its runs' times and machine
    python benchmarks/cifar10.py --seeds 0 1 2 --kept 0   # seed 0 as a sitting before measured it
    python benchmarks/cifar10.py --mlperf --seeds 0 1 2
    python benchmarks/cifar10.py --seeds 0 --set stages.distill.epochs=2 --set stages.prune.epochs=1 \\
        --set stages.qat.epochs=1 --out /tmp/quick --json /tmp/quick.json        # a smoke run
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edge_kd.bench import stats
from edge_kd.fileio import write_json

sys.path.insert(0, str(Path(__file__).parent))
# the same runs and readings as the default's gain
from default_gain import ROOT, _run, one, stage_val, tfmot_only  # noqa: E402

from pipelines import recipe as recipe_mod  # noqa: E402

#: issue 25's targets: the gain of distillation and of KD over TFMOT alone, MLPerf Tiny's quality target and
#: the size of its reference int8 file
MIN_GAIN_PP, MLPERF_ACCURACY, MLPERF_INT8_BYTES = 1.0, 0.85, 98_496


def summarise(rows: list[dict]) -> dict:
    """Returns mean ± sample std of each figure over the seeds, and each target met or not."""
    keys = ("teacher", "distilled", "baseline", "distilled_val", "baseline_val", "gain_pp", "final_int8",
            "final_int8_bytes", "tfmot_int8", "tfmot_gain_pp", "seconds", "tfmot_seconds")
    s = {k: stats.mean_std([r[k] for r in rows]) for k in keys if all(r.get(k) is not None for r in rows)}
    targets = {"distilled_beats_alone_by_1.0_pp": s["gain_pp"][0] >= MIN_GAIN_PP,
               "distilled_beats_alone_at_every_seed": all(r["gain_pp"] > 0 for r in rows)}
    if "tfmot_gain_pp" in s:
        targets["kd_prune_pqat_int8_beats_tfmot_alone_by_1.0_pp"] = s["tfmot_gain_pp"][0] >= MIN_GAIN_PP
    if "final_int8" in s:
        # this recipe's final file (30 epochs, pruned, PQAT); --mlperf measures the recipe made for the target
        targets["kd_prune_pqat_int8_at_most_98496_bytes_reaches_85_%"] = (
            s["final_int8"][0] >= MLPERF_ACCURACY and all(r["final_int8_bytes"] <= MLPERF_INT8_BYTES for r in rows))
    return {"stats": {k: {"mean": m, "std": sd} for k, (m, sd) in s.items()}, "targets": targets}


#: the recipe made for MLPerf Tiny's quality target (the same student, 100 epochs, no pruning)
MLPERF_RECIPE = "cifar10_resnet8_mlperf"


def mlperf(seed: int, out: Path, extra: list[str], recorded: bool = False) -> dict:
    """Runs the --mlperf recipe at ``seed`` (``recorded``: reads its finished folder); returns its int8 file's
    figures (test and validation) and the float student's."""
    r = recipe_mod.apply_overrides(recipe_mod.load(MLPERF_RECIPE), [f"seed={seed}", f"name=cifar10-mlperf-seed{seed}",
                                                                    *extra])
    run_dir, seconds, models = _run(r, out, f"mlperf, seed {seed}", recorded)
    int8 = models["student-int8"]
    return {"seed": seed, "seconds": round(seconds, 1), "recorded": recorded, "teacher": models["teacher"].accuracy,
            "distilled": models["student"].accuracy, "distilled_val": stage_val(run_dir, "distill"),
            "int8": int8.accuracy, "int8_val": int8.val_accuracy, "int8_bytes": int8.size_bytes, "run": str(run_dir)}


def summarise_mlperf(rows: list[dict]) -> dict:
    """Returns mean ± sample std of each figure over the seeds, and MLPerf Tiny's target met or not."""
    keys = ("teacher", "distilled", "distilled_val", "int8", "int8_val", "int8_bytes", "seconds")
    s = {k: stats.mean_std([r[k] for r in rows]) for k in keys}
    met = s["int8"][0] >= MLPERF_ACCURACY and all(r["int8_bytes"] <= MLPERF_INT8_BYTES for r in rows)
    return {"stats": {k: {"mean": m, "std": sd} for k, (m, sd) in s.items()},
            "targets": {"int8_at_most_98496_bytes_reaches_85_%": met}}


def kept_rows(path, seeds) -> dict[int, dict]:
    """Returns the rows of ``seeds`` from the results JSON at ``path`` as an earlier invocation wrote them, each
    marked ``kept``."""
    if not seeds:
        return {}
    try:
        rows = {r["seed"]: r for r in json.loads(Path(path).read_text())["rows"]}
    except (OSError, ValueError, KeyError, TypeError):
        raise SystemExit(f"--kept: {path} holds no rows to keep") from None
    missing = sorted(set(seeds) - set(rows))
    if missing:
        raise SystemExit(f"--kept: {path} holds no row for seed(s) {', '.join(map(str, missing))}")
    return {seed: {**rows[seed], "kept": True} for seed in seeds}


def gather(args, argv, path: str, measure, describe, summarise_rows, **record) -> dict:
    """Measures ``args.seeds`` in turn (``measure(seed)``; the ``--kept`` ones taken from ``path``), printing
    ``describe(row)`` and rewriting ``path`` with the rows so far and their summary after each; returns the summary.
    Rows whose teachers differ in accuracy are refused: their gains do not pool."""
    kept = kept_rows(path, args.kept)
    rows, summary = [], {}
    for seed in args.seeds:
        if seed in kept:
            row = kept[seed]
        else:
            commit = stats.code_version()  # at the start: commits made while a seed trains are not its code
            row = {**measure(seed), "commit": commit, "machine": stats.machine()}
        rows.append(row)
        print(describe(row), flush=True)
        teachers = sorted({r["teacher"] for r in rows})
        if len(teachers) > 1:
            raise SystemExit(f"the rows distil from teachers of different test accuracy ({teachers}): run the older "
                             f"seeds again instead of keeping them")
        summary = summarise_rows(rows)
        write_json(path, {
            "command": "python benchmarks/cifar10.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            **record, "data": "cifar10_jpeg75.npz (CIFAR-10 as JPEG q75; not comparable with published CIFAR-10 "
                              "figures)", "seeds": args.seeds, "rows": rows, **summary})
    print(f"wrote {path}")
    return summary


def main_mlperf(args, argv) -> None:
    summary = gather(
        args, argv, args.json or str(ROOT / "benchmarks" / "results" / "cifar10_mlperf.json"),
        lambda seed: mlperf(seed, Path(args.out), args.extra, seed in args.recorded),
        lambda row: (f"seed {row['seed']}: teacher {100 * row['teacher']:.2f} %, distilled {100 * row['distilled']:.2f} "
                     f"% (val {100 * row['distilled_val']:.2f}), int8 {100 * row['int8']:.2f} % (val "
                     f"{100 * row['int8_val']:.2f}, {row['int8_bytes']:,} B); {row['seconds']:.0f} s"),
        summarise_mlperf, recipe=MLPERF_RECIPE)
    for k, v in summary["stats"].items():
        scale = 1 if k in ("int8_bytes", "seconds") else 100
        print(f"{k}: {scale * v['mean']:.2f} ± {scale * v['std']:.2f}")
    for k, ok in summary["targets"].items():
        print(f"target {k}: {'met' if ok else 'MISSED'}")


def measure(seed: int, args) -> dict:
    """Runs the distilling recipe and TFMOT alone at ``seed``; returns their figures as one row."""
    was = seed in args.recorded
    row = one(seed, Path(args.out), args.extra, recipe="cifar10_resnet8", name="cifar10", recorded=was)
    row.update(tfmot_only(seed, Path(args.out), "cifar10_tfmot_only", "cifar10-tfmot-only", args.extra, was))
    row["recorded"] = was
    row["tfmot_gain_pp"] = 100 * (row["final_int8"] - row["tfmot_int8"])
    return row


def describe(row: dict) -> str:
    return (f"seed {row['seed']}: teacher {100 * row['teacher']:.2f} %, distilled {100 * row['distilled']:.2f} % "
            f"(val {100 * row['distilled_val']:.2f}), alone {100 * row['baseline']:.2f} % "
            f"(val {100 * row['baseline_val']:.2f}): {row['gain_pp']:+.2f} pp; KD+prune+PQAT int8 "
            f"{100 * row['final_int8']:.2f} % ({row['final_int8_bytes']:,} B) against TFMOT alone "
            f"{100 * row['tfmot_int8']:.2f} %: {row['tfmot_gain_pp']:+.2f} pp; "
            f"{row['seconds']:.0f} s + {row['tfmot_seconds']:.0f} s")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default=str(ROOT / "tflite_out" / "bench-cifar10"))
    p.add_argument("--set", action="append", default=[], dest="extra",
                   help="overrides of both recipes (key=value), e.g. data.source=... or stages.distill.epochs=...")
    p.add_argument("--json", default=None, help="where the results go (default benchmarks/results/cifar10.json, "
                                                 "with --mlperf cifar10_mlperf.json)")
    p.add_argument("--mlperf", action="store_true",
                   help="measure MLPerf Tiny's 85 %% with recipes/cifar10_resnet8_mlperf.yaml instead of the gains")
    p.add_argument("--recorded", type=int, nargs="+", default=[], metavar="SEED",
                   help="seeds whose finished run folders are read as they are, not run (runs an earlier version of "
                        "the code made; their time is the sum of their stages' recorded times)")
    p.add_argument("--kept", type=int, nargs="+", default=[], metavar="SEED",
                   help="seeds whose rows are taken from the results JSON as an earlier invocation wrote them")
    args = p.parse_args(argv)
    if args.mlperf:
        return main_mlperf(args, argv)
    summary = gather(args, argv, args.json or str(ROOT / "benchmarks" / "results" / "cifar10.json"),
                     lambda seed: measure(seed, args), describe, summarise)
    print("\n| figure (cifar10_jpeg75, test split unless val) | mean ± std |\n|---|---:|")
    for k, v in summary["stats"].items():
        scale = 1 if k in ("gain_pp", "tfmot_gain_pp", "final_int8_bytes", "seconds", "tfmot_seconds") else 100
        print(f"| {k} | {scale * v['mean']:.2f} ± {scale * v['std']:.2f} |")
    for k, ok in summary["targets"].items():
        print(f"target {k}: {'met' if ok else 'MISSED'}")

if __name__ == "__main__":
    main()
