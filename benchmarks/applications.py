"""What tfmot and LiteRT make of each keras.applications model in the registry: prune, PQAT, int8, XNNPACK.

For each model (untrained, ``weights=None``: what the tools do depends on the graph, not the weights) at
``--size`` px: the layers pruning wraps and those it leaves dense; the layers tfmot 0.8.1's sparsity-preserving
8-bit scheme cannot quantize (left in float, as ``qat.unsupported: float`` does); the PQAT model converted to int8
with the representative images; and, read from the file under LiteRT 2.3.0, its ops and the ops the XNNPACK
delegate leaves to LiteRT's own kernels (``edge_kd.bench.parity.ops``). Writes
``benchmarks/results/applications.json`` and prints a markdown table.

    python benchmarks/applications.py              # about 6 min on 2 cores
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import models
from edge_kd.bench import parity, stats
from edge_kd.tfmot import prune, qat
from edge_kd.tfmot.config import PruneConfig, QATConfig
from edge_kd.export.tflite import convert
from edge_kd.fileio import write_json
from edge_kd.keras import keras

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = {"mobilenet_v2": {"alpha": 0.35}, "mobilenet_v3_small": {"alpha": 0.75, "minimalistic": True},
           "mobilenet_v3_large": {"alpha": 0.75}, "efficientnet_b0": {}, "resnet50_v2": {}}


def one(name: str, options: dict, size: int) -> dict:
    keras.utils.set_random_seed(0)
    model = models.build(name, (size, size, 3), 10, **options)
    start = time.perf_counter()
    plan = prune.plan(model, PruneConfig(target_sparsity=0.5, frequency=1), 2)
    sparse = prune.strip(prune.prune(model, PruneConfig(target_sparsity=0.5, frequency=1), 2))
    quantized = qat.quantize(sparse, QATConfig(preserve_sparsity=True, unsupported="float"))
    x = np.random.default_rng(0).random((8, size, size, 3)).astype(np.float32)
    flat = convert(quantized, "int8", representative=x, int8_io=True)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"{name}.tflite"
        path.write_bytes(flat)
        ops = parity.ops(path)
    float_classes = sorted({type(quantized.get_layer(n)).__name__ for n in quantized.qat_float_layers})
    return {"model": name, "options": options, "params": model.count_params(), "int8_bytes": len(flat),
            "pruned_layers": len(plan.pruned), "dense_layers": [n for n, _ in plan.skipped],
            "dense_because": sorted({r for _, r in plan.skipped}),
            "pqat_float_layers": list(quantized.qat_float_layers), "pqat_float_classes": float_classes,
            "ops": ops["ops"], "xnnpack_fallback": ops["xnnpack_fallback"],
            "xnnpack_partitions": ops["xnnpack_partitions"], "seconds": round(time.perf_counter() - start, 1)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "applications.json"))
    args = p.parse_args(argv)
    rows = []
    print(f"| model | params | int8 KB | pruned / left dense | PQAT float layers | XNNPACK partitions | falls back |\n"
          "|---|---:|---:|---|---|---:|---|")
    for name, options in OPTIONS.items():
        r = one(name, options, args.size)
        rows.append(r)
        fallback = ", ".join(f"{k}×{v}" for k, v in sorted(r["xnnpack_fallback"].items())) or "none"
        print(f"| {name} {options or ''} | {r['params']:,} | {r['int8_bytes'] / 1024:,.1f} | {r['pruned_layers']} / "
              f"{len(r['dense_layers'])} | {len(r['pqat_float_layers'])} ({', '.join(r['pqat_float_classes'])}) | "
              f"{r['xnnpack_partitions']} | {fallback} |", flush=True)
    write_json(args.json, {"command": "python benchmarks/applications.py " + " ".join(argv or sys.argv[1:]),
                           "machine": stats.machine(), "size": args.size, "rows": rows})
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
