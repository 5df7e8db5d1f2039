"""The benchmark stage: every model of the run measured with LiteRT (Keras rows with Keras) on the whole test set.

A run without a test set (``data.source: synthetic`` without ``data.test``) has no accuracy: each model's
``val_accuracy`` is then its agreement with the teacher on the held-out synthetic images, and the validation split
stands in for the test images that latency and the per-layer error run on.

Per .tflite: accuracy, latency (all files in interleaved rounds), peak memory, minimum runtime and op
versions, sparsity, parity with its Keras model, ops and XNNPACK fallbacks, and for the integer
variants each layer's error against the float graph of the same Keras model (on a test sample).
"""
from __future__ import annotations

import os
from typing import Annotated, Optional

from edge_kd.config import Bool, Field, Float, Int
from pipelines import run_data, run_keys, run_models
from pipelines.stage import Stage, StageSettings


class BenchmarkSettings(StageSettings):
    threads: Annotated[list[Annotated[Int, Field(ge=1)]], Field(min_length=1)] = [1, 2]
    #: each model's timed runs last at least this long in all, split evenly over the rounds (benchmark_model: 1 s)
    min_seconds: Annotated[Float, Field(ge=0)] = 1.0
    #: the models are timed in turn (A B C … A B C …) this many times; the report gives the median over rounds
    rounds: Annotated[Int, Field(ge=3)] = 10
    #: warm-up of each model before the rounds start (benchmark_model: 0.5 s)
    warmup_seconds: Annotated[Float, Field(ge=0)] = 0.5
    #: test images the per-layer quantization error runs on
    layer_error_samples: Annotated[Int, Field(ge=1)] = 256
    #: also each model's accuracy on the whole validation split (val_accuracy), what settings and the bundle's
    #: file are chosen on; null: when the bundle stage picks its file itself (stages.bundle.pick null)
    validation: Optional[Bool] = None


