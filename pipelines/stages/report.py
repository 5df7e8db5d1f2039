"""The report stage: report.md, results.json, results.csv, pareto.png and layer_error.png, copied to the run's top."""
from __future__ import annotations

from edge_kd.data import SYNTHETIC
from pipelines import run_data, run_keys
from pipelines.stage import Stage

PUBLISHED = ("report.md", "results.json", "results.csv", "pareto.png", "layer_error.png", "synthetic.png")


class Report(Stage):
    name = "report"
    required = True
    shareable = False  # it names its run (its folder, command, recipe)

    def title(self, recipe):
        return "write report"

    def reads(self, ctx):
        return ["benchmark", *[n for n in ("bundle", "synthesize") if n in ctx.enabled()]]

    def run(self, ctx, out):
        import datetime as dt
        import json
        import os

        from edge_kd.bench.results import rows_of
        from edge_kd.fileio import write_bytes
        from edge_kd.report import report

        r, b = ctx.recipe, run_data.load(ctx)
        info = b.info
        bench = json.loads((ctx.stage_dir("benchmark") / "models.json").read_text())
        histories, summaries = {}, {}
        for stage in ctx.enabled():
            h = ctx.stage_dir(stage) / "history.json"
            if h.is_file():
                histories[stage] = json.loads(h.read_text())
            summaries[stage] = ctx.manifests.get(stage, {}).get("summary", {})
        results = {
            "run": ctx.run_dir.name, "command": ctx.command,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "data": {"name": info.name, "num_classes": info.num_classes, "input_shape": list(info.input_shape),
                     "class_names": list(info.class_names), "train_size": b.count("train"),
                     "val_size": b.count("val"), "test_size": b.count("test"),
                     "majority_fraction": majority_fraction(b.labels("test")),
                     # a run without training images: the source of its test split (null: it has none)
                     **({"test_source": r.data.test} if r.data.source == SYNTHETIC else {})},
            "teacher": bench["teacher"],
            "distillation": distillation_summary(r, None if r.training.mixed_precision is False
                                                 else run_keys.mixed_policy(ctx) or "float32"),
            "stages": ctx.enabled(),
            "stage_summaries": summaries,
            "bundle": ({"path": os.path.relpath(ctx.stage_dir("bundle"), ctx.run_dir), **summaries.get("bundle", {})}
                       if "bundle" in ctx.enabled() else None),
            "runtime": bench["runtime"],
            "models": rows_of(bench["models"]),
            "history": histories,
        }
        report.write_report(out, results)
        if "synthesize" in ctx.enabled():  # the grid of synthetic images report.md shows
            write_bytes(out / "synthetic.png", (ctx.stage_dir("synthesize") / "grid.png").read_bytes())
        return {"published": list(PUBLISHED)}


    def publish(self, ctx):
        """Copies the report's files to the run folder's top level, where a user looks for them."""
        from edge_kd.fileio import write_bytes

        src = ctx.stage_dir(self.name)
        for name in PUBLISHED:
            f, dst = src / name, ctx.run_dir / name
            if f.is_file() and (not dst.is_file() or dst.read_bytes() != f.read_bytes()):
                write_bytes(dst, f.read_bytes())


def majority_fraction(labels) -> float:
    """Returns the share of ``labels`` that are the most frequent class (what always answering it scores)."""
    import numpy as np

    labels = np.asarray(labels, np.int64).ravel()
    return float(np.bincount(labels).max() / len(labels)) if len(labels) else 0.0


def distillation_summary(r, precision: str | None = None):
    """Returns the distillation settings the report states beside its gain, or None when the run did not distil;
    ``precision``: the policy the distilled student and the student alone trained under (mixed precision on)."""
    if not r.distils("distill"):
        return None
    dist = r.distillation
    d = {"mode": dist.mode, "hard_weight": dist.hard_weight}
    if dist.extra_teachers:
        d.update(teachers=1 + len(dist.extra_teachers), combine=dist.combine)
    if dist.mode == "mean_teacher":
        d["ema_decay"] = dist.ema_decay
    if dist.mode == "mutual":
        d["peers"] = ", ".join(p["arch"] for p in r.peer_specs())
    for t in dist.terms:
        d.update({(k if k != "weight" else f"{t['name']}_weight"): v for k, v in t.items() if k != "name"})
        d["loss"] = "+".join(x["name"] for x in dist.terms)
    d["epochs"] = r.stages.distill.epochs
    if r.stages.distill.start == "companion":
        d["start"] = "the generator's companion student"
    if dist.mode == "teacher":
        d["teacher view"] = ("consistent" if dist.consistent else "fixed") + (
            ", averaged with its mirror image" if r.teacher is not None and r.teacher.flip_average else "")
    aug = r.stages.distill.augment
    d["augment"] = ", ".join(f"{k} {v:g}" if not isinstance(v, bool) else k
                             for k, v in aug.model_dump().items() if v) or "none"
    if precision is not None:
        d["precision"] = precision
    return d
