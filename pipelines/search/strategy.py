"""The strategy: cheapest first, successive halving, an early exit, and the choice on the validation split.

1. Every candidate's cost (the objective: file size, latency or gzip size) is measured before it trains
   (``space.predict``); those that break a constraint (``max_kb``, ``max_latency_ms``, ``min_runtime``) are
   left out, and at most ``max_candidates`` remain, spread evenly over the cost order.
2. ``rungs`` rounds of successive halving: round k trains the remaining candidates, cheapest first, with
   1/eta^(rungs-1-k) of the recipe's epochs; once one meets the target in a round, the dearer ones are not
   trained in it (none of them can be the answer unless it fails later). The next round keeps 1/eta of
   the candidates trained: those that met the target, cheapest first, then the most accurate. The last
   round trains at the recipe's epochs.
3. Of the last round's candidates that meet the target and every constraint, measured on their trained
   files (latency: all of them again, in one interleaved measurement), the cheapest is chosen.

The target is on the validation split (LiteRT, the whole split): settings are chosen there, never on the
test split, which every candidate's run still measures and the search reports beside it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from pathlib import Path

from edge_kd import interrupt
from edge_kd.bench.stats import KB
from edge_kd.errors import UserError
from pipelines import registry
from pipelines.search.space import Candidate
from pipelines.search.spec import SearchSpec


@dataclasses.dataclass
class RungResult:
    """One candidate trained in one rung: what its run measured."""

    rung: int
    epochs: dict  # {stage: epochs}
    run: str  # its run folder, relative to the search folder
    val_accuracy: float
    accuracy: float  # test split
    size_bytes: int
    gzip_bytes: int
    latency_ms: float  # its run's benchmark, at the first thread count
    min_runtime: str | None
    model: str  # the shipped file's name in its run
    path: str  # and its path in the run folder
    seconds: float
    trained: bool  # a stage ran (False: every stage was cached, here or in the store)
    meets_target: bool = False


@dataclasses.dataclass
class Outcome:
    """What the search found."""

    chosen: Candidate | None
    target: float | None  # validation accuracy (fraction) a candidate must reach (max_drop: known once one ran)
    teacher_val: float | None
    budget_stop: str | None = None  # why the search stopped before its end, if it did
    runs_trained: int = 0
    seconds: float = 0.0
    final_latency: dict = dataclasses.field(default_factory=dict)  # {candidate key: ms}, measured together


def _recipe_key(raw: dict) -> str:
    """Returns one text per rung recipe (its dict, keys sorted)."""
    return json.dumps(raw, sort_keys=True, default=str)


def spread(ordered: list, n: int) -> tuple[list, list]:
    """Returns (``n`` of ``ordered`` spread evenly over it, its first and last included; the others)."""
    if len(ordered) <= n:
        return list(ordered), []
    import numpy as np

    picks = set(np.linspace(0, len(ordered) - 1, n).round().astype(int).tolist())
    return [c for i, c in enumerate(ordered) if i in picks], [c for i, c in enumerate(ordered) if i not in picks]


class Search:
    """One search: the recipe, its spec, the folder it writes (``<out>/search``), and its candidates."""

    def __init__(self, recipe, spec: SearchSpec, out: Path, command: str, stream):
        self.recipe, self.spec, self.command, self.stream = recipe, spec, command, stream
        self.root = Path(out) / "search"
        self.runs, self.store = self.root / "candidates", self.root / "store"
        self.threads = recipe.stages.benchmark.threads[0] if recipe.stages.benchmark else 1
        self.results: dict[str, list[RungResult]] = {}
        self.status: dict[str, str] = {}
        self.data = None
        self.preflown: set[str] = set()  # the rung recipes prepare checked: their runs need not check them again
        self.target = spec.target_accuracy
        self.teacher_val = None
        self.start = time.monotonic()

    # -- before anything trains ------------------------------------------------------------------------------
    def prepare(self, cands: list[Candidate]) -> tuple[list[Candidate], list, list]:
        """Loads the data, measures each candidate's cost, checks every candidate's inputs and settings as a run
        would (a UserError here is exit 2, before anything trains); returns (to train, excluded, not tried)."""
        from edge_kd import data as data_mod
        from edge_kd.bench.compat import loads_on
        from pipelines import recipe as recipe_mod
        from pipelines.context import Context
        from pipelines.run import check_out_folder, preflight
        from pipelines.search import space

        check_out_folder(self.root)
        self._by_key = {c.key: c for c in cands}
        self.data = data_mod.load_config(self.recipe.data, seed=self.recipe.seed)
        checked = set()
        for c in cands:  # one check per student and chain (QAT or not): the others differ in numbers only
            shape = json.dumps([c.settings["student"], c.settings["loss"], "qat" in c.recipe["stages"],
                                c.settings["sparsity"] > 0, c.settings["variant"] == "int8_mixed"], sort_keys=True)
            if shape in checked:
                continue
            checked.add(shape)
            for rung in sorted({0, self.spec.rungs - 1}):  # the shortest rung has the fewest steps to prune in
                raw = c.rung_recipe(float(self.spec.eta) ** -(self.spec.rungs - 1 - rung), rung)
                r = recipe_mod.from_dict(raw)
                try:
                    preflight(Context(r, self.runs / r.run_name(), self.command, data=self.data))
                except UserError as e:
                    raise UserError(f"search candidate {c.label}: {e}") from None
                self.preflown.add(_recipe_key(raw))
        self.root.mkdir(parents=True, exist_ok=True)
        need_latency = self.spec.objective == "latency" or self.spec.max_latency_ms is not None
        b = self.recipe.stages.benchmark
        space.predict(cands, self.data, self.threads, need_latency, self.root / "predicted.json", self.stream,
                      timing={"rounds": b.rounds, "round_seconds": b.min_seconds / b.rounds,
                              "warmup_seconds": b.warmup_seconds})
        kept, excluded = [], []
        for c in cands:
            p, why = c.predicted, []
            if self.spec.max_kb is not None and p["size_bytes"] > self.spec.max_kb * KB:
                why.append(f"file {p['size_bytes'] / KB:.1f} KB > {self.spec.max_kb:g} KB")
            # latency before training is a short measurement: only a clear miss is left out (the trained file is
            # checked again)
            if self.spec.max_latency_ms is not None and p["latency_ms"] > self.spec.max_latency_ms * 1.1:
                why.append(f"latency {p['latency_ms']:.3f} ms > {self.spec.max_latency_ms:g} ms")
            if self.spec.min_runtime is not None and not loads_on(p["min_runtime"], self.spec.min_runtime):
                why.append(f"needs TFLite {p['min_runtime']}, not {self.spec.min_runtime}")
            (excluded.append((c, "; ".join(why))) if why else kept.append(c))
        kept, not_tried = spread(sorted(kept, key=self.cost_order), self.spec.max_candidates)
        for c, why in excluded:
            self.status[c.key] = f"excluded before training: {why}"
        for c in not_tried:
            self.status[c.key] = f"not trained: beyond max_candidates {self.spec.max_candidates}"
        return kept, excluded, not_tried

    def cost(self, c: Candidate) -> float:
        """The candidate's objective before training (its untrained file's)."""
        return float(c.predicted[{"size": "size_bytes", "gzip": "gzip_bytes", "latency": "latency_ms"}[
            self.spec.objective]])

    def cost_order(self, c: Candidate):
        return self.cost(c), c.index

    # -- the rounds ---------------------------------------------------------------------------------------------
    def bound(self, met: Candidate) -> float:
        """Returns the predicted cost above which no candidate can beat ``met``, which meets the target.

        Sizes are predicted exactly or from below (an int8_mixed file as int8), so its measured size bounds them;
        gzip sizes (of untrained weights) and latencies (noisy) are not, so they get a 10 % margin, latency
        against its own prediction (the two measured together, before training).
        """
        if self.spec.objective == "latency":
            return self.cost(met) * 1.1
        return self.measured(met)[0] * (1.1 if self.spec.objective == "gzip" else 1.0)

    def run(self, cands: list[Candidate]) -> Outcome:
        """Runs the search over the prepared candidates ``cands``; returns its outcome."""
        spec, last = self.spec, self.spec.rungs - 1
        self.start = time.monotonic()
        deadline = self.start + spec.max_minutes * 60 if spec.max_minutes else math.inf
        cands = sorted(cands, key=self.cost_order)
        alive, reserve, budget_stop, trained_runs = list(cands), [], None, 0
        last_seconds: dict[int, float] = {}

        def budget_left(k: int) -> bool:
            """Whether a run of rung ``k`` fits the time left (judged by the last one of that rung, or eta times the
            last one of the rung before)."""
            nonlocal budget_stop
            left = deadline - time.monotonic()
            guess = last_seconds.get(k, last_seconds.get(k - 1, 0.0) * spec.eta)
            if left > 0 and guess <= left:
                return True
            budget_stop = (f"max_minutes {spec.max_minutes:g} would be passed in rung {k + 1} after "
                           f"{(time.monotonic() - self.start) / 60:.1f} min")
            return False

        def attempt(c: Candidate, k: int, where: str) -> RungResult | None:
            nonlocal trained_runs
            res = self.train(c, k, float(spec.eta) ** -(last - k), where)
            if res is not None:
                trained_runs += res.trained
                if res.trained:
                    last_seconds[k] = res.seconds
            return res

        for k in range(spec.rungs):
            met, trained = None, []
            for i, c in enumerate(alive, 1):
                if met is not None and self.cost(c) > self.bound(met):
                    self.status[c.key] = (f"not trained in rung {k + 1}: {met.label} met the target at a lower "
                                          f"{spec.objective}")
                    reserve.append(c)
                    continue
                if not budget_left(k):
                    for rest in alive[i - 1:]:
                        self.status[rest.key] = f"not trained in rung {k + 1}: the time budget ran out"
                    break
                res = attempt(c, k, f"rung {k + 1}/{spec.rungs} · {i}/{len(alive)}")
                if res is None:  # its run failed (the reason is its status): the others go on
                    continue
                trained.append(c)
                if res.meets_target and met is None:
                    met = c
            if budget_stop or k == last:
                break
            keep = max(1, math.ceil(len(trained) / spec.eta))
            ranked = sorted(trained, key=lambda c: ((0, self.cost(c), c.index) if self.results[c.key][-1].meets_target
                                                    else (1, -self.results[c.key][-1].val_accuracy, c.index)))
            for c in ranked[keep:]:
                self.status[c.key] = f"stopped after rung {k + 1}"
            alive = sorted(ranked[:keep], key=self.cost_order)
        final = [c for c in cands if c.key in self.results and self.results[c.key][-1].rung == last]
        latency = self.final_latency(final)
        chosen = self.choose(final, latency)
        # What an early exit passed over, in case the candidate that made them needless missed in the end
        reserve.sort(key=self.cost_order)
        while chosen is None and reserve and not budget_stop:
            c = reserve.pop(0)
            if not budget_left(last):
                self.status[c.key] = f"not trained in rung {last + 1}: the time budget ran out"
                break
            if attempt(c, last, f"rung {last + 1}/{spec.rungs} · passed over earlier") is not None:
                final.append(c)
                latency = self.final_latency(final)
                chosen = self.choose(final, latency)
        for c in final:
            self.status[c.key] = "trained to the end"
        if chosen is not None:
            self.status[chosen.key] = "chosen"
        return Outcome(chosen, self.target, self.teacher_val, budget_stop, trained_runs,
                       time.monotonic() - self.start, latency)

    def train(self, c: Candidate, rung: int, factor: float, where: str) -> RungResult | None:
        """Runs candidate ``c``'s recipe for ``rung`` (resuming or taking what is cached); returns what it measured,
        or None when its run stopped on a UserError (a diverging loss, say)."""
        from pipelines import recipe as recipe_mod
        from pipelines.run import run

        raw = c.rung_recipe(factor, rung)
        r = recipe_mod.from_dict(raw)
        epochs = {n: raw["stages"][n]["epochs"] for n in registry.student_stages() if n in raw["stages"]}
        print(f"[{where}] {c.label} ({', '.join(f'{n} {e}' for n, e in epochs.items())} epochs) ...", end="",
              file=self.stream, flush=True)
        log = self.root / "logs" / f"{r.run_name()}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        records, t0 = [], time.monotonic()
        try:
            with open(log, "a", buffering=1) as f, contextlib.redirect_stdout(f):
                run_dir = run(r, out=self.runs, command=f"{self.command}  # candidate {c.label}, rung {rung + 1}",
                              stream=f, store=self.store, data=self.data, records=records,
                              checked=_recipe_key(raw) in self.preflown)
        except UserError as e:  # this candidate cannot be trained as it is (its loss diverged, say): say so, go on
            print(f" failed: {e} (its log: {log})", file=self.stream, flush=True)
            self.status[c.key] = f"failed in rung {rung + 1}: {e}"
            return None
        except interrupt.Interrupted as e:
            print(f" stopped (its log: {log})", file=self.stream, flush=True)
            raise interrupt.Interrupted(f"{e.where} of candidate {c.label}") from None
        except BaseException:
            print(f" stopped (its log: {log})", file=self.stream, flush=True)
            raise
        seconds = time.monotonic() - t0
        results = json.loads((run_dir / "results.json").read_text())
        row = next(m for m in results["models"] if m["format"] == "tflite" and m["role"] == "student")
        teacher = next((m for m in results["models"] if m["role"] == "teacher"), None)
        if self.target is None:  # max_drop: below the teacher's validation accuracy, known after the first run
            if teacher is None or teacher.get("val_accuracy") is None:
                raise UserError("--max-drop is counted from the teacher's validation accuracy, but this recipe's "
                                "runs have no teacher; give --target-accuracy")
            self.teacher_val = teacher["val_accuracy"]
            self.target = self.teacher_val - self.spec.max_drop / 100
        res = RungResult(rung=rung, epochs=epochs, run=str(run_dir.relative_to(self.root)),
                         val_accuracy=row["val_accuracy"], accuracy=row["accuracy"], size_bytes=row["size_bytes"],
                         gzip_bytes=row["gzip_bytes"], latency_ms=row["latency"][str(self.threads)]["median_ms"],
                         min_runtime=row["min_runtime"], model=row["name"], path=row["path"], seconds=round(seconds, 1),
                         trained=any(not rec.skipped for rec in records if rec.stage not in ("bundle", "report")))
        res.meets_target = self.meets(res)
        self.results.setdefault(c.key, []).append(res)
        best = self.best_so_far()
        print(f" val {res.val_accuracy:.2%} · test {res.accuracy:.2%} · {res.size_bytes / KB:.1f} KB · "
              f"{res.latency_ms:.3f} ms · {seconds:.0f} s{'' if res.trained else ' (cached)'}"
              f"{' · meets the target' if res.meets_target else ''}   best: "
              f"{best.label if best else f'none yet at val >= {self.target:.2%}'} · search "
              f"{(time.monotonic() - self.start) / 60:.1f} min", file=self.stream, flush=True)
        return res

    def meets(self, res: RungResult) -> bool:
        """Whether a run meets the target and the constraints its file can be checked for now (latency: its run's)."""
        from edge_kd.bench.compat import loads_on

        s = self.spec
        return (res.val_accuracy >= self.target - 1e-9
                and (s.max_kb is None or res.size_bytes <= s.max_kb * KB)
                and (s.max_latency_ms is None or res.latency_ms <= s.max_latency_ms)
                and (s.min_runtime is None or loads_on(res.min_runtime, s.min_runtime)))

    def best_so_far(self) -> Candidate | None:
        """The cheapest candidate whose latest run meets the target (the running best of the progress lines)."""
        best = None
        for key, runs in self.results.items():
            if runs[-1].meets_target:
                c = self._by_key[key]
                if best is None or self.measured(c) < self.measured(best):
                    best = c
        return best

    def measured(self, c: Candidate, latency: dict | None = None) -> tuple:
        """The candidate's objective as its latest run measured it (latency: ``latency``'s where given), then its
        validation accuracy, higher first."""
        res = self.results[c.key][-1]
        value = {"size": res.size_bytes, "gzip": res.gzip_bytes,
                 "latency": (latency or {}).get(c.key, res.latency_ms)}[self.spec.objective]
        return value, -res.val_accuracy, c.index

    def final_latency(self, final: list[Candidate]) -> dict:
        """Returns {key: ms} of the last round's files measured together in interleaved rounds (the runs measured
        them apart, at different times), where latency is the objective or a constraint; else {}."""
        if not final or not (self.spec.objective == "latency" or self.spec.max_latency_ms is not None):
            return {}
        from edge_kd.bench import litert

        files = {c.key: self.root / self.results[c.key][-1].run / self.results[c.key][-1].path for c in final}
        sample, _ = self.data.first("test", 1)
        b = self.recipe.stages.benchmark
        print(f"timing the {len(files)} model(s) of the last rung together ({b.rounds} interleaved rounds) ...",
              file=self.stream, flush=True)
        timed = litert.latency_rounds(files, sample[0], [self.threads], rounds=b.rounds,
                                      round_seconds=b.min_seconds / b.rounds, warmup_seconds=b.warmup_seconds)
        return {k: v[str(self.threads)]["median_ms"] for k, v in timed.items()}

    def choose(self, final: list[Candidate], latency: dict) -> Candidate | None:
        """The cheapest of the last round that meets the target and every constraint, latency as remeasured."""
        ok = []
        for c in final:
            res = self.results[c.key][-1]
            lat = latency.get(c.key, res.latency_ms)
            res.meets_target = self.meets(dataclasses.replace(res, latency_ms=lat))
            if res.meets_target:
                ok.append(c)
        return min(ok, key=lambda c: self.measured(c, latency)) if ok else None
