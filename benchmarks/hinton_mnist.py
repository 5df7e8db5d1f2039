"""Hinton, Vinyals & Dean (2015), section 3, on real MNIST: test errors of a big net, a small net and the small net distilled.

- teacher: 784-1200-1200-10 ReLU MLP, dropout (0.2 on the input, 0.5 on the hidden layers), trained
  on images jittered by up to ±2 pixels (paper: 67 test errors);
- student alone: 784-800-800-10, no regularisation (paper: 146 errors);
- student distilled at T = 20 from the teacher's soft targets on the same, un-jittered images
  (paper: 74 errors).

All three train on the 60,000 training images with Adam and cosine decay (the paper used SGD and
far longer training); errors are counted on the 10,000 test images, per seed and as a mean.

    python benchmarks/hinton_mnist.py --data ../shared/data/mnist.npz --seeds 0 1 2

Results go to benchmarks/results/hinton_mnist.json, rewritten after every trained model.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from edge_kd.distill import Distiller, losses
from edge_kd.fileio import write_json
from edge_kd.keras import keras, tf

ROOT = Path(__file__).resolve().parents[1]

PAPER = {"teacher": 67, "student alone": 146, "student distilled": 74}
BATCH = 128


def mlp(hidden, dropout_in=0.0, dropout=0.0, jitter=False, name="mlp"):
    inp = keras.Input((28, 28, 1), name="image")
    x = inp
    if jitter:  # active only in training: shifts of up to ±2 pixels (2/28 of the side), zeros brought in
        x = keras.layers.RandomTranslation(2 / 28, 2 / 28, fill_mode="constant", interpolation="nearest")(x)
    x = keras.layers.Flatten()(x)
    if dropout_in:
        x = keras.layers.Dropout(dropout_in)(x)
    for i, units in enumerate(hidden):
        x = keras.layers.Dense(units, activation="relu", name=f"fc{i + 1}")(x)
        if dropout:
            x = keras.layers.Dropout(dropout)(x)
    return keras.Model(inp, keras.layers.Dense(10, name="logits")(x), name=name)


def load(path):
    with np.load(path) as d:
        to_x = lambda a: (a.reshape(-1, 28, 28, 1).astype(np.float32) / 255.0)  # noqa: E731
        return (to_x(d["x_train"]), d["y_train"].astype(np.int64)), (to_x(d["x_test"]), d["y_test"].astype(np.int64))


def train(distiller, train_xy, epochs, lr, seed):
    x, y = train_xy
    ds = (tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
          .batch(BATCH).prefetch(tf.data.AUTOTUNE))
    steps = epochs * int(np.ceil(len(x) / BATCH))
    distiller.compile(optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(lr, steps)))
    distiller.fit(ds, epochs=epochs, verbose=2)


def errors(model, test_xy) -> int:
    x, y = test_xy
    return int(np.sum(np.argmax(model.predict(x, batch_size=1024, verbose=0), -1) != y))


def run_seed(seed, train_xy, test_xy, args) -> list[dict]:
    rows = []

    def record(name, model, started):
        rows.append({"model": name, "seed": seed, "test_errors": errors(model, test_xy),
                     "seconds": round(time.perf_counter() - started, 1)})
        print(f"{name:>18} seed {seed}: {rows[-1]['test_errors']} test errors ({rows[-1]['seconds']:.0f} s)", flush=True)

    keras.utils.set_random_seed(seed)
    teacher = mlp((1200, 1200), dropout_in=0.2, dropout=0.5, jitter=True, name="teacher")
    t0 = time.perf_counter()
    train(Distiller(teacher), train_xy, args.teacher_epochs, args.lr, seed)
    record("teacher", teacher, t0)

    keras.utils.set_random_seed(seed + 100)
    alone = mlp((800, 800), name="student")
    initial = alone.get_weights()
    t0 = time.perf_counter()
    train(Distiller(alone), train_xy, args.student_epochs, args.lr, seed)
    record("student alone", alone, t0)

    distilled = mlp((800, 800), name="student")
    distilled.set_weights(initial)  # the same initial weights as the student alone
    term = losses.get("hinton", temperature=args.temperature, weight=1.0 - args.hard_weight)
    t0 = time.perf_counter()
    train(Distiller(distilled, teacher, [term], hard_weight=args.hard_weight), train_xy, args.student_epochs, args.lr, seed)
    record("student distilled", distilled, t0)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "mnist.npz"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--teacher-epochs", type=int, default=30)
    p.add_argument("--student-epochs", type=int, default=30)
    p.add_argument("--temperature", type=float, default=20.0)
    p.add_argument("--hard-weight", type=float, default=0.1, help="weight of the hard-label cross-entropy; the "
                                                                  "soft term gets 1 - this")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "hinton_mnist.json"))
    args = p.parse_args(argv)
    if not Path(args.data).is_file():
        sys.exit(f"benchmarks/hinton_mnist.py: data not found: {args.data}")
    train_xy, test_xy = load(args.data)
    rows = []
    command = " ".join(["python", "benchmarks/hinton_mnist.py", *(sys.argv[1:] if argv is None else argv)])
    for seed in args.seeds:
        rows += run_seed(seed, train_xy, test_xy, args)
        summary = {m: {"mean_errors": float(np.mean([r["test_errors"] for r in rows if r["model"] == m])),
                       "per_seed": [r["test_errors"] for r in rows if r["model"] == m], "paper": PAPER[m]}
                   for m in PAPER}
        write_json(args.json, {"command": command, "settings": vars(args), "rows": rows, "summary": summary})
    print("\n| model | test errors (mean over seeds) | per seed | paper |\n|---|---:|---|---:|")
    for m, s in summary.items():
        print(f"| {m} | {s['mean_errors']:.1f} | {', '.join(map(str, s['per_seed']))} | {s['paper']} |")


if __name__ == "__main__":
    main()
