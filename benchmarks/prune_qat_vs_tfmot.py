"""TFMOT alone against edge-kd: prune to 75 % + sparsity-preserving QAT, with and without distillation.

Same student, same stages, epochs and seeds; the only difference is the teacher's loss in every
stage (pipelines/recipes/mnist.yaml against pipelines/recipes/mnist_tfmot_only.yaml). Reports the final int8 model's
accuracy through LiteRT on the whole test split and its gzip size, mean ± std over the seeds, and
writes benchmarks/results/prune_qat_vs_tfmot.json.

    python benchmarks/prune_qat_vs_tfmot.py --data ../shared/data/mnist.npz --seeds 0 1 2
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
from pipelines import recipe as recipe_mod
from pipelines.run import run

ROOT = Path(__file__).resolve().parents[1]

RECIPES = {"tfmot-only": "mnist_tfmot_only.yaml", "edge-kd": "mnist.yaml"}


def one(method: str, data: str, seed: int, out: Path, extra: list[str]) -> dict:
    """Runs one method at one seed; returns the final int8 model's figures."""
    r = recipe_mod.load(recipe_mod.RECIPES / RECIPES[method])
    sets = [f"data.source={data}", f"seed={seed}", f"name={method}-seed{seed}", "export.variants=[int8]",
            "benchmark.threads=[1]", *extra]
    if r.stages.baseline is not None:
        sets.append("baseline=false")  # the comparison is the two pipelines; the baseline stage is not part of it
    r = recipe_mod.apply_overrides(r, sets)
    start = time.perf_counter()
    run_dir = run(r, out=out, command=f"benchmarks/prune_qat_vs_tfmot.py ({method}, seed {seed})", stream=io.StringIO())
    seconds = time.perf_counter() - start
    models = {m.name: m for m in rows_of(json.loads((run_dir / "results.json").read_text())["models"])}
    final = models["qat-int8"]
    return {"method": method, "seed": seed, "accuracy": final.accuracy, "gzip_bytes": final.gzip_bytes,
            "size_bytes": final.size_bytes, "sparsity": final.sparsity, "seconds": round(seconds, 1),
            "pruned_int8_accuracy": models["pruned-int8"].accuracy, "run": str(run_dir)}


def summarise(rows: list[dict]) -> dict:
    """Returns mean and sample std (ddof=1) of accuracy and gzip size per method."""
    out = {}
    for method in RECIPES:
        acc = [r["accuracy"] for r in rows if r["method"] == method]
        gz = [r["gzip_bytes"] for r in rows if r["method"] == method]
        if acc:
            (acc_mean, acc_std), (gz_mean, gz_std) = stats.mean_std(acc), stats.mean_std(gz)
            out[method] = {"accuracy_mean": acc_mean, "accuracy_std": acc_std,
                           "gzip_mean": gz_mean, "gzip_std": gz_std, "seeds": len(acc)}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "mnist.npz"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default=str(ROOT / "tflite_out" / "bench-prune-qat"))
    p.add_argument("--set", action="append", default=[], dest="extra", help="recipe overrides for both methods")
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "prune_qat_vs_tfmot.json"))
    args = p.parse_args(argv)
    rows = []
    for seed in args.seeds:
        for method in RECIPES:
            row = one(method, args.data, seed, Path(args.out), args.extra)
            rows.append(row)
            print(f"{method:>10} seed {seed}: int8 {100 * row['accuracy']:.2f} %, gzip {row['gzip_bytes']:,} B, "
                  f"sparsity {100 * row['sparsity']:.1f} %, {row['seconds']:.0f} s", flush=True)
    summary = summarise(rows)
    print("\n| method | int8 accuracy % (mean ± std) | gzip bytes (mean ± std) | seeds |\n|---|---:|---:|---:|")
    for method, s in summary.items():
        print(f"| {method} | {100 * s['accuracy_mean']:.2f} ± {100 * s['accuracy_std']:.2f} | "
              f"{s['gzip_mean']:,.0f} ± {s['gzip_std']:,.0f} | {s['seeds']} |")
    if {"edge-kd", "tfmot-only"} <= set(summary):
        diff = 100 * (summary["edge-kd"]["accuracy_mean"] - summary["tfmot-only"]["accuracy_mean"])
        print(f"\nedge-kd − tfmot-only: {diff:+.2f} pp int8 accuracy")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"command": " ".join(["python", "benchmarks/prune_qat_vs_tfmot.py", *(argv or sys.argv[1:])]),
                                           "data": args.data, "rows": rows, "summary": summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()
