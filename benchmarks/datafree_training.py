"""Data-free distillation, measured: the student distilled, pruned and quantized on images made from a teacher
alone (``pipelines/recipes/fashion_mnist_datafree.yaml``), by each synthesis method: on Fashion-MNIST from the
shipped teacher, on MNIST from a BN teacher the pipeline trains first (``mnist.yaml``'s, ``scripts/train_teacher.py``).

Each (method, seed) run is the whole pipeline, timed stage by stage, with nothing else running; its student never
sees a training image. The methods (``METHODS``): DeepInversion, which in about the same synthesis time optimises
fewer images than the generator draws; the generator without the within-class diversity term; the generator with it
at weight 20 and at weight 5, the student starting fresh; and at weight 20 with the student starting from the
companion the generator was trained against (``stages.distill.start: companion``, the shipped recipe); then
variants of the shipped recipe. Accuracy is on the real test split (10,000 images), which chooses nothing: the
default method is the one whose students agree more with the teacher on the held-out synthetic images of every
method pooled (``pooled_agreement``, each distinct set of images weighing the same, over the seeds the
most-seeded methods all ran), what a user without data can see too; it replaces the shipped recipe's only by a gain
outside the noise (``choose``). Per run, the
within-class spread of the images (``within_class_spread``) says how much one class's images differ. Results go to
``benchmarks/results/datafree_training.json``, a run at a time (a rerun skips the runs it holds).

    python benchmarks/datafree_training.py --seeds 0 --methods deepinversion generator
    python benchmarks/datafree_training.py --seeds 1 2 --methods generator
    python benchmarks/datafree_training.py --seeds 0 1 2 --methods generator_diverse generator_diverse5
    python benchmarks/datafree_training.py --dataset mnist --seeds 0 1 2 --methods generator generator_diverse
    python benchmarks/datafree_training.py --dataset mnist --seeds 0 1 2 --methods generator_diverse --again
    python benchmarks/datafree_training.py --dataset mnist --seeds 0 1 2 --methods generator_diverse_companion
    python benchmarks/datafree_training.py --seeds 0 1 2 --methods generator_diverse_companion
    python benchmarks/datafree_training.py --seeds 0 1 2 --methods generator_diverse --again
    python benchmarks/datafree_training.py --seeds 0 --methods shipped_mixup shipped_cutmix
    python benchmarks/datafree_training.py --seeds 0 --methods shipped_g64_1100
    python benchmarks/datafree_training.py --seeds 0 --methods shipped_bn5 shipped_adv3 shipped_32k_8ep
    python benchmarks/datafree_training.py --seeds 1 2 --methods shipped_32k_8ep
    python benchmarks/datafree_training.py --seeds 1 2 --methods shipped_bn5
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import time
from pathlib import Path

import numpy as np

from edge_kd.bench import stats
from edge_kd.bench.results import rows_of
from edge_kd.fileio import write_json
from pipelines import recipe as recipe_mod
from pipelines.run import run
from pipelines.runner import read_manifest, seconds_before, stage_seconds

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "datafree_training.json"
#: issue 28's map of every target to whether it was met: benchmarks/datafree.py writes the calibration target's, this
#: script the data-free students' and runs' (under the names ``target_names`` gives them there)
ISSUE_RESULTS = RESULTS.parent / "datafree.json"
RECIPE = "fashion_mnist_datafree"
#: issue 28's targets: the data-free student's test accuracy per dataset, and the run's wall time on 2 cores
TARGET_ACCURACY = {"fashion_mnist": 0.85, "mnist": 0.97}
TARGET_SECONDS = 15 * 60
#: the MNIST teacher (trained by scripts/train_teacher.py from mnist.yaml's teacher section, for the epochs below:
#: mnist.yaml's own 3 make 99.08 %, short of the 99.3 % issue 28 asks of this teacher) and the MNIST run's keys
MNIST_TEACHER_EPOCHS = 10
MNIST_TEACHER = ROOT / "tflite_out" / f"mnist_teacher_cnn_large_{MNIST_TEACHER_EPOCHS}ep.keras"
DATASETS = {
    "fashion_mnist": [],
    "mnist": ["data.classes=10", "data.test=mnist", f"teacher.path={MNIST_TEACHER}", "augment.flip=false",
              "student.options.filters=[16,32,32]"],
}
#: each method's settings beyond the recipe's (the shipped recipe is generator_diverse_companion_30ep's); every other
#: method's student starts from fresh weights, as the recorded runs' did when the recipe started fresh
FRESH = "stages.distill.start=fresh"
#: the distill stage's epochs before the shipped recipe took 30 (every method recorded with them)
TEN = "stages.distill.epochs=10"
METHODS = {
    "generator": ["stages.synthesize.method=generator", "stages.synthesize.generator.diversity=0", FRESH, TEN],
    "deepinversion": ["stages.synthesize.method=deepinversion", "stages.synthesize.images=1536", FRESH, TEN],
    # the generator with the within-class diversity term (mode seeking) weighted 20 (the default) and 5
    "generator_diverse": ["stages.synthesize.method=generator", "stages.synthesize.generator.diversity=20", FRESH, TEN],
    "generator_diverse5": ["stages.synthesize.method=generator", "stages.synthesize.generator.diversity=5", FRESH, TEN],
    # generator_diverse whose student starts from the companion the generator was trained against (DFAD's student)
    "generator_diverse_companion": ["stages.synthesize.method=generator", "stages.synthesize.generator.diversity=20",
                                    "stages.distill.start=companion", TEN],
    # the same, distilled 30 epochs on the images instead of 10: the shipped recipe (pooled agreement chose it)
    "generator_diverse_companion_30ep": ["stages.synthesize.method=generator",
                                         "stages.synthesize.generator.diversity=20", "stages.distill.start=companion",
                                         "stages.distill.epochs=30"],
}
#: the shipped recipe's settings, the start of the methods that change one part of it: those that change only what
#: follows synthesis take its images from the store, the others make their own
SHIPPED_METHOD = "generator_diverse_companion_30ep"
SHIPPED = METHODS[SHIPPED_METHOD]
METHODS.update({
    # the synthetic batches mixed (MixUp, CutMix: α 1, λ uniform), the teacher labelling the mixed images
    # (distillation.consistent): images between the bank's, which the bank alone never shows the student
    "shipped_mixup": [*SHIPPED, "augment.mixup=1.0"],
    "shipped_cutmix": [*SHIPPED, "augment.cutmix=1.0"],
    # distilled 80 epochs on the images instead of 30
    "shipped_80ep": [*SHIPPED, "stages.distill.epochs=80"],
    # a generator half as wide ([64, 32]: 0.49 s an iteration against 0.89, benchmarks/datafree_generator_speed.py)
    # trained 1,100 iterations instead of 600, about the shipped synthesis time
    "shipped_g64_1100": [*SHIPPED, "stages.synthesize.generator.filters=[64,32]",
                         "stages.synthesize.generator.steps=1100"],
    # the generator's BN-statistics term weighted 5 instead of 1: images nearer the teacher's recorded statistics
    "shipped_bn5": [*SHIPPED, "stages.synthesize.generator.bn_weight=5.0"],
    # the adversarial term (DFAD's: the images the companion still gets wrong) weighted 3 instead of 1
    "shipped_adv3": [*SHIPPED, "stages.synthesize.generator.adversarial=3.0"],
    # four times the images drawn from the same generator (a forward pass each), distilled 8 epochs instead of 30,
    # pruned 2 instead of 6 and QAT-trained 1 instead of 2: about the same steps, on more distinct images
    "shipped_32k_8ep": [*SHIPPED, "stages.synthesize.images=32768", "stages.distill.epochs=8",
                        "stages.prune.epochs=2", "stages.qat.epochs=1"],
})


def _teacher(dataset: str) -> None:
    """Trains the MNIST teacher once (its epochs kept as it goes); the shipped one serves Fashion-MNIST."""
    if dataset != "mnist" or MNIST_TEACHER.is_file():
        return
    import subprocess
    import sys

    subprocess.run([sys.executable, str(ROOT / "scripts" / "train_teacher.py"), "--recipe", "mnist", "--out",
                    str(MNIST_TEACHER), "--set", f"teacher.epochs={MNIST_TEACHER_EPOCHS}"], check=True)


def _name(dataset: str, method: str, seed: int) -> str:
    """The run folder's name of ``method`` at ``seed`` on ``dataset``."""
    return f"datafree-{dataset}-{method}-{seed}"