class Benchmark(Stage):
    name = "benchmark"
    settings = BenchmarkSettings
    required = True

    def title(self, recipe):
        return f"benchmark with LiteRT at {', '.join(map(str, recipe.stages.benchmark.threads))} thread(s)"

    def resolve(self, settings, recipe):
        if settings.validation is None:
            bundle = recipe.stages.bundle
            settings.validation = bundle is not None and bundle.enabled and bundle.pick is None
            return ["validation"]
        return []

    def reads(self, ctx):
        return [n for n in ctx.enabled() if ctx.stages[n].keras_row is not None or n == "export"]

    def key(self, ctx):
        return {**run_keys.data_key(ctx), "teacher": run_keys.teacher_key(ctx)}

    def run(self, ctx, out):
        import json

        import numpy as np

        from edge_kd import interrupt
        from edge_kd.bench import compat, layer_error, litert, parity, stats
        from edge_kd.bench.results import ModelRow
        from edge_kd.export import tflite
        from edge_kd.fileio import write_json

        r, data = ctx.recipe, run_data.load(ctx)
        info = data.info
        y_test = data.labels("test")
        tested = len(y_test) > 0  # a run without training images may have no test set (data.test null)
        plan = json.loads((ctx.stage_dir("export") / "exports.json").read_text())
        sources = {}

        def source_model(stage):
            if stage not in sources:
                sources[stage] = run_models.teacher(ctx) if stage == "teacher" else run_models.saved_student(ctx, stage)
            return sources[stage]

        def top1(out):
            return litert.top1(out, y_test) if tested else None

        def row(name, role, fmt, variant, stage, rel, file, acc, **figures):
            size, gz = stats.file_sizes(file)
            model = source_model(stage if stage == "teacher" else ctx.stages[stage].weights_stage(ctx))
            return ModelRow(name=name, role=role, format=fmt, variant=variant, stage=stage, path=rel,
                            accuracy=None if acc is None else float(acc), size_bytes=int(size), gzip_bytes=int(gz),
                            params=stats.count_params(model), macs=stats.count_macs(model),
                            input_scale=float(info.input_scale), input_offset=float(info.input_offset), **figures)

        keras_rows = [("teacher", "teacher", "teacher")] if r.teacher is not None else []
        keras_rows += [(*ctx.stages[n].keras_row, n) for n in ctx.enabled()
                       if n != "teacher" and ctx.stages[n].keras_row is not None]
        files = {item["name"]: ctx.run_dir / item["path"] for item in plan}
        # One pass over the test split, a chunk at a time (a streamed split need not fit in memory): every
        # Keras model's and every file's outputs, for accuracy and parity
        stages = list(dict.fromkeys([s for _, _, s in keras_rows] + [i["stage"] for i in plan]))
        # chunks of at most 64 MB of input, interpreter batches of at most 16 MB (2,048 and 256 for small images)
        lite = {name: litert.TFLiteModel(file) for name, file in files.items()}
        lite_batch = data.chunk(2**24, 256)

        def outputs_of(split):
            outputs = {k: [] for k in [*stages, *files]}
            for x, _ in data.batches(split, data.chunk(most=2048)):
                interrupt.check()
                for stage in stages:
                    outputs[stage].append(source_model(stage).predict(x, batch_size=lite_batch, verbose=0))
                for name in files:
                    outputs[name].append(lite[name].predict(x, batch_size=lite_batch))
            return {k: np.concatenate(v) for k, v in outputs.items()}

        # without a test set, the validation split is all there is to measure on (parity included)
        outputs = outputs_of("test" if tested else "val")
        b = r.stages.benchmark
        val = None
        if b.validation or not tested:
            y_val, val_outputs = data.labels("val"), outputs_of("val") if tested else outputs
            val = {k: litert.top1(v, y_val) for k, v in val_outputs.items()}
            del val_outputs
        lite.clear()
        rows = []
        for name, role, stage in keras_rows:
            file = (run_models.teacher_file(ctx) if stage == "teacher"
                    else ctx.stage_dir(stage) / ctx.stages[stage].model_file)
            rel = os.path.relpath(file, ctx.run_dir) if stage != "teacher" or r.teacher.path is None else str(file)
            rows.append(row(name, role, "keras", "fp32", stage, rel, file, top1(outputs[stage]),
                            val_accuracy=val and val[stage]))
        x_error, _ = data.first("test" if tested else "val", b.layer_error_samples)
        print(f"  timing {len(files)} models at {', '.join(map(str, b.threads))} thread(s) in {b.rounds} interleaved "
              "rounds", flush=True)
        latencies = litert.latency_rounds(files, x_error[0], b.threads, rounds=b.rounds,
                                          round_seconds=b.min_seconds / b.rounds, warmup_seconds=b.warmup_seconds)
        floats = {}
        for item in plan:
            interrupt.check()
            file = files[item["name"]]
            sparsity = stats.tflite_weight_sparsity(file)
            found = compat.runtime(file)
            error = None
            if item["variant"] in tflite.INTEGER:
                if item["stage"] not in floats:  # the float graph of the very Keras model the file was made from
                    fp32 = next((i for i in plan if i["stage"] == item["stage"] and i["variant"] == "fp32"), None)
                    floats[item["stage"]] = (files[fp32["name"]].read_bytes() if fp32
                                             else tflite.convert(source_model(item["stage"]), "fp32"))
                error = layer_error.layer_errors(floats[item["stage"]], file, x_error)
            rows.append(row(item["name"], item["role"], "tflite", item["variant"], item["stage"], item["path"], file,
                            top1(outputs[item["name"]]), val_accuracy=val and val[item["name"]],
                            latency=latencies[item["name"]],
                            sparsity=sparsity["overall"],
                            sparsity_layers={stats.layer_of(k): v["sparsity"] for k, v in sparsity["layers"].items()},
                            parity=parity.parity(source_model(item["stage"]), file, tflite_outputs=outputs[item["name"]],
                                                 keras_outputs=outputs[item["stage"]]),
                            ops=parity.ops(file), min_runtime=found["min_runtime"], op_versions=found["ops"],
                            memory=litert.peak_memory(file), layer_error=error,
                            float_layers=item.get("float_layers"), calibration=item.get("calibration")))
        teacher_acc = rows[0].accuracy if r.teacher is not None else None
        for m in rows:
            m.gap_to_teacher = None if teacher_acc is None or m.accuracy is None else teacher_acc - m.accuracy
        write_json(out / "models.json", {"models": [m.to_dict() for m in rows], "runtime": litert.runtime_info(),
                                         "teacher": ctx.teacher_info if r.teacher is not None else None})
        return {"models": len(rows)}
