"""Which knob matters: the default recipe's distill stage with one setting changed, against the student alone.

Each variant is the default recipe (``pipelines/recipes/fashion_mnist.yaml``) with ``--set`` overrides; the
pipeline's own distill stage (or, for the "alone" rows, its baseline stage: same initial weights,
epochs and augmentation, no teacher) trains it at each seed, and the Keras student is measured on the
validation and the test split of Fashion-MNIST. A variant that changes the augmentation has its own
"alone" row with that augmentation. Prints mean ± sample std over the seeds, the gain over the
matching "alone" row, and writes ``benchmarks/results/ablation.json``.

    python benchmarks/ablation.py --seeds 0 1 2
    python benchmarks/ablation.py --seeds 0 1 2 --variants alone "fixed view (cached teacher)"

``--from-runs tflite_out/bench-default`` takes the "alone" and default rows from the runs of
``benchmarks/default_gain.py`` at the same seeds (their baseline and distill stages are these very
trainings, and training repeats itself exactly for a seed) instead of training them again.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from edge_kd.bench import stats
from edge_kd.fileio import write_json
from pipelines import recipe as recipe_mod
from pipelines import run_data
from pipelines.context import Context
from pipelines.stages.baseline import Baseline
from pipelines.stages.distill import Distill

ROOT = Path(__file__).resolve().parents[1]
FIXED = ["distillation.consistent=false", "distillation.teacher_cache=true"]
HARD_01 = ["distillation.hard_weight=0.1", "distillation.terms.0.weight=0.9"]  # the default since 2026-12-01
HARD_05 = ["distillation.hard_weight=0.5", "distillation.terms.0.weight=0.5"]  # the default before
#: name -> (the overrides of the default recipe, the "alone" row it is compared with); every variant names
#: its weights, so a row keeps its meaning when the default changes
VARIANTS = {
    "alone": ([], None),
    "consistent, T 2, hard 0.5": (HARD_05, "alone"),
    "fixed view (cached teacher)": ([*FIXED, *HARD_05], "alone"),
    "T 4": (["distillation.terms.0.temperature=4.0", *HARD_05], "alone"),
    "T 1": (["distillation.terms.0.temperature=1.0", *HARD_05], "alone"),
    "hard 0.1, soft 0.9": (HARD_01, "alone"),
    "alone, 20 epochs": (["stages.distill.epochs=20"], None),
    "fixed view, 20 epochs": (["stages.distill.epochs=20", *FIXED, *HARD_05], "alone, 20 epochs"),
    "fixed view, hard 0.1, 20 epochs": (["stages.distill.epochs=20", *FIXED, *HARD_01], "alone, 20 epochs"),
    "alone, mixup 0.3": (["augment.mixup=0.3"], None),
    "mixup 0.3": (["augment.mixup=0.3", *HARD_05], "alone, mixup 0.3"),
}


def one(variant: str, seed: int, folder: Path) -> dict:
    """Trains ``variant`` at ``seed`` with the pipeline's stage code; returns its val and test accuracy."""
    from edge_kd.keras import keras

    sets, alone_of = VARIANTS[variant]
    r = recipe_mod.apply_overrides(recipe_mod.load(), [f"seed={seed}", *sets])
    ctx = Context(r, folder, "benchmarks/ablation.py")
    stage = Baseline() if alone_of is None else Distill()
    out = folder / stage.name
    out.mkdir(parents=True)
    start = time.perf_counter()
    summary = stage.run(ctx, out)
    seconds = time.perf_counter() - start
    model = keras.models.load_model(out / stage.model_file, compile=False)
    x, y = run_data.load(ctx).arrays("test")
    test = stats.keras_accuracy(model, x, y, batch_size=1024)
    return {"variant": variant, "seed": seed, "val": summary["val_accuracy"], "test": test,
            "seconds": round(seconds, 1), "sets": sets}


#: the variants a default run holds: variant -> (its stage, its Keras row in results.json)
IN_DEFAULT_RUN = {"alone": ("baseline", "baseline"), "hard 0.1, soft 0.9": ("distill", "student")}


def from_run(variant: str, seed: int, runs: Path) -> dict:
    """Returns ``variant``'s row read from the default run at ``seed`` under ``runs`` (benchmarks/default_gain.py)."""
    stage, row = IN_DEFAULT_RUN[variant]
    run = runs / f"default-seed{seed}"
    manifest = json.loads((run / "manifests" / f"{stage}.json").read_text())
    models = {m["name"]: m for m in json.loads((run / "results.json").read_text())["models"]}
    return {"variant": variant, "seed": seed, "val": manifest["summary"]["val_accuracy"],
            "test": models[row]["accuracy"], "seconds": manifest["seconds"], "sets": [], "from": str(run)}


def summarise(rows: list[dict]) -> dict:
    """Returns, per variant, mean ± sample std of val and test accuracy and of the gain over its alone row."""
    out = {}
    for variant in dict.fromkeys(r["variant"] for r in rows):
        mine = {r["seed"]: r for r in rows if r["variant"] == variant}
        entry = {}
        for split in ("val", "test"):
            mean, std = stats.mean_std([r[split] for r in mine.values()])
            entry[split] = {"mean": mean, "std": std}
        alone_of = VARIANTS[variant][1]
        alone = {r["seed"]: r for r in rows if r["variant"] == alone_of}
        seeds = sorted(set(mine) & set(alone))
        if alone_of and seeds:
            g = [100 * (mine[s]["test"] - alone[s]["test"]) for s in seeds]
            mean, std = stats.mean_std(g)
            entry["test_gain_pp"] = {"mean": mean, "std": std, "per_seed": g, "against": alone_of}
        entry["seeds"] = sorted(mine)
        out[variant] = entry
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "ablation.json"))
    p.add_argument("--from-runs", type=Path, help="read the alone and default rows from these default_gain.py runs")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for i, variant in enumerate(args.variants):
                if args.from_runs and variant in IN_DEFAULT_RUN:
                    row = from_run(variant, seed, args.from_runs)
                else:
                    row = one(variant, seed, Path(tmp) / f"{seed}-{i}")
                rows.append(row)
                print(f"seed {seed} {variant}: val {100 * row['val']:.2f} %, test {100 * row['test']:.2f} %, "
                      f"{row['seconds']:.0f} s", flush=True)
    summary = summarise(rows)
    print("\n| variant | val % | test % | test gain over alone (pp) |\n|---|---:|---:|---:|")
    for variant, e in summary.items():
        gain = e.get("test_gain_pp")
        g = f"{gain['mean']:+.2f} ± {gain['std']:.2f}" if gain else "—"
        print(f"| {variant} | {100 * e['val']['mean']:.2f} ± {100 * e['val']['std']:.2f} | "
              f"{100 * e['test']['mean']:.2f} ± {100 * e['test']['std']:.2f} | {g} |")
    write_json(args.json, {
        "command": "python benchmarks/ablation.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": stats.machine(),
        "rows": rows, "summary": summary})
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
