"""Photos at phone resolution, measured: a MobileNetV2 (alpha 0.35) student at 96 px, distilled from an EfficientNetB0
teacher fine-tuned by BiT-HyperRule, pruned and PQAT'd, against the same student trained alone, over seeds.

Data: the first ``--train`` training and ``--test`` test images of ``../shared/data/cifar10_jpeg75.npz`` (CIFAR-10
stored as JPEG q75), written to ``<out>/cifar10_subset.npz`` at their own 32×32 (so BiT-HyperRule sees the source
size: resize 160, crop 128) and upsampled to 96×96 by the recipe's ``data.image_size``.

1. **Pretrained weights, in-project.** Nothing here may download ImageNet weights, so EfficientNetB0 is trained
   from scratch on the seed-0 training split (validation and test images unseen) at ``--pretrain-size`` px for
   ``--pretrain-epochs`` epochs (Adam, translate and flip) and saved with ``save_weights``: the user's backbone file.
2. **Seed 0**: ``pipelines/recipes/photos_mobilenetv2.yaml`` with ``teacher.finetune: bit`` from that file
   (``teacher.bit_scale`` shortens the rule's 500 steps for the CPU budget), the student distilled, the baseline
   (the same student alone: same data, augmentation, epochs and initial weights), pruned, PQAT, int8, LiteRT.
3. **Seeds 1, 2**: the same recipe with seed 0's fine-tuned teacher as ``teacher.path`` (one teacher for all
   seeds; seed 0's training split may hold some of their validation images, which nothing here chooses on).

Writes ``benchmarks/results/photos.json`` and prints a table (test split; validation beside it).

    python benchmarks/photos.py                     # the figures in docs/benchmarks.md (about 50 min on 2 cores)
    python benchmarks/photos.py --train 600 --test 200 --pretrain-epochs 1 --seeds 0 --set distill.epochs=1 \\
        --set prune.epochs=1 --set qat.epochs=1 --bit-scale 0.02 --out /tmp/quick        # a smoke run
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np

from edge_kd.bench import stats
from edge_kd.bench.results import rows_of
from edge_kd.fileio import write_json
from pipelines import recipe as recipe_mod
from pipelines.run import run

sys.path.insert(0, str(Path(__file__).parent))
from default_gain import stage_val  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT.parent / "shared" / "data" / "cifar10_jpeg75.npz"
RECIPE = recipe_mod.RECIPES / "photos_mobilenetv2.yaml"


def subset(out: Path, n_train: int, n_test: int) -> Path:
    """Writes the first ``n_train``/``n_test`` images of the CIFAR-10 file (with its class names) as an .npz."""
    path = out / "cifar10_subset.npz"
    if not path.exists():
        out.mkdir(parents=True, exist_ok=True)
        with np.load(SOURCE) as f:
            np.savez(path, x_train=f["x_train"][:n_train], y_train=f["y_train"][:n_train],
                     x_test=f["x_test"][:n_test], y_test=f["y_test"][:n_test],
                     class_names=np.array(["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                           "ship", "truck"]))
    return path


def pretrain(data_path: Path, out: Path, size: int, epochs: int) -> dict:
    """Trains EfficientNetB0 from scratch on the seed-0 training split at ``size`` px; saves its weights (.h5)."""
    import models
    from edge_kd import data, train
    from edge_kd.augment import AugmentConfig, Augmenter
    from edge_kd.distill import Distiller
    from edge_kd.keras import keras

    path = out / "efficientnet_b0_pretrained.h5"
    record = out / "pretrain.json"
    if path.exists() and record.exists():
        return json.loads(record.read_text())
    b = data.load(str(data_path), image_size=(size, size), seed=0)
    keras.utils.set_random_seed(0)
    model = models.build("efficientnet_b0", b.info.input_shape, b.info.num_classes)
    d = Distiller(model, augment=Augmenter(AugmentConfig(translate=size // 8, flip=True), seed=0))
    start = time.perf_counter()
    history = train.fit(d, b.dataset("train", 64, shuffle=True, seed=0), epochs, 1e-3,
                        validation=b.dataset("val", 512))
    model.save_weights(path)
    info = {"file": str(path), "arch": "efficientnet_b0", "size": size, "epochs": epochs,
            "train_images": b.count("train"), "val_accuracy": history["val_accuracy"][-1],
            "seconds": round(time.perf_counter() - start, 1)}
    write_json(record, info)
    return info


def one(seed: int, out: Path, data_path: Path, teacher: list[str], extra: list[str]) -> tuple[dict, Path]:
    """Runs the photos recipe at ``seed``; returns what it measured and the run folder."""
    r = recipe_mod.load(RECIPE)
    r = recipe_mod.apply_overrides(r, [f"seed={seed}", f"name=photos-seed{seed}", f"data.source={data_path}",
                                       *teacher, *extra])
    start = time.perf_counter()
    run_dir = run(r, out=out, command=f"benchmarks/photos.py (seed {seed})", stream=io.StringIO())
    seconds = time.perf_counter() - start
    results = json.loads((run_dir / "results.json").read_text())
    m = {row.name: row for row in rows_of(results["models"])}
    val = {s: stage_val(run_dir, s) for s in ("distill", "baseline")}
    final = m["qat-int8"]
    lat = (final.latency or {}).get("1", {}) or {}
    row = {"seed": seed, "seconds": round(seconds, 1), "teacher": m["teacher"].accuracy,
           "distilled": m["student"].accuracy, "baseline": m["baseline"].accuracy,
           "distilled_val": val["distill"], "baseline_val": val["baseline"],
           "gain_pp": 100 * (m["student"].accuracy - m["baseline"].accuracy),
           "gain_val_pp": 100 * (val["distill"] - val["baseline"]),
           "final_int8": final.accuracy, "final_int8_bytes": final.size_bytes, "final_int8_gzip": final.gzip_bytes,
           "final_int8_latency_ms": lat.get("median_ms"), "final_sparsity": final.sparsity,
           "xnnpack_fallback": (final.ops or {}).get("xnnpack_fallback"),
           "float_layers": json.loads((run_dir / "manifests" / "qat.json").read_text())["summary"].get("float_layers"),
           "run": str(run_dir)}
    return row, run_dir


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--train", type=int, default=5000)
    p.add_argument("--test", type=int, default=2000)
    p.add_argument("--pretrain-size", type=int, default=64)
    p.add_argument("--pretrain-epochs", type=int, default=15)
    p.add_argument("--bit-scale", type=float, default=0.4)
    p.add_argument("--out", default=str(ROOT / "tflite_out" / "bench-photos"))
    p.add_argument("--set", action="append", default=[], dest="extra", help="overrides of the recipe (key=value)")
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "photos.json"))
    args = p.parse_args(argv)
    if not SOURCE.exists():
        sys.exit(f"{SOURCE} not present")
    out = Path(args.out)
    data_path = subset(out, args.train, args.test)
    pre = pretrain(data_path, out, args.pretrain_size, args.pretrain_epochs)
    print(f"pretrained efficientnet_b0 at {pre['size']} px, {pre['epochs']} epochs: val {100 * pre['val_accuracy']:.2f} %"
          f" in {pre['seconds']:.0f} s", flush=True)
    rows, bit_teacher, rule = [], None, None
    for seed in args.seeds:
        if bit_teacher is None:
            teacher = ["teacher.finetune=bit", "teacher.backbone=efficientnet_b0", f"teacher.weights={pre['file']}",
                       f"teacher.bit_scale={args.bit_scale}"]
        else:
            teacher = [f"teacher.path={bit_teacher}"]
        row, run_dir = one(seed, out, data_path, teacher, args.extra)
        if bit_teacher is None:
            bit_teacher = run_dir / "teacher" / "teacher.keras"
            rule = json.loads((run_dir / "teacher" / "bit_rule.json").read_text())
        rows.append(row)
        print(f"seed {seed}: teacher {100 * row['teacher']:.2f} %, distilled {100 * row['distilled']:.2f} % "
              f"(val {100 * row['distilled_val']:.2f}), alone {100 * row['baseline']:.2f} % "
              f"(val {100 * row['baseline_val']:.2f}): {row['gain_pp']:+.2f} pp; final int8 "
              f"{100 * row['final_int8']:.2f} % ({row['final_int8_bytes']:,} B, {row['final_int8_latency_ms']} ms); "
              f"{row['seconds']:.0f} s", flush=True)
    keys = ("teacher", "distilled", "baseline", "distilled_val", "baseline_val", "gain_pp", "gain_val_pp",
            "final_int8", "final_int8_bytes", "final_int8_gzip", "final_int8_latency_ms", "seconds")
    st = {k: stats.mean_std([r[k] for r in rows]) for k in keys if all(r.get(k) is not None for r in rows)}
    print("\n| figure (test split unless val) | mean ± std |\n|---|---:|")
    for k, (mean, sd) in st.items():
        scale = 100 if k in ("teacher", "distilled", "baseline", "distilled_val", "baseline_val", "final_int8") else 1
        print(f"| {k} | {scale * mean:.2f} ± {scale * sd:.2f} |")
    write_json(args.json, {
        "command": "python benchmarks/photos.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": stats.machine(), "data": {"source": str(SOURCE.name), "train": args.train, "test": args.test,
                                             "image_size": [96, 96]},
        "pretrain": pre, "bit_rule": rule, "rows": rows,
        "stats": {k: {"mean": m, "std": sd} for k, (m, sd) in st.items()}})
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