def _maker(out: Path, run_dir: Path) -> str | None:
    """The run folder beside ``run_dir`` in ``out`` whose synthesize stage made the images ``run_dir`` took from the
    store; None when ``run_dir`` made them itself."""
    mine = read_manifest(run_dir / "manifests" / "synthesize.json") or {}
    if not mine.get("taken_from_store"):
        return None
    for other in sorted(Path(out).glob("*/manifests/synthesize.json")):
        theirs = read_manifest(other) or {}
        same = all(theirs.get(k) == mine.get(k) for k in ("fingerprint", "finished"))
        if same and not theirs.get("taken_from_store"):
            return other.parents[1].name
    return None


def _run(dataset: str, method: str, seed: int, out: Path) -> dict:
    """Runs ``method`` at ``seed``. The runs share a stage store (``out/store``): a method that differs from another
    only after synthesis takes that run's finished images instead of making them again (the same fingerprint: the
    same settings, teacher, seed and code). Its time is this call's wall time and what the stages it did not run
    here took (``runner.seconds_before``: the images' making counts, as if it had made them)."""
    r = recipe_mod.apply_overrides(recipe_mod.load(RECIPE), [*DATASETS[dataset], *METHODS[method], f"seed={seed}",
                                                             f"name={_name(dataset, method, seed)}"])
    commit = stats.code_version()
    records, start = [], time.perf_counter()
    run_dir = run(r, out=out, command=f"benchmarks/datafree_training.py ({method}, seed {seed})",
                  stream=io.StringIO(), store=Path(out) / "store", records=records)
    seconds = time.perf_counter() - start + seconds_before(run_dir, records)
    rows = {m.name: m for m in rows_of(json.loads((run_dir / "results.json").read_text())["models"])}
    synth = json.loads((run_dir / "manifests" / "synthesize.json").read_text())["summary"]
    return {"dataset": dataset, "method": method, "seed": seed, "run_dir": str(run_dir),
            "wall_seconds": round(seconds, 1), "cpu": stats.machine(), "synthesis_from": _maker(out, run_dir),
            "commit": commit, "stage_seconds": stage_seconds(run_dir), "synthesize": synth,
            "overrides": [*DATASETS[dataset], *METHODS[method]],
            "test_accuracy": {n: rows[n].accuracy for n in ("teacher", "student", "student-int8", "pruned-int8",
                                                            "qat-int8") if n in rows},
            "synthetic_agreement": {n: rows[n].val_accuracy for n in ("student", "qat-int8") if n in rows},
            "within_class_spread": _spread(run_dir, synth.get("rounds", 1)), "companion": _companion(run_dir, seed)}


