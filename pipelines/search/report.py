"""The search folder: search.json, search.csv, search.md, pareto.png, and for the chosen candidate its bundle and
a recipe that reproduces it alone with ``pipelines.compress``."""
from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import io

from edge_kd.bench.stats import KB
from pipelines.search.strategy import Outcome, Search

_CSV_FIELDS = ("candidate", "student", "sparsity", "variant", "loss", "status", "rung", "epochs", "run",
               "val_accuracy", "test_accuracy", "size_bytes", "gzip_bytes", "latency_ms", "min_runtime", "seconds",
               "trained", "meets_target", "predicted_size_bytes", "predicted_gzip_bytes", "predicted_latency_ms")


def summary(search: Search, cands, outcome: Outcome) -> dict:
    """Returns what search.json holds."""
    spec = search.spec
    chosen = outcome.chosen
    given = (f"target_accuracy {spec.target_accuracy:g}" if spec.target_accuracy is not None else
             f"max_drop {spec.max_drop:g} points below the teacher's validation accuracy "
             + (f"{outcome.teacher_val:.4f}" if outcome.teacher_val is not None else "(no run finished)"))
    out = {
        "command": search.command,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "target": {"split": "validation", "accuracy": outcome.target, "given": given,
                   "teacher_val_accuracy": outcome.teacher_val},
        "objective": spec.objective,
        "constraints": {"max_kb": spec.max_kb, "max_latency_ms": spec.max_latency_ms, "min_runtime": spec.min_runtime},
        "budget": {"max_candidates": spec.max_candidates, "max_minutes": spec.max_minutes, "rungs": spec.rungs,
                   "eta": spec.eta, "stopped": outcome.budget_stop},
        "latency_threads": search.threads,
        "space_size": len(cands),
        "runs_trained": outcome.runs_trained,
        "wall_seconds": round(outcome.seconds, 1),
        "chosen": None,
        "candidates": [],
    }
    for c in cands:
        runs = [dataclasses.asdict(r) for r in search.results.get(c.key, [])]
        if c.key in outcome.final_latency and runs:
            runs[-1]["latency_ms_together"] = outcome.final_latency[c.key]
        out["candidates"].append({"index": c.index, "key": c.key, "label": c.label, "settings": c.settings,
                                  "predicted": c.predicted, "status": search.status.get(c.key, ""), "runs": runs})
    if chosen is not None:
        res = search.results[chosen.key][-1]
        out["chosen"] = {"label": chosen.label, "settings": chosen.settings, "run": res.run, "model": res.model,
                         "file": f"{res.run}/{res.path}", "val_accuracy": res.val_accuracy,
                         "test_accuracy": res.accuracy, "size_bytes": res.size_bytes, "gzip_bytes": res.gzip_bytes,
                         "latency_ms": outcome.final_latency.get(chosen.key, res.latency_ms),
                         "min_runtime": res.min_runtime, "bundle": "bundle", "recipe": "recipe.yaml"}
    return out


def closest(results: dict, n: int = 3) -> list[dict]:
    """Returns the ``n`` candidates whose latest run came nearest the target (highest validation accuracy)."""
    tried = [c for c in results["candidates"] if c["runs"]]
    return sorted(tried, key=lambda c: -c["runs"][-1]["val_accuracy"])[:n]


def describe(c: dict) -> str:
    """One candidate's latest run in a line."""
    r = c["runs"][-1]
    return (f"{c['label']}: val {r['val_accuracy']:.2%}, test {r['accuracy']:.2%}, {r['size_bytes'] / KB:.1f} KB, "
            f"{r.get('latency_ms_together', r['latency_ms']):.3f} ms (rung {r['rung'] + 1})")


