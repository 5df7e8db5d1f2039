"""The distillation families side by side: one fixed teacher, one small student, the same epochs and seeds.

Rows: the student alone, Hinton KD, and each family (fitnet, at, rkd, crd, dkd, two teachers by
confidence, teacher-free virtual teacher, mean teacher, mutual learning). Columns: test accuracy of
the trained student (Keras, fp32, the whole test split), mean ± sample std over the seeds, and wall
time per epoch relative to Hinton KD, measured in the same run. Every method trains through the
pipeline's own training code (``pipelines.context.Context.fit``: Adam, cosine decay, batch 128)
with the default recipe's augmentation (shifts of 2 px and flips, the same views per seed for every
method) and consistent teaching: the teachers see each step's augmented batch. The teacher is the
default recipe's, the shipped ResNet-8 (×2 width); the two-teacher row adds a ``cnn_large`` trained
here with the same augmentation.

    python benchmarks/families.py --data ../shared/data/fashion_mnist.npz --seeds 0 1 2 --epochs 3

Results go to benchmarks/results/families.json, rewritten after every trained student so an
interrupted run keeps what it finished; the second teacher is cached in --out and reused.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

import models
from edge_kd.bench import stats
from edge_kd.distill import Distiller, losses
from edge_kd.fileio import write_json
from edge_kd.keras import keras
from pipelines import recipe as recipe_mod
from pipelines import run_data, run_models, run_training
from pipelines.context import Context

ROOT = Path(__file__).resolve().parents[1]

STUDENT = {"arch": "cnn", "options": {"filters": [16, 32, 32]}}  # the default recipe's student
TEACHER = {"path": "builtin:fashion_mnist", "arch": "resnet8", "options": {"width": 2.0}}  # the default recipe's
SECOND_TEACHER = {"arch": "cnn_large", "options": {}}  # another architecture, for multi-teacher
TEACHER_EPOCHS = 5  # the second teacher's


def _kd(weight=0.9, temperature=4.0):
    return losses.get("hinton", temperature=temperature, weight=weight)


# name -> (how to build the Distiller from student, teachers, peer factory; what the row says)
# Weights: CE 1.0 plus the family's own term at its authors' (or RepDistiller's) weight, rescaled where our
# normalisation differs; the soft-target rows put 0.1 on CE and 0.9 on soft targets (a low hard weight, as Hinton advises).
METHODS = {
    "student alone": (lambda s, t, peer, kw: Distiller(s, **kw), "cross-entropy only"),
    "hinton": (lambda s, t, peer, kw: Distiller(s, t[0], [_kd()], hard_weight=0.1, **kw), "0.1 CE + 0.9 KD, T 4"),
    "fitnet": (lambda s, t, peer, kw: Distiller(s, t[0], [losses.get(
        "fitnet", student_layer="block2_relu", teacher_layer="stack2_relu", weight=100.0)], **kw),
               "CE + 100 · hint MSE, block2 (32 ch) → teacher stack2 (64 ch, 14×14) through a 1×1 adapter"),
    "at": (lambda s, t, peer, kw: Distiller(s, t[0], [losses.get(
        "at", pairs=[["block1_relu", "stack1_relu"], ["block2_relu", "stack2_relu"]], weight=1000.0 / 196)], **kw),
           "CE + AT (p 2) on blocks 1 and 2, β 1000 per position"),
    "rkd": (lambda s, t, peer, kw: Distiller(s, t[0], [losses.get(
        "rkd", student_layer="flatten", teacher_layer="gap", distance_weight=25.0, angle_weight=50.0)], **kw),
            "CE + RKD distance 25 + angle 50 on the penultimate features"),
    "crd": (lambda s, t, peer, kw: Distiller(s, t[0], [losses.get(
        "crd", student_layer="flatten", teacher_layer="gap", dim=128, temperature=0.07, bank_size=4096,
        weight=0.8)], **kw), "CE + 0.8 CRD, 128-d heads, bank 4096, τ 0.07"),
    "dkd": (lambda s, t, peer, kw: Distiller(s, t[0], [losses.get(
        "dkd", alpha=1.0, beta=8.0, temperature=4.0, warmup_epochs=0.5)], **kw), "CE + DKD α 1 β 8 T 4, warm-up 0.5 epoch"),
    "two teachers": (lambda s, t, peer, kw: Distiller(s, t, [_kd()], hard_weight=0.1, combine="confidence", **kw),
                     "0.1 CE + 0.9 KD from the ResNet-8 and cnn_large, per-example confidence weights"),
    "virtual teacher": (lambda s, t, peer, kw: Distiller(s, terms=[losses.get(
        "virtual_teacher", correct_prob=0.9, temperature=4.0, weight=0.9)], hard_weight=0.1, **kw),
                        "no teacher: 0.1 CE + 0.9 KD from a hand-designed teacher (0.9 on the label), T 4"),
    "mean teacher": (lambda s, t, peer, kw: Distiller(s, terms=[_kd()], hard_weight=0.1, ema_decay=0.99, **kw),
                     "no teacher: 0.1 CE + 0.9 KD from the EMA of the student (decay 0.99)"),
    "mutual (DML)": (lambda s, t, peer, kw: Distiller(s, terms=[_kd(1.0, 1.0)], hard_weight=1.0, peers=[peer()], **kw),
                     "no teacher: CE + KL to a peer of the same architecture, both trained (T 1)"),
}


def context(data: str, seed: int, out: Path) -> Context:
    r = recipe_mod.apply_overrides(recipe_mod.load(), [f"data.source={data}", f"seed={seed}"])
    return Context(r, out, command="benchmarks/families.py")


def teachers(ctx: Context, out: Path) -> list:
    """Returns [the shipped ResNet-8, cnn_large trained on ``ctx``'s data, seed and augmentation (cached in ``out``)]."""
    path = out / "teacher2.keras"
    if not path.exists():
        keras.utils.set_random_seed(ctx.recipe.seed)
        info = run_data.load(ctx).info
        model = models.build(SECOND_TEACHER["arch"], info.input_shape, info.num_classes, **SECOND_TEACHER["options"])
        run_training.fit(ctx, Distiller(model, augment=run_training.augmenter(ctx, "distill")), TEACHER_EPOCHS,
                         ctx.recipe.training.learning_rate)
        out.mkdir(parents=True, exist_ok=True)
        model.save(path)
    second = keras.models.load_model(path, compile=False)
    second.trainable = False
    return [run_models.teacher(ctx), second]


def accuracy(model, ctx: Context) -> float:
    x, y = run_data.load(ctx).arrays("test")
    return stats.keras_accuracy(model, x, y, batch_size=1024)


def one(method: str, ctx: Context, teacher_models: list, epochs: int) -> dict:
    info = run_data.load(ctx).info

    def build(seed):
        keras.utils.set_random_seed(seed)
        return models.build(STUDENT["arch"], info.input_shape, info.num_classes, **STUDENT["options"])

    student = build(ctx.recipe.seed)  # the same initial weights for every method at a seed
    # the recipe's augmentation for the distill stage (seeded by seed and stage: the same views for every method)
    kw = {"augment": run_training.augmenter(ctx, "distill"), "consistent": True}
    d = METHODS[method][0](student, teacher_models, lambda: build(ctx.recipe.seed + 1000), kw)
    start = time.perf_counter()
    history = run_training.fit(ctx, d, epochs, ctx.recipe.training.learning_rate)
    seconds = time.perf_counter() - start
    return {"method": method, "seed": ctx.recipe.seed, "accuracy": accuracy(student, ctx),
            "val_accuracy": history["val_accuracy"][-1], "seconds_per_epoch": seconds / epochs}


def summarise(rows: list[dict]) -> dict:
    """Returns per method: accuracy mean and sample std, and time per epoch relative to Hinton at the same seed."""
    out = {}
    hinton = {r["seed"]: r["seconds_per_epoch"] for r in rows if r["method"] == "hinton"}
    for method in METHODS:
        mine = [r for r in rows if r["method"] == method]
        if not mine:
            continue
        acc = np.array([r["accuracy"] for r in mine])
        rel = [r["seconds_per_epoch"] / hinton[r["seed"]] for r in mine if r["seed"] in hinton]
        out[method] = {"accuracy_mean": float(acc.mean()), "accuracy_std": float(acc.std(ddof=1)) if len(acc) > 1 else None,
                       "time_per_epoch_vs_hinton": float(np.mean(rel)) if rel else None,
                       "seconds_per_epoch": float(np.mean([r["seconds_per_epoch"] for r in mine])),
                       "seeds": [r["seed"] for r in mine], "setting": METHODS[method][1]}
    return out


def table(summary: dict) -> str:
    lines = ["| method | test accuracy % (mean ± std) | time / epoch vs Hinton | setting |", "|---|---:|---:|---|"]
    for method, s in summary.items():
        std = f" ± {100 * s['accuracy_std']:.2f}" if s["accuracy_std"] is not None else ""
        rel = f"{s['time_per_epoch_vs_hinton']:.2f}×" if s["time_per_epoch_vs_hinton"] is not None else "—"
        lines.append(f"| {method} | {100 * s['accuracy_mean']:.2f}{std} | {rel} | {s['setting']} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "fashion_mnist.npz"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--out", default=str(ROOT / "tflite_out" / "bench-families"))
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "families.json"))
    args = p.parse_args(argv)
    if not Path(args.data).is_file():
        sys.exit(f"benchmarks/families.py: data not found: {args.data}")
    out = Path(args.out)
    first = context(args.data, 0, out)  # the teachers' data and seed; its test split is every seed's
    teacher_models = teachers(first, out)
    teacher_accuracy = [accuracy(t, first) for t in teacher_models]
    print("teachers' test accuracy: " + ", ".join(f"{100 * a:.2f} %" for a in teacher_accuracy), flush=True)
    rows = []
    command = " ".join(["python", "benchmarks/families.py", *(sys.argv[1:] if argv is None else argv)])
    for seed in args.seeds:
        ctx = context(args.data, seed, out)
        for method in args.methods:
            row = one(method, ctx, teacher_models, args.epochs)
            rows.append(row)
            print(f"{method:>16} seed {seed}: {100 * row['accuracy']:.2f} %, {row['seconds_per_epoch']:.1f} s/epoch",
                  flush=True)
            write_json(args.json, {"command": command, "data": args.data, "epochs": args.epochs,
                                   "student": STUDENT, "teachers": [TEACHER, SECOND_TEACHER],
                                   "teacher_epochs": TEACHER_EPOCHS,
                                   "teacher_accuracy": teacher_accuracy,
                                   "rows": rows, "summary": summarise(rows)})
    print("\n" + table(summarise(rows)))


if __name__ == "__main__":
    main()
