"""Data-free int8 calibration, measured: the default run's int8 files calibrated on images made from the teacher
alone (``stages.synthesize``, DeepInversion) against the same files calibrated on training images.

Runs the built-in default recipe at ``--seed`` once (its trained stages are kept in a stage store under ``--out``,
so every later run takes them from there and trains nothing), then the same recipe with ``stages.synthesize`` at
each ``--synth-seeds`` and ``stages.export.representative: synthetic``. Every calibrated file (int8, int8_mixed of
each student stage) is compared with its real-calibrated twin on the validation and the test split, through LiteRT.
Prints a table and issue 28's calibration target, and writes ``benchmarks/results/datafree.json``. Settings of the
synthesis are chosen on the validation split: ``--set`` passes recipe overrides to the synthetic runs and
``--tag`` names such a try, so tries sit side by side in the JSON without replacing the measured one.

    python benchmarks/datafree.py                                  # seed 0, synthesis seeds 0 1 2
    python benchmarks/datafree.py --synth-seeds 0 --tag bn10 --set synthesize.bn_weight=10.0
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path

from edge_kd.bench.results import rows_of
from edge_kd.fileio import write_json
from pipelines import recipe as recipe_mod
from pipelines.run import run
from pipelines.runner import stage_seconds

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "datafree.json"
#: issue 28's target: the default run's int8 files calibrated on synthetic images lose at most this against real
MAX_CALIBRATION_LOSS_PP = 0.3


def _run(overrides: list[str], out: Path, what: str) -> tuple[Path, float, dict]:
    r = recipe_mod.apply_overrides(recipe_mod.load(None), overrides)
    start = time.perf_counter()
    run_dir = run(r, out=out, command=f"benchmarks/datafree.py ({what})", stream=io.StringIO(), store=out / "store")
    seconds = time.perf_counter() - start
    rows = {m.name: m for m in rows_of(json.loads((run_dir / "results.json").read_text())["models"])}
    return run_dir, seconds, rows


def _made_in(run_dir: Path) -> dict:
    """Returns the seconds each stage of the run took when it ran (in this call or an earlier one), and their sum."""
    stages = stage_seconds(run_dir)
    return {"stages": stages, "total": round(sum(stages.values()), 1)}


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0, help="the default run's seed (its training)")
    p.add_argument("--synth-seeds", type=int, nargs="+", default=[0, 1, 2], help="stages.synthesize.seed of each run")
    p.add_argument("--set", action="append", default=[], dest="overrides", help="recipe override of the synthetic runs")
    p.add_argument("--tag", default="default", help="the name of these synthesis settings in the JSON")
    p.add_argument("--out", default="tflite_out/bench-datafree", help="where the runs and their stage store go")
    args = p.parse_args(argv)
    out = Path(args.out)

    base = [f"seed={args.seed}"]
    print(f"default run, seed {args.seed}, calibrated on training images ...", flush=True)
    real_dir, real_seconds, real = _run([*base, f"name=default-seed{args.seed}-real"], out, "training images")
    files = [n for n, m in real.items() if m.calibration]
    runs = []
    for s in args.synth_seeds:
        print(f"the same, calibrated on synthetic images of seed {s} ({args.tag}) ...", flush=True)
        run_dir, seconds, rows = _run([*base, f"name=default-seed{args.seed}-{args.tag}-synth{s}",
                                       f"stages.synthesize.seed={s}", "stages.export.representative=synthetic",
                                       *args.overrides], out, f"synthetic images, seed {s}")
        summary = json.loads((run_dir / "manifests" / "synthesize.json").read_text())["summary"]
        made = _made_in(run_dir)["stages"]
        runs.append({"synth_seed": s, "run": str(run_dir), "seconds_this_call": round(seconds, 1),
                     "synthesize_seconds": made.get("synthesize"),
                     "export_seconds": made.get("export"), "synthesize": summary,
                     "files": {n: {"test": rows[n].accuracy, "val": rows[n].val_accuracy,
                                   "calibration": rows[n].calibration} for n in files}})

    table = {}
    for n in files:
        loss_test = [100 * (real[n].accuracy - r["files"][n]["test"]) for r in runs]
        loss_val = [100 * (real[n].val_accuracy - r["files"][n]["val"]) for r in runs]
        table[n] = {"real_test": real[n].accuracy, "real_val": real[n].val_accuracy,
                    "loss_test_pp": _mean_std(loss_test), "loss_val_pp": _mean_std(loss_val),
                    "loss_test_pp_per_seed": loss_test, "loss_val_pp_per_seed": loss_val}
    met = all(t["loss_test_pp"][0] <= MAX_CALIBRATION_LOSS_PP for t in table.values())
    print(f"\n{'file':<22} {'real test %':>11} {'loss test pp':>16} {'loss val pp':>16}")
    for n, t in table.items():
        def pm(v):
            return f"{v[0]:+.2f}" + (f" ± {v[1]:.2f}" if v[1] is not None else "")
        print(f"{n:<22} {100 * t['real_test']:>11.2f} {pm(t['loss_test_pp']):>16} {pm(t['loss_val_pp']):>16}")
    print(f"\ntarget: every file loses ≤ {MAX_CALIBRATION_LOSS_PP} pp on average over synthesis seeds "
          f"{args.synth_seeds}: {'met' if met else 'MISSED'}")

    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    results.setdefault("calibration", {})[args.tag] = {
        "command": " ".join(["python benchmarks/datafree.py", *(argv if argv is not None else sys.argv[1:])]),
        "dataset": "fashion_mnist (built in); losses are real-calibrated minus synthetic-calibrated accuracy",
        "seed": args.seed, "synth_seeds": args.synth_seeds, "overrides": args.overrides,
        "real_run": {"run": str(real_dir), "seconds_this_call": round(real_seconds, 1),
                     "stage_seconds": _made_in(real_dir)},
        "runs": runs, "files": table,
        "target_met": met}
    if args.tag == "default":
        results.setdefault("targets", {})[f"int8 calibrated on synthetic images loses <= "
                                           f"{MAX_CALIBRATION_LOSS_PP} pp (default run)"] = met
    write_json(RESULTS, results)
    print(f"wrote {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
