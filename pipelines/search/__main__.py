"""python -m pipelines.search: the smallest (or fastest) model that still meets your accuracy, found for you.

Trains candidates of the recipe's search space (its `search` section, or the default space: the
student at four widths, pruned to 50 % and 75 %, as int8, int16x8, dynamic-range and int8 with its
worst layer in float) by successive halving, cheapest first, and picks the cheapest whose int8 (or
other) file reaches the target on the validation split, measured with LiteRT. Writes
<out>/search/: search.json, search.csv, search.md, pareto.png, the chosen model's bundle and a
recipe that trains it alone. Every candidate is a cached run: rerun the same command to resume.
Exit status: 0 found, 1 no candidate meets the target (the closest are shown), 2 a mistake in the
settings (before anything trains), 130 interrupted.
"""
from __future__ import annotations

import argparse
import sys

from edge_kd.errors import UserError

PROG = "python -m pipelines.search"

#: option -> the search key it sets
_KEYS = {"target_accuracy": "target_accuracy", "max_drop": "max_drop", "max_kb": "max_kb",
         "max_latency_ms": "max_latency_ms", "min_runtime": "min_runtime", "objective": "objective",
         "max_candidates": "max_candidates", "max_minutes": "max_minutes"}


def build_parser() -> argparse.ArgumentParser:
    from pipelines.compress import _Parser

    p = _Parser(prog=PROG, description=__doc__.split("\n\n")[1].replace("\n", " "),
                epilog="The options set keys of the recipe's search section (shown in brackets) and override it. "
                       "Exit status: 0 found, 1 no candidate meets the target, 2 a mistake in the settings, "
                       "130 interrupted.")
    p.add_argument("--recipe", metavar="YAML", help="the recipe whose search space is searched: a YAML file or a "
                   "shipped recipe's name (default: fashion_mnist)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override a recipe key as in pipelines.compress, e.g. --set search.widths=[0.5,1] "
                        "--set distill.epochs=6 (repeatable)")
    p.add_argument("--out", default="tflite_out", metavar="DIR",
                   help="the search writes DIR/search/ (default: tflite_out)")
    g = p.add_argument_group("the target (one of them), on the validation split")
    g.add_argument("--target-accuracy", type=float, metavar="FRACTION",
                   help="[search.target_accuracy] the shipped file's accuracy must be at least this, e.g. 0.90")
    g.add_argument("--max-drop", type=float, metavar="POINTS",
                   help="[search.max_drop] at most this many percentage points below the teacher, e.g. 1.0")
    g = p.add_argument_group("constraints on the shipped file")
    g.add_argument("--max-kb", type=float, metavar="KB", help="[search.max_kb] file size at most this (1 KB = 1024 B)")
    g.add_argument("--max-latency-ms", type=float, metavar="MS",
                   help="[search.max_latency_ms] LiteRT latency, batch 1, at the benchmark's first thread count")
    g.add_argument("--min-runtime", metavar="VERSION",
                   help="[search.min_runtime] the file must load on this TFLite runtime, e.g. 2.14")
    g = p.add_argument_group("objective and budget")
    g.add_argument("--objective", choices=("size", "latency", "gzip"),
                   help="[search.objective] what smallest means: file size (default), latency, or gzip size")
    g.add_argument("--max-candidates", type=int, metavar="N", help="[search.max_candidates] train at most N points "
                   "of the space (spread over the cost order; default 24)")
    g.add_argument("--max-minutes", type=float, metavar="MIN",
                   help="[search.max_minutes] start no candidate run that would end after this much wall time of "
                        "this invocation (judged by the last run of its rung)")
    return p