def _companion(run_dir: Path, seed: int) -> dict | None:
    """The generator's companion student as synthesis left it (before any distillation on the images): its accuracy
    on the test split and its agreement with the teacher on the run's held-out synthetic images; None without one."""
    import models
    from pipelines.stages.synthesize import COMPANION

    path = run_dir / "synthetic" / COMPANION
    if not path.is_file():
        return None
    recipe, b = _bundle(run_dir, seed, test=True)
    student = models.build(recipe.student.arch, b.info.input_shape, b.info.num_classes, **recipe.student.options)
    models.load_weights(student, path, "companion")
    out = {}
    for split, name in (("test", "test_accuracy"), ("val", "synthetic_agreement")):
        x, y = b.arrays(split)
        out[name] = float(np.mean(np.argmax(student.predict(x, verbose=0), -1) == y))
    return out


def _bundle(run_dir: Path, seed: int, test: bool = False):
    """Returns (the run's recipe, the data bundle it trained on: its synthetic images labelled with the teacher's
    classes, split as the run split them; ``test``: with the recipe's test set, else without)."""
    from edge_kd import data

    recipe = recipe_mod.load(run_dir / "recipe.yaml")
    cfg = recipe.data if test else recipe.data.model_copy(update={"test": None})
    with np.load(run_dir / "synthetic" / "images.npz") as f:
        return recipe, data.synthetic_bundle(cfg, f["x"], f["teacher"], seed=seed)


def within_class_spread(x, labels) -> float:
    """The mean over classes of the per-pixel standard deviation of that class's images (pixels in [0, 1]): how much
    one class's images differ from each other."""
    x = np.asarray(x, np.float32) / 255.0
    return float(np.mean([x[labels == c].std(0).mean() for c in np.unique(labels)]))


