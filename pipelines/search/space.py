"""The search space: one candidate recipe per point (student × loss × sparsity × variant), and what each costs.

A candidate is the search's recipe with its point applied, made an ordinary ``pipelines.compress``
recipe: its last student stage exported in the candidate's variant only, benchmarked on the
validation split too (the search chooses on it), bundled, and without the baseline stage (a
search compares candidates, not a student with itself untaught). int8 ships the QAT stage's file
where the recipe has one; the other variants ship the stage before it, as QAT exists to make an
int8 file.

``predict`` measures what a candidate costs before anything trains: its file's size, gzip size,
latency and minimum runtime depend on its graph, not on what training puts in it, so they are
measured on the candidate's untrained student (pruned by weight magnitude for the gzip size).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import re
from pathlib import Path

from edge_kd.errors import UserError
from pipelines import registry
from pipelines.fingerprint import fingerprint
from pipelines.search.spec import SearchSpec

@dataclasses.dataclass
class Candidate:
    """One point of the space: its settings, its name, and the recipe that trains it to the end."""

    index: int  # its place in the space as declared (ties of cost keep this order)
    settings: dict  # {student: {arch, options}, loss, sparsity, variant}
    label: str  # for people: "cnn width 0.75 · sparsity 0.75 · int8"
    slug: str  # for folder names: "cnn-w0.75-s0.75-int8"
    recipe: dict  # the full-length candidate recipe, as plain data, without its name
    key: str  # fingerprint of that recipe
    predicted: dict = dataclasses.field(default_factory=dict)  # size_bytes, gzip_bytes, latency_ms, min_runtime

    def rung_recipe(self, factor: float, rung: int) -> dict:
        """Returns the candidate's recipe for a rung whose training stages run ``factor`` of their epochs."""
        raw = copy.deepcopy(self.recipe)
        for name in registry.student_stages():  # the stages whose epochs a short rung shortens
            stage = raw["stages"].get(name)
            if stage and factor < 1:
                stage["epochs"] = max(1, int(round(stage["epochs"] * factor)))
        raw["name"] = f"{self.slug}-r{rung}-{self.key[:8]}"
        return raw


def candidates(recipe, spec: SearchSpec) -> list[Candidate]:
    """Returns the candidates of ``recipe``'s search space, each validated as a recipe (a UserError names the one
    that is not)."""
    import itertools

    from pipelines import recipe as recipe_mod

    base = recipe.to_dict()
    base.pop("search", None)
    base.pop("name", None)
    students = _students(recipe, spec)
    has_prune = "prune" in recipe.stages.enabled()
    sparsities = spec.sparsity if spec.sparsity is not None else ([0.5, 0.75] if has_prune else [0.0])
    for i, loss in enumerate(spec.losses):
        if not isinstance(loss, dict) or set(loss) - {"hard_weight", "terms"} or not loss:
            raise UserError(f"search.losses.{i} must be a mapping of hard_weight and/or terms (as in the distillation "
                            f"section), got {loss!r}")
    losses = spec.losses or [None]
    out = []
    points = itertools.product(students, enumerate(losses), sparsities, spec.variants)
    for student, (li, loss), sparsity, variant in points:
        raw = _apply(base, student, loss, sparsity, variant)
        settings = {"student": student, "loss": li if loss is not None else None, "sparsity": sparsity,
                    "variant": variant}
        label, slug = _names(recipe, student, li if len(losses) > 1 else None, sparsity, variant)
        try:
            recipe_mod.from_dict({**raw, "name": "candidate"})
        except UserError as e:
            raise UserError(f"search candidate {label}: {e}") from None
        key = fingerprint(raw)
        if any(c.key == key for c in out):  # the same recipe twice (widths [1, 1.0], hidden sizes at their floor)
            continue
        out.append(Candidate(len(out), settings, label, slug, raw, key))
    return out