def csv_text(results: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(_CSV_FIELDS)
    for c in results["candidates"]:
        s, p = c["settings"], c["predicted"]
        head = [c["label"], f"{s['student']['arch']} {s['student']['options']}", s["sparsity"], s["variant"],
                "" if s["loss"] is None else s["loss"], c["status"]]
        tail = [p.get("size_bytes"), p.get("gzip_bytes"), p.get("latency_ms")]
        for r in c["runs"] or [None]:
            body = ([r["rung"] + 1, r["epochs"].get("distill", ""), r["run"], r["val_accuracy"], r["accuracy"],
                     r["size_bytes"], r["gzip_bytes"], r.get("latency_ms_together", r["latency_ms"]), r["min_runtime"],
                     r["seconds"], r["trained"], r["meets_target"]] if r else [""] * 12)
            w.writerow(["" if v is None else v for v in head + body + tail])
    return buf.getvalue()


def markdown(results: dict) -> str:
    t, ch = results["target"], results["chosen"]
    cons = ", ".join(f"{k} {v}" for k, v in results["constraints"].items() if v is not None) or "none"
    at = "the target" if t["accuracy"] is None else f"validation accuracy >= {t['accuracy']:.2%}"
    lines = [f"# edge-kd search: the smallest {results['objective']} at {at}", "",
             f"- command: `{results['command']}`",
             f"- target: {t['given']}; chosen on the **validation** split (LiteRT, whole split); the test split is "
             "reported beside it, never chosen on",
             f"- constraints: {cons}; latency: batch 1, {results['latency_threads']} thread(s)",
             f"- {results['space_size']} candidates in the space; {results['runs_trained']} runs trained in "
             f"{results['wall_seconds'] / 60:.1f} min (this invocation; cached runs are not retrained)"]
    if results["budget"]["stopped"]:
        lines.append(f"- stopped early: {results['budget']['stopped']}")
    if ch:
        lines += ["", f"**Chosen: {ch['label']}**: val {ch['val_accuracy']:.2%}, test {ch['test_accuracy']:.2%}, "
                      f"{ch['size_bytes']:,} bytes ({ch['size_bytes'] / KB:.1f} KB, gzip {ch['gzip_bytes'] / KB:.1f} KB), "
                      f"{ch['latency_ms']:.3f} ms, TFLite >= {ch['min_runtime']}. Its bundle is `bundle/`; "
                      "`python -m pipelines.compress --recipe recipe.yaml` trains it alone."]
    else:
        lines += ["", "**No candidate met the target.** The closest:"]
        lines += [f"- {describe(c)}" for c in closest(results)]
    lines += ["", "| candidate | status | rung | distill epochs | val % | test % | KB | gzip KB | ms | runtime | s |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for c in results["candidates"]:
        if not c["runs"]:
            p = c["predicted"]
            lat = "" if p.get("latency_ms") is None else f"{p['latency_ms']:.3f}*"
            lines.append(f"| {c['label']} | {c['status']} | | | | | {p['size_bytes'] / KB:.1f}* | "
                         f"{p['gzip_bytes'] / KB:.1f}* | {lat} | {p['min_runtime']}* | |")
            continue
        r = c["runs"][-1]
        lines.append(f"| {c['label']} | {c['status']} | {r['rung'] + 1} | {r['epochs'].get('distill', '')} | "
                     f"{r['val_accuracy'] * 100:.2f} | {r['accuracy'] * 100:.2f} | {r['size_bytes'] / KB:.1f} | "
                     f"{r['gzip_bytes'] / KB:.1f} | {r.get('latency_ms_together', r['latency_ms']):.3f} | "
                     f"{r['min_runtime']} | {r['seconds']:.0f} |")
    lines += ["", "\\* measured on the untrained graph before training (the candidate was not trained)."]
    return "\n".join(lines) + "\n"


def pareto_png(results: dict) -> bytes:
    """Returns PNG bytes: validation accuracy against size and against latency, each candidate's latest run, the
    Pareto front of the last rung, the target line and the chosen candidate."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from edge_kd.report.report import pareto_front

    fig = Figure(figsize=(13, 5.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    last = results["budget"]["rungs"] - 1
    chosen = results["chosen"]["label"] if results["chosen"] else None
    for ax, (xlabel, cost) in zip(axes, (("size (KB)", lambda r: r["size_bytes"] / KB),
                                         (f"latency, batch 1, {results['latency_threads']} thread(s) (ms)",
                                          lambda r: r.get("latency_ms_together", r["latency_ms"])))):
        points = [(cost(c["runs"][-1]), c["runs"][-1]["val_accuracy"] * 100, c) for c in results["candidates"]
                  if c["runs"]]
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation accuracy, LiteRT (%)")
        ax.grid(True, alpha=0.3)
        full = [p for p in points if p[2]["runs"][-1]["rung"] == last]
        short = [p for p in points if p[2]["runs"][-1]["rung"] != last]
        if short:
            ax.scatter([p[0] for p in short], [p[1] for p in short], facecolors="none", edgecolors="tab:gray", s=40,
                       label="stopped after a short rung")
        if full:
            ax.scatter([p[0] for p in full], [p[1] for p in full], c="tab:blue", s=40, zorder=3,
                       label="trained to the end")
            front = pareto_front(full)
            ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="black", alpha=0.6,
                    label="Pareto front (trained to the end)")
        for x, y, c in points:
            ax.annotate(c["label"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
            if c["label"] == chosen:
                ax.scatter([x], [y], marker="*", s=220, c="tab:orange", zorder=4, label="chosen")
        if results["target"]["accuracy"] is not None:
            ax.axhline(results["target"]["accuracy"] * 100, color="tab:red", linestyle="--",
                       label=f"target {results['target']['accuracy']:.2%}")
        if not points:
            ax.text(0.5, 0.5, "no candidate trained", ha="center", va="center", transform=ax.transAxes)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"edge-kd search: {results['objective']} objective")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def write(search: Search, cands, outcome: Outcome) -> dict:
    """Writes the search folder: the chosen candidate's bundle (swapped in whole) and recipe first, then the tables,
    the plot and, last, search.json, each file atomically; returns what search.json holds."""
    import shutil

    import yaml

    from edge_kd.fileio import staging_dir, swap_dir, write_bytes, write_json, write_text

    results = summary(search, cands, outcome)
    root = search.root
    if outcome.chosen is not None:
        res = search.results[outcome.chosen.key][-1]
        work = staging_dir(root / "bundle")
        try:
            shutil.copytree(root / res.run / "bundle", work, dirs_exist_ok=True)
            swap_dir(work, root / "bundle")
        finally:
            shutil.rmtree(work, ignore_errors=True)
        raw = outcome.chosen.rung_recipe(1.0, search.spec.rungs - 1)
        raw["name"] = outcome.chosen.slug
        raw["stages"]["bundle"]["min_runtime"] = search.spec.min_runtime  # what the search checked it against
        write_text(root / "recipe.yaml",
                   f"# {outcome.chosen.label}: the candidate `{search.command}` chose; "
                   "`python -m pipelines.compress --recipe <this file>` trains it alone\n"
                   + yaml.safe_dump(raw, sort_keys=False))
    else:
        (root / "recipe.yaml").unlink(missing_ok=True)
        shutil.rmtree(root / "bundle", ignore_errors=True)
    write_text(root / "search.csv", csv_text(results))
    write_text(root / "search.md", markdown(results))
    write_bytes(root / "pareto.png", pareto_png(results))
    write_json(root / "search.json", results)
    return results
