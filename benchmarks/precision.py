"""What ``training.mixed_precision`` buys on this host, side by side, and what it costs the teacher's outputs.

On the CIFAR-10 pair of ``recipes/cifar10_resnet8.yaml`` (the student ResNet-8, the teacher ``builtin:cifar10``),
six compiled functions on the same batch of 128 random 32×32×3 images (speed does not depend on the values), each
``--steps`` steps per timing, in interleaved rounds after a warm-up (``benchmarks/throughput.py``'s ``measure``):

- **teacher forward**, float32 and under the policy: the teacher file's model and its copy computing in 16 bits
  (``edge_kd.train.computing_in``, what a distilling stage uses under bfloat16);
- **distill step**: the ``Distiller`` (Hinton T 4 at 0.9, hard 0.1, SGD with Nesterov momentum) of a float32
  student and teacher, and of a student built under the policy with the teacher's 16-bit copy;
- **alone step**: the same student trained alone (the baseline stage's step), in both.

The policy is ``mixed_bfloat16``, the one under which the pipeline's teacher computes in 16 bits (under float16, on
a GPU, it stays float32); the record says what ``mixed_precision: true`` takes on this host. With ``../shared`` it
also compares the two teachers on the real CIFAR-10 test split (``cifar10_jpeg75.npz``): each one's accuracy, how
often their top classes agree, and the largest gap between their soft targets at T = 4. Writes
``benchmarks/results/precision.json``. ``--quick`` (the test suite's mode) times 1 step, 1 round, batch 8.

    python benchmarks/precision.py
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from edge_kd.bench import stats
from edge_kd.fileio import write_json

sys.path.insert(0, str(Path(__file__).parent))
from throughput import measure  # noqa: E402  (the interleaved rounds of the Distiller's throughput benchmark)

ROOT = Path(__file__).resolve().parents[1]
CIFAR10 = ROOT.parent / "shared" / "data" / "cifar10_jpeg75.npz"
SHAPE, CLASSES, TEACHER = (32, 32, 3), 10, "builtin:cifar10"


def contenders(policy: str, batch: int) -> tuple[dict, object, object]:
    """Returns ({name: zero-argument callable running one compiled step}, float32 teacher, 16-bit teacher)."""
    import models
    from edge_kd import train
    from edge_kd.distill import Distiller, losses
    from edge_kd.distill.teacher import load_teacher
    from edge_kd.builtin_teachers import resolve
    from edge_kd.keras import keras, tf

    rng = np.random.default_rng(0)
    x = rng.random((batch, *SHAPE), dtype=np.float32)
    y = rng.integers(0, CLASSES, batch)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch).cache().repeat()
    teacher32 = load_teacher(resolve(TEACHER))
    teacher16 = train.computing_in(teacher32, policy)
    fixed = tf.constant(x)
    runs = {"teacher forward, float32": tf.function(lambda: teacher32(fixed, training=False)),
            f"teacher forward, {policy}": tf.function(lambda: teacher16(fixed, training=False))}
    for name, p, teacher in (("float32", "float32", teacher32), (policy, policy, teacher16)):
        with train.precision(p):
            for kind in ("distill", "alone"):
                keras.utils.set_random_seed(0)
                student = models.build("resnet8", SHAPE, CLASSES)
                d = (Distiller(student, teacher, terms=[losses.get("hinton", temperature=4.0, weight=0.9)],
                               hard_weight=0.1) if kind == "distill" else Distiller(student))
                d.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True))
                runs[f"{kind} step, {name}"] = (lambda f, i: lambda: f(i))(d.make_train_function(), iter(data))
    return runs, teacher32, teacher16


def teachers_compared(teacher32, teacher16, limit: int | None = None) -> dict | None:
    """Returns each teacher's accuracy on CIFAR-10's test split, how often their top classes agree and the largest
    absolute gap between their softmax(logits / 4); None without ``../shared``."""
    if not CIFAR10.is_file():
        return None
    from edge_kd import data
    from edge_kd.keras import tf

    bundle = data.load(str(CIFAR10), limit_test=limit)
    x, y = bundle.arrays("test")  # normalised as the pipeline feeds its teacher
    a, b = (np.concatenate([m.predict_on_batch(x[i:i + 500]) for i in range(0, len(x), 500)]).astype(np.float64)
            for m in (teacher32, teacher16))
    soft = [tf.nn.softmax(v / 4.0).numpy() for v in (a, b)]
    return {"images": int(len(y)), "accuracy_float32": float((a.argmax(1) == y).mean()),
            "accuracy_16bit": float((b.argmax(1) == y).mean()), "top_class_agreement": float(
                (a.argmax(1) == b.argmax(1)).mean()), "max_logit_gap": float(np.abs(a - b).max()),
            "max_soft_target_gap_t4": float(np.abs(soft[0] - soft[1]).max())}


def main(argv=None):
    from edge_kd import mixed
    from edge_kd.keras import tf

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--quick", action="store_true", help="1 step, 1 round, batch 8, 64 test images (the tests)")
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "precision.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.rounds, args.batch = 1, 1, 8
    policy = mixed.MIXED["bfloat16"]
    chosen, why = mixed.mixed_policy(True, gpu=bool(tf.config.list_physical_devices("GPU")))
    print(f"{policy}: {args.rounds} rounds of {args.steps} steps at batch {args.batch} (mixed_precision: true takes "
          f"{chosen or 'float32'} here: {why})", flush=True)
    runs, teacher32, teacher16 = contenders(policy, args.batch)
    times = measure(runs, args.steps, args.rounds)
    ms = {n: 1000 * float(np.median(t)) / args.steps for n, t in times.items()}
    speedup = {kind: float(np.median(np.asarray(times[f"{kind}, float32"]) / np.asarray(times[f"{kind}, {policy}"])))
               for kind in ("teacher forward", "distill step", "alone step")}
    for n, v in ms.items():
        print(f"  {n}: {v:.1f} ms")
    for kind, v in speedup.items():
        print(f"  {kind}: {v:.2f}x faster under {policy} (median over rounds of float32 time / {policy} time)")
    compared = teachers_compared(teacher32, teacher16, limit=64 if args.quick else None)
    if compared:
        print("  teacher on the test split ({images} images): float32 {accuracy_float32:.2%}, 16-bit "
              "{accuracy_16bit:.2%}; top classes agree on {top_class_agreement:.2%}; largest soft-target gap at T 4 "
              "{max_soft_target_gap_t4:.4f}".format(**compared))
    result = {"command": "python benchmarks/precision.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": stats.machine(), "policy": policy, "true_takes": chosen or "float32", "why": why,
              "batch": args.batch, "steps": args.steps,
              "rounds": args.rounds, "ms_per_step": ms, "speedup": speedup, "teachers": compared}
    write_json(args.json, result)
    print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
