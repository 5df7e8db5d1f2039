"""How fast is the Distiller's step: against its floor, and against Keras 3's own Distiller, side by side.

Per model pair, four compiled functions run on the same batches (batch 128, random images and
labels; speed does not depend on the values), each ``--steps`` steps per timing, in interleaved
rounds (edge-kd, student alone, teacher forward, Keras 3 … and again), after one warm-up each:

- **edge-kd**: ``Distiller`` (Hinton T 4, hard 0.5 / soft 0.5, Adam), its compiled ``train_function``;
- **floor**: a compiled train step of the student alone (cross-entropy, Adam, fetching its batch)
  plus a compiled forward pass of the teacher (``training=False``) on a batch already in memory:
  what any distiller must at least do;
- **Keras 3**: ``keras.distillation.Distiller`` with ``LogitsDistillation(temperature=4)`` and
  ``student_loss_weight=0.5`` on the same two architectures with the same weights (Keras 3.15, rebuilt
  from the tf_keras models' configs), its compiled ``train_function``.

``floor_ratio`` = edge-kd step time / floor time (goal ≤ 1.05); ``keras3_ratio`` = edge-kd
throughput / Keras 3 throughput (goal ≥ 1.5); both as the median over rounds of each round's ratio,
with the IQR. Writes ``benchmarks/results/throughput.json``. ``--quick`` (the test suite's mode)
runs 2 steps, 2 rounds, batch 16, and asserts nothing about time.

    python benchmarks/throughput.py
    python benchmarks/throughput.py --quick --json /tmp/throughput.json
"""
from __future__ import annotations

import argparse
import inspect
import sys
import time
from pathlib import Path

import numpy as np

from edge_kd.bench import stats
from edge_kd.fileio import write_json

ROOT = Path(__file__).resolve().parents[1]
#: name -> (input shape, student (arch, options), teacher (arch, options))
PAIRS = {
    "default (cnn 23k ← ResNet-8 ×2, 28×28×1)": ((28, 28, 1), ("cnn", {"filters": [16, 32, 48]}),
                                                ("resnet8", {"width": 2.0})),
    "CIFAR-shaped (ResNet-8 ← ResNet-8 ×2, 32×32×3)": ((32, 32, 3), ("resnet8", {}), ("resnet8", {"width": 2.0})),
    "MNIST CNN pair (cnn ← cnn_large, 28×28×1)": ((28, 28, 1), ("cnn", {}), ("cnn_large", {})),
}
GOALS = {"floor_ratio_at_most": 1.05, "keras3_ratio_at_least": 1.5}
_BASE_KEYS = {"name", "trainable", "dtype"}


def to_keras3(model):
    """Returns a Keras 3 copy of a Functional tf_keras model: the same layers, config and weights."""
    import keras as k3

    config = model.get_config()
    layers = []
    for layer in config["layers"]:
        cls = getattr(k3.layers, layer["class_name"])
        if layer["class_name"] == "InputLayer":
            kept = {"batch_shape": layer["config"]["batch_input_shape"], "dtype": layer["config"]["dtype"],
                    "name": layer["config"]["name"]}
        else:  # Keras 2 configs carry keys Keras 3 no longer takes (BatchNormalization's fused, renorm, ...)
            accepted = set(inspect.signature(cls.__init__).parameters) | _BASE_KEYS
            kept = {k: v for k, v in layer["config"].items() if k in accepted}
            if isinstance(kept.get("axis"), list) and len(kept["axis"]) == 1:
                kept["axis"] = kept["axis"][0]
        layers.append({**layer, "config": kept})
    copy = k3.Model.from_config({**config, "layers": layers})
    copy.set_weights(model.get_weights())
    return copy