def _spread(run_dir: Path, rounds: int) -> dict:
    """The spread of the images the generator drew in its last round (the generator as it ended), and of the whole
    bank, each class being the one each image was made for."""
    with np.load(run_dir / "synthetic" / "images.npz") as f:
        x, y = f["x"], f["y"]
    last = slice(len(x) - len(x) // rounds, None)
    return {"last_round": within_class_spread(x[last], y[last]), "bank": within_class_spread(x, y)}


def present(r: dict) -> bool:
    """Whether run ``r``'s folder (its images and student) is on this machine: pooling needs it."""
    return (Path(r["run_dir"]) / "synthetic" / "images.npz").is_file()


def held_out_pool(sets: list, seed: int) -> tuple:
    """Returns (x, y): the held-out synthetic images of ``sets`` (a list of (x, y) validation splits) pooled so that
    each distinct set weighs the same: a set that several runs share (their images taken from the store) counts once,
    and each distinct set gives as many images as the smallest, drawn at random (``seed``) from all of its rounds."""
    import hashlib

    distinct = {}
    for x, y in sets:
        distinct.setdefault(hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest(), (x, y))
    n = min(len(y) for _, y in distinct.values())
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for x, y in distinct.values():
        i = np.sort(rng.permutation(len(y))[:n])
        xs.append(x[i])
        ys.append(y[i])
    return np.concatenate(xs), np.concatenate(ys)


def pooled_agreement(runs: list[dict]) -> dict:
    """Returns, per run, its float student's agreement with the teacher on the held-out synthetic images of every run
    of the same dataset and seed pooled (each method's validation split, which no model trained on; each distinct
    set of images weighing the same, ``held_out_pool``); every run's folder must be present."""
    from edge_kd.keras import keras

    held = {}
    for r in runs:
        b = _bundle(Path(r["run_dir"]), r["seed"])[1]
        held.setdefault((r["dataset"], r["seed"]), []).append(b.arrays("val"))
    pools = {key: held_out_pool(sets, key[1]) for key, sets in held.items()}
    out = {}
    for r in runs:
        student = keras.models.load_model(Path(r["run_dir"]) / "distill" / "student.keras", compile=False)
        x, y = pools[(r["dataset"], r["seed"])]
        out[_key(r)] = float(np.mean(np.argmax(student.predict(x, verbose=0), -1) == y))
    return out


def choose(agreement: dict, shipped: str) -> str:
    """Returns the method to ship from ``agreement`` (method → its pooled agreement at each seed they all ran, in
    seed order): the best on average, unless ``shipped`` (the shipped recipe's method) is among them and the best's
    gain over it, seed by seed, is inside the noise (its mean no more than its sample std; one seed cannot say): a
    gain inside the noise does not change the recipe."""
    best = max(agreement, key=lambda m: statistics.mean(agreement[m]))
    if shipped in agreement and best != shipped:
        gains = [a - b for a, b in zip(agreement[best], agreement[shipped])]
        if len(gains) < 2 or statistics.mean(gains) <= statistics.stdev(gains):
            return shipped
    return best


def target_names(dataset: str) -> dict:
    """Returns, for ``dataset``'s two targets ("accuracy", "time"), (their key in this script's ``targets``, their
    name in issue 28's whole map in ``ISSUE_RESULTS``)."""
    pct, where = round(100 * TARGET_ACCURACY[dataset]), "(the chosen method, benchmarks/datafree_training.py)"
    return {"accuracy": (f"{dataset}_student_at_least_{pct}",
                         f"{dataset}: data-free student >= {pct} % on test {where}"),
            "time": (f"{dataset}_run_at_most_15_minutes", f"{dataset}: a data-free run <= 15 minutes {where}")}


def whole_targets(targets: dict) -> dict:
    """Returns ``targets`` (this script's keys) under the names of issue 28's whole map in ``ISSUE_RESULTS``."""
    names = dict(pair for dataset in TARGET_ACCURACY for pair in target_names(dataset).values())
    return {names[key]: met for key, met in targets.items()}


def _key(r) -> str:
    return f"{r['dataset']}-{r['method']}-{r['seed']}"


def _mean_std(values):
    return [statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="fashion_mnist", choices=list(DATASETS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--out", type=Path, default=ROOT / "tflite_out" / "bench-datafree-training")
    p.add_argument("--again", action="store_true",
                   help="run the given methods and seeds again, replacing what is recorded (for pooling on a machine "
                        "that lacks the recorded runs' folders)")
    args = p.parse_args(argv)
    saved = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    runs = {_key(r): r for r in saved.get("runs", [])}
    if args.again:
        for seed in args.seeds:
            for method in args.methods:
                runs.pop(_key({"dataset": args.dataset, "method": method, "seed": seed}), None)
    _teacher(args.dataset)
    for seed in args.seeds:
        for method in args.methods:
            key = _key({"dataset": args.dataset, "method": method, "seed": seed})
            if key in runs:
                continue
            print(f"{key}: running ...", flush=True)
            runs[key] = r = _run(args.dataset, method, seed, args.out)
            print(f"{key}: {r['wall_seconds']:.0f} s; test accuracy {r['test_accuracy']}; synthetic agreement "
                  f"{r['synthetic_agreement']}", flush=True)
            write_json(RESULTS, {**saved, "runs": list(runs.values())})
    ordered = list(runs.values())
    # pooled over the runs whose folders are here; a run recorded elsewhere keeps the figure of its own pool, and
    # which methods each figure pooled is recorded beside it
    here = [r for r in ordered if present(r)]
    pooled, pools = dict(saved.get("pooled_agreement", {})), dict(saved.get("pooled_with", {}))
    pooled.update(pooled_agreement(here))
    for r in ordered:
        mates = sorted({m["method"] for m in here if (m["dataset"], m["seed"]) == (r["dataset"], r["seed"])})
        if present(r):
            pools[_key(r)] = mates
        else:
            pools.setdefault(_key(r), sorted({m["method"] for m in ordered if not present(m)
                                              and (m["dataset"], m["seed"]) == (r["dataset"], r["seed"])}))
    pooled = {k: v for k, v in pooled.items() if k in runs}
    pools = {k: v for k, v in pools.items() if k in runs}
    summary, targets = {}, {}
    chosen, among = dict(saved.get("chosen_by_pooled_agreement", {})), dict(saved.get("chosen_among", {}))
    for dataset in DATASETS:
        for method in METHODS:
            mine = [r for r in ordered if r["dataset"] == dataset and r["method"] == method]
            if mine:
                summary[f"{dataset}-{method}"] = {
                    "dataset": dataset, "method": method, "seeds": [r["seed"] for r in mine],
                    "student_test": _mean_std([r["test_accuracy"]["student"] for r in mine]),
                    "final_int8_test": _mean_std([r["test_accuracy"]["qat-int8"] for r in mine]),
                    "pooled_agreement": _mean_std([pooled[_key(r)] for r in mine]),
                    "wall_seconds": _mean_std([r["wall_seconds"] for r in mine]),
                    "wall_seconds_max": max(r["wall_seconds"] for r in mine)}
        # the default method: the best agreement on the pooled held-out synthetic images, among the methods pooled
        # together here that ran the most seeds, over the seeds they all ran (a method screened at fewer seeds is not
        # chosen until it has run as many; without such runs here, the recorded choice stands)
        ran = {m: {r["seed"] for r in here if r["dataset"] == dataset and r["method"] == m} for m in METHODS}
        most = max((len(s) for s in ran.values()), default=0)
        ran = {m: s for m, s in ran.items() if s and len(s) == most}
        common = set.intersection(*ran.values()) if len(ran) > 1 else set()
        if common:
            chosen[dataset] = choose({m: [pooled[_key({"dataset": dataset, "method": m, "seed": s})]
                                          for s in sorted(common)] for m in ran}, SHIPPED_METHOD)
            among[dataset] = {"methods": sorted(ran), "seeds": sorted(common), "shipped": SHIPPED_METHOD}
        best = summary.get(f"{dataset}-{chosen.get(dataset, 'generator')}")
        if best:
            names = target_names(dataset)
            targets[names["accuracy"][0]] = best["student_test"][0] >= TARGET_ACCURACY[dataset]
            targets[names["time"][0]] = best["wall_seconds_max"] <= TARGET_SECONDS
    write_json(RESULTS, {"command": "python benchmarks/datafree_training.py", "recipe": RECIPE, "runs": ordered,
                         "pooled_agreement": pooled, "pooled_with": pools, "summary": summary,
                         "chosen_by_pooled_agreement": chosen, "chosen_among": among, "targets": targets})
    whole = json.loads(ISSUE_RESULTS.read_text()) if ISSUE_RESULTS.is_file() else {}
    whole.setdefault("targets", {}).update(whole_targets(targets))
    write_json(ISSUE_RESULTS, whole)
    for key, s in summary.items():
        print(f"{key}: student {100 * s['student_test'][0]:.2f} % test, final int8 {100 * s['final_int8_test'][0]:.2f} "
              f"%, pooled agreement {100 * s['pooled_agreement'][0]:.2f} %, {s['wall_seconds'][0]:.0f} s "
              f"(seeds {s['seeds']})")
    print(f"chosen (pooled agreement): {chosen}; targets: {targets}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
