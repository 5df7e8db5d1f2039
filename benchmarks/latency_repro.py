"""Does latency reproduce? Two consecutive default runs on one machine, their per-model medians side by side.

Runs ``python -m pipelines.compress`` (the default recipe, or ``--set`` overrides) twice, one after
the other, into ``tflite_out/bench-latency/run-a`` and ``run-b`` (each a fresh run: nothing is
reused), then compares every .tflite's median latency per thread count: the ratio b / a, and
whether it lies within ``--tolerance`` (issue 12: 15 %). Writes ``benchmarks/results/latency_repro.json``.

    python benchmarks/latency_repro.py                       # two full default runs, about 16 min on 2 cores
    python benchmarks/latency_repro.py --from-runs tflite_out/bench-latency   # compare two runs made earlier
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from edge_kd.bench import stats
from edge_kd.fileio import write_json

ROOT = Path(__file__).resolve().parents[1]


def run_twice(out: Path, sets: list[str]) -> None:
    """Makes the two runs, one after the other, each from scratch."""
    for name in ("run-a", "run-b"):
        shutil.rmtree(out / name, ignore_errors=True)
        cmd = [sys.executable, "-m", "pipelines.compress", "--out", str(out), "--run-name", name,
               *[a for s in sets for a in ("--set", s)]]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True)


def compare(out: Path, tolerance: float) -> dict:
    """Returns every .tflite's medians in both runs and their ratio, per thread count."""
    models = {}
    for name in ("run-a", "run-b"):
        for m in json.loads((out / name / "results.json").read_text())["models"]:
            if m.get("latency"):
                models.setdefault(m["name"], {})[name] = m["latency"]
    rows = []
    for model, runs in models.items():
        for threads in sorted(runs["run-a"], key=int):
            a, b = runs["run-a"][threads], runs["run-b"][threads]
            ratio = b["median_ms"] / a["median_ms"]
            rows.append({"model": model, "threads": int(threads), "a_median_ms": a["median_ms"],
                         "a_iqr_ms": [a["q1_ms"], a["q3_ms"]], "b_median_ms": b["median_ms"],
                         "b_iqr_ms": [b["q1_ms"], b["q3_ms"]], "ratio": ratio,
                         "within": abs(ratio - 1) <= tolerance})
    return {"tolerance": tolerance, "rows": rows, "all_within": all(r["within"] for r in rows),
            "worst_ratio": max((r["ratio"] for r in rows), key=lambda v: abs(v - 1), default=None)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "tflite_out" / "bench-latency")
    p.add_argument("--from-runs", type=Path, help="compare run-a and run-b already in this folder")
    p.add_argument("--set", action="append", default=[], help="a recipe override for both runs")
    p.add_argument("--tolerance", type=float, default=0.15)
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "latency_repro.json"))
    args = p.parse_args(argv)
    out = args.from_runs or args.out
    if not args.from_runs:
        run_twice(out, args.set)
    result = compare(out, args.tolerance)
    print("\n| model | threads | run A median ms (IQR) | run B median ms (IQR) | B / A |\n|---|---:|---:|---:|---:|")
    for r in result["rows"]:
        print(f"| {r['model']} | {r['threads']} | {r['a_median_ms']:.4f} ({r['a_iqr_ms'][0]:.4f}–{r['a_iqr_ms'][1]:.4f}) "
              f"| {r['b_median_ms']:.4f} ({r['b_iqr_ms'][0]:.4f}–{r['b_iqr_ms'][1]:.4f}) | {r['ratio']:.3f}"
              f"{'' if r['within'] else ' ✗'} |")
    print(f"\nall within ±{100 * args.tolerance:.0f} %: {result['all_within']} (worst ratio {result['worst_ratio']:.3f})")
    write_json(args.json, {
        "command": "python benchmarks/latency_repro.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": stats.machine(), **result})
    print(f"wrote {args.json}")
    return 0 if result["all_within"] else 1


if __name__ == "__main__":
    sys.exit(main())