def _students(recipe, spec: SearchSpec) -> list[dict]:
    import models

    if spec.students is not None:
        out = []
        for i, s in enumerate(spec.students):
            arch = s.arch or recipe.student.arch
            options = s.options if (s.arch or s.options) else recipe.student.options
            models.check_options(arch, options, f"search.students.{i}")
            out.append({"arch": arch, "options": dict(options), "weights": s.weights})
        return out
    if recipe.student.path is not None:
        raise UserError("the search varies registry students (student.arch and its width); student.path is one fixed "
                        "model: give search.students, or run python -m pipelines.compress")
    arch, options, weights = recipe.student.arch, dict(recipe.student.options), recipe.student.weights
    known = models.options_of(arch)
    if "width" in known:  # at 1 the recipe's own options, as given: the same fingerprints as its run
        return [{"arch": arch, "options": options, "weights": weights} if w == 1 else  # other widths: new weights
                {"arch": arch, "options": {**options, "width": round(options.get("width", 1.0) * w, 4)}, "weights": None}
                for w in spec.widths]
    if "hidden" in known:
        import inspect

        hidden = options.get("hidden") or inspect.signature(models._REGISTRY[arch]).parameters["hidden"].default
        return [{"arch": arch, "options": options, "weights": weights} if w == 1 else
                {"arch": arch, "options": {**options, "hidden": [max(4, int(round(h * w))) for h in hidden]},
                 "weights": None}
                for w in spec.widths]
    raise UserError(f"search.widths: student '{arch}' has no width or hidden option to scale; list the students "
                    "to try in search.students instead")


def _apply(base: dict, student: dict, loss, sparsity: float, variant: str) -> dict:
    raw = copy.deepcopy(base)
    stages = raw["stages"]
    raw["student"] = copy.deepcopy(student)
    if loss is not None:
        raw["distillation"].update(copy.deepcopy(loss))
    if sparsity == 0:
        stages.pop("prune", None)
    else:
        stages["prune"] = {**(stages.get("prune") or {}), "target_sparsity": sparsity, "enabled": True}
    if variant != "int8":
        stages.pop("qat", None)  # a QAT model exists to become int8 (its export makes int8 only)
    stages.pop("baseline", None)
    export = stages.setdefault("export", {})
    export.update(variants=[variant], models="final")
    if variant == "int8_mixed" and not export.get("float_layers") and not export.get("float_worst"):
        export["float_worst"] = 1
    stages.setdefault("benchmark", {})["validation"] = True
    # the bundle of the one file (min_runtime is the search's own check: a file that misses it is a candidate
    # that breaks a constraint, not a run that fails)
    stages["bundle"] = {**(stages.get("bundle") or {}), "pick": None, "min_runtime": None, "enabled": True}
    stages.setdefault("report", {})
    return raw


def _names(recipe, student, loss_index, sparsity, variant) -> tuple[str, str]:
    base = recipe.student.options
    arch = student["arch"]
    changed = {k: v for k, v in student["options"].items() if arch != recipe.student.arch or base.get(k) != v}
    opts = " ".join(f"{k} {_short(v)}" for k, v in changed.items())
    label = " · ".join(x for x in (f"{arch} {opts or '(recipe)'}", f"sparsity {sparsity:g}" if sparsity else "no pruning",
                                   variant, None if loss_index is None else f"loss {loss_index}") if x)
    slug_opts = "-".join(f"{k[0]}{_short(v).replace(' ', '')}" for k, v in changed.items())
    slug = "-".join(x for x in (arch, slug_opts, f"s{sparsity:g}", variant,
                                None if loss_index is None else f"l{loss_index}") if x)
    return label, re.sub(r"[^A-Za-z0-9._-]+", "_", slug)[:80]


def _short(v) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_short(x) for x in v) + "]"
    return f"{v:g}" if isinstance(v, float) else str(v)


# -- what a candidate costs, before it trains --------------------------------------------------------------
#: the layout of the cost cache (search/predicted.json); another one is measured again
CACHE_VERSION = 2