def contenders(shape, student_spec, teacher_spec, batch: int) -> tuple[dict, dict]:
    """Returns ({name: zero-argument callable that runs one compiled step}, which of them compile with XLA)."""
    import keras as k3

    import models
    from edge_kd.distill import Distiller, losses
    from edge_kd.keras import keras, tf

    rng = np.random.default_rng(0)
    x = rng.random((batch * 4, *shape), dtype=np.float32)
    y = rng.integers(0, 10, batch * 4)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch, drop_remainder=True).repeat()

    keras.utils.set_random_seed(0)
    student = models.build(student_spec[0], shape, 10, **student_spec[1])
    teacher = models.build(teacher_spec[0], shape, 10, **teacher_spec[1])
    alone = models.build(student_spec[0], shape, 10, **student_spec[1])
    alone.set_weights(student.get_weights())
    student3, teacher3 = to_keras3(student), to_keras3(teacher)

    d = Distiller(student, teacher, terms=[losses.get("hinton", temperature=4.0, weight=0.5)], hard_weight=0.5)
    d.compile(optimizer=keras.optimizers.Adam(1e-3))
    alone.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    k3d = k3.distillation.Distiller(teacher=teacher3, student=student3,
                                    distillation_losses=k3.distillation.LogitsDistillation(temperature=4.0),
                                    student_loss_weight=0.5)
    k3d.compile(optimizer=k3.optimizers.Adam(1e-3), loss=k3.losses.SparseCategoricalCrossentropy(from_logits=True),
                metrics=["accuracy"])

    fixed = tf.constant(x[:batch])  # the teacher's pass alone: no second data fetch charged to the floor
    forward = tf.function(lambda: teacher(fixed, training=False))
    runs = {}
    for name, model in (("edge-kd", d), ("student alone", alone), ("Keras 3", k3d)):
        model.make_train_function()  # tf_keras returns it, Keras 3 only sets it
        runs[name] = (lambda f, i: lambda: f(i))(model.train_function, iter(data))
    runs["teacher forward"] = forward
    # Keras 3's own default ("auto": XLA where it can); edge-kd keeps XLA off on the CPU, where it is slower
    return runs, {"edge-kd": bool(d.jit_compile), "Keras 3": str(k3d.jit_compile)}


def measure(runs: dict, steps: int, rounds: int, clock=time.perf_counter) -> dict:
    """Returns {name: [seconds of ``steps`` steps, one per round]}, the names timed in turn each round."""
    for fn in runs.values():  # warm-up: traces and first runs
        for _ in range(max(2, steps // 4)):
            fn()
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            start = clock()
            for _ in range(steps):
                fn()  # a compiled call returns when its step has run: nothing is left queued on the CPU
            times[name].append(clock() - start)
    return times


def summarise(times: dict, steps: int, batch: int) -> dict:
    """Returns images per second per contender and the two ratios (median over rounds, with the IQR)."""
    edge, alone = np.asarray(times["edge-kd"]), np.asarray(times["student alone"])
    teacher, k3 = np.asarray(times["teacher forward"]), np.asarray(times["Keras 3"])

    def stat(v):
        q1, med, q3 = np.percentile(v, [25, 50, 75])
        return {"median": float(med), "q1": float(q1), "q3": float(q3)}

    return {"images_per_second": {n: stat(steps * batch / np.asarray(t)) for n, t in times.items()},
            "floor_ratio": stat(edge / (alone + teacher)), "keras3_ratio": stat(k3 / edge),
            "rounds": len(edge), "steps": steps, "batch": batch}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--quick", action="store_true", help="2 steps, 2 rounds, batch 16, the first pair (the tests)")
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "throughput.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.rounds, args.batch = 2, 2, 16
    pairs = dict(list(PAIRS.items())[:1]) if args.quick else PAIRS
    results = {}
    for name, (shape, student, teacher) in pairs.items():
        print(f"{name}: {args.rounds} rounds of {args.steps} steps at batch {args.batch}", flush=True)
        runs, jit = contenders(shape, student, teacher, args.batch)
        s = {**summarise(measure(runs, args.steps, args.rounds), args.steps, args.batch), "jit_compile": jit}
        results[name] = s
        print(f"  floor_ratio {s['floor_ratio']['median']:.3f} (IQR {s['floor_ratio']['q1']:.3f}–"
              f"{s['floor_ratio']['q3']:.3f}), keras3_ratio {s['keras3_ratio']['median']:.3f} "
              f"(IQR {s['keras3_ratio']['q1']:.3f}–{s['keras3_ratio']['q3']:.3f}); images/s: "
              + ", ".join(f"{n} {v['median']:.0f}" for n, v in s["images_per_second"].items()), flush=True)
    write_json(args.json, {
        "command": "python benchmarks/throughput.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": stats.machine(), "goals": GOALS,
        "pairs": results})
    print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