def load(args):
    """Returns (the recipe with the options applied, its search spec, validated)."""
    import json

    from pipelines import recipe as recipe_mod

    r = recipe_mod.load(args.recipe)
    sets = [f"search.{key}={json.dumps(getattr(args, attr))}" for attr, key in _KEYS.items()
            if getattr(args, attr) is not None]
    # one target on the command line replaces the recipe's, whichever kind it was
    if (args.target_accuracy is None) != (args.max_drop is None):
        sets.append(f"search.{'max_drop' if args.target_accuracy is not None else 'target_accuracy'}=null")
    r = recipe_mod.apply_overrides(r, list(args.overrides) + sets)
    from edge_kd.data import SYNTHETIC

    if r.data.source == SYNTHETIC:
        raise UserError("a search measures each candidate on training and test images, and data.source synthetic has "
                        "no training images: run the data-free recipe with python -m pipelines.compress")
    if r.training.strategy == "multi_worker":
        raise UserError("a search runs on one host: training.strategy multi_worker is for python -m "
                        "pipelines.compress (one recipe as one job); use none or mirrored here")
    spec = r.search
    if spec is None:
        from pipelines.search.spec import SearchSpec

        spec = SearchSpec()
    if (spec.target_accuracy is None) == (spec.max_drop is None):
        raise UserError("give the target: --target-accuracy (e.g. 0.90) or --max-drop (points below the teacher), "
                        "one of them" + (", not both" if spec.target_accuracy is not None else ""))
    if spec.max_drop is not None and r.teacher is None:
        raise UserError("--max-drop is counted from the teacher's accuracy, but the recipe has no teacher; give "
                        "--target-accuracy")
    return r, spec


def main(argv=None, quiet_native: bool = False) -> int:
    """Runs the command; returns its exit status."""
    from pipelines.compress import run_command

    args = build_parser().parse_args(argv)
    command = " ".join([PROG, *(argv if argv is not None else sys.argv[1:])])

    def body(native_log):
        recipe, spec = load(args)
        from pipelines.run import holding
        from pipelines.search.strategy import Search

        search = Search(recipe, spec, args.out, command, sys.stdout)
        with holding(search.root, command, instead="another --out"):  # one search per folder; its candidate runs each hold their own
            return _search(search, spec)

    return run_command(PROG, body, quiet_native, kept="finished runs, stages and epochs")


def _search(search, spec) -> int:
    """Runs ``search`` to its end; returns the command's exit status."""
    from pipelines.search import report, space

    cands = space.candidates(search.recipe, spec)
    todo, excluded, not_tried = search.prepare(cands)
    print(f"{len(cands)} candidates; {len(excluded)} excluded by the constraints before training, "
          f"{len(not_tried)} beyond max_candidates; training up to {len(todo)} by {spec.objective}, cheapest "
          f"first, in {spec.rungs} rung(s)", flush=True)
    outcome = search.run(todo) if todo else None
    if outcome is None:
        from pipelines.search.strategy import Outcome

        outcome = Outcome(None, spec.target_accuracy, None)
    results = report.write(search, cands, outcome)
    print(f"search: {search.root / 'search.md'}  (results: {search.root / 'search.json'})", flush=True)
    if not todo:
        print(f"{PROG}: no candidate met the target: every candidate breaks a constraint before training:",
              file=sys.stderr)
        for c, reason in excluded[:5]:
            print(f"  {c.label}: {reason}", file=sys.stderr)
        return 1
    if outcome.chosen is None:
        why = f"; stopped: {outcome.budget_stop}" if outcome.budget_stop else ""
        target = ("the target (no run finished to measure the teacher)" if outcome.target is None
                  else f"validation accuracy >= {outcome.target:.2%}")
        near = report.closest(results)
        print(f"{PROG}: no candidate met {target} within the constraints{why}. "
              + ("The closest:" if near else "No candidate run finished."), file=sys.stderr)
        for c in near:
            print(f"  {report.describe(c)}", file=sys.stderr)
        return 1
    ch = results["chosen"]
    print(f"chosen: {ch['label']}: val {ch['val_accuracy']:.2%}, test {ch['test_accuracy']:.2%}, "
          f"{ch['size_bytes']:,} bytes, {ch['latency_ms']:.3f} ms; bundle: {search.root / 'bundle'}; recipe: "
          f"{search.root / 'recipe.yaml'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(quiet_native=True))