def predict(cands: list[Candidate], data, threads: int, need_latency: bool, cache: Path, stream,
            timing: dict | None = None) -> None:
    """Fills each candidate's ``predicted`` cost from its untrained student's TFLite file.

    Size, latency and minimum runtime depend on the graph (student and variant), not on the weights: one file
    per graph. The gzip size depends on the zeros pruning leaves: the same weights with the smallest of each
    kernel zeroed at the candidate's sparsity. Latency is measured for every graph together, in interleaved
    rounds (``timing``: rounds, round_seconds, warmup_seconds; the benchmark stage's), batch 1 at ``threads``.
    What was measured is kept in ``cache`` (JSON), so a resumed search keeps its order; when a candidate is
    missing there, every graph is measured again, together.
    """
    import tempfile

    import models
    from edge_kd.bench import compat, litert, stats
    from edge_kd.export import tflite
    from edge_kd.fileio import write_json
    from edge_kd.keras import keras

    saved = json.loads(cache.read_text()) if cache.is_file() else {}
    known = saved.get("candidates", {}) if saved.get("version") == CACHE_VERSION else {}
    if all(c.key in known and (not need_latency or known[c.key]["latency_ms"] is not None) for c in cands):
        for c in cands:
            c.predicted = {k: v for k, v in known[c.key].items() if k != "graph"}
        return
    print(f"measuring the cost of {len(cands)} candidate(s) on their untrained graphs ...", file=stream, flush=True)
    info = data.info
    rep, _ = data.first("train", 64)

    def graph_of(c):
        variant = "int8" if c.settings["variant"] == "int8_mixed" else c.settings["variant"]  # its float layer is
        return json.dumps([c.settings["student"], variant], sort_keys=True), variant  # not known before training

    files, costs = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for graph in dict.fromkeys(graph_of(c)[0] for c in cands):
            members = [c for c in cands if graph_of(c)[0] == graph]
            c0, variant = members[0], graph_of(members[0])[1]
            keras.utils.set_random_seed(c0.recipe["seed"])
            student = c0.settings["student"]
            model = models.build(student["arch"], info.input_shape, info.num_classes, **student["options"])
            weights = model.get_weights()

            def convert(sparsity):
                model.set_weights(weights)
                if sparsity:
                    _zero_smallest(model, sparsity)
                return tflite.convert(model, variant, representative=rep if variant in tflite.CALIBRATED else None,
                                      int8_io=c0.recipe["stages"]["export"].get("int8_io", True))

            flat = convert(0.0)
            files[graph] = Path(tmp) / f"g{len(files)}.tflite"
            files[graph].write_bytes(flat)
            gzip_of = {}
            for sparsity in dict.fromkeys(c.settings["sparsity"] for c in members):
                path = Path(tmp) / "sparse.tflite"
                path.write_bytes(convert(sparsity) if sparsity else flat)
                gzip_of[sparsity] = stats.file_sizes(path)[1]
            costs[graph] = {"size_bytes": len(flat), "min_runtime": compat.runtime(flat)["min_runtime"],
                            "gzip": gzip_of}
        timed = {}
        if need_latency:
            t = {"rounds": 10, "round_seconds": 0.05, "warmup_seconds": 0.25, **(timing or {})}
            timed = litert.latency_rounds(files, rep[0], [threads], **t)
    for c in cands:
        graph, variant = graph_of(c)
        g = costs[graph]
        known[c.key] = {"size_bytes": g["size_bytes"], "gzip_bytes": g["gzip"][c.settings["sparsity"]],
                        "latency_ms": timed[graph][str(threads)]["median_ms"] if timed else None,
                        "min_runtime": g["min_runtime"],
                        "estimated_as": variant if variant != c.settings["variant"] else None, "graph": graph}
        c.predicted = {k: v for k, v in known[c.key].items() if k != "graph"}
    write_json(cache, {"version": CACHE_VERSION, "candidates": known})


def _zero_smallest(model, sparsity: float) -> None:
    """Zeroes the ``sparsity`` fraction of smallest-magnitude weights of each conv and dense kernel (what magnitude
    pruning leaves)."""
    import numpy as np

    for layer in model.layers:
        kernel = getattr(layer, "kernel", None)
        if kernel is None or kernel.shape.rank < 2:
            continue
        w = kernel.numpy()
        cut = np.quantile(np.abs(w), sparsity)
        kernel.assign(np.where(np.abs(w) <= cut, 0.0, w).astype(w.dtype))
