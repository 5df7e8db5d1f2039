"""The benchmark stage: every model of the run measured with LiteRT (Keras rows with Keras) on the whole test set.

Per .tflite: accuracy, latency (all files in interleaved rounds), peak memory, minimum runtime and op
versions, sparsity, parity with its Keras model, ops and XNNPACK fallbacks, and for the integer
variants each layer's error against the float graph of the same Keras model (on a test sample).
"""
from __future__ import annotations

import os
from typing import Annotated

from edge_kd.config import Field, Float, Int
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


class Benchmark(Stage):
    name = "benchmark"
    settings = BenchmarkSettings
    required = True

    def title(self, recipe):
        return f"benchmark with LiteRT at {', '.join(map(str, recipe.stages.benchmark.threads))} thread(s)"

    def reads(self, ctx):
        return [n for n in ctx.enabled() if ctx.stages[n].keras_row is not None or n == "export"]

    def key(self, ctx):
        return {**ctx.data_key(), "teacher": ctx.teacher_key()}

    def run(self, ctx, out):
        import json

        from edge_kd.bench import compat, layer_error, litert, parity, stats
        from edge_kd.bench.results import ModelRow
        from edge_kd.export import tflite
        from edge_kd.fileio import write_json

        r, info = ctx.recipe, ctx.bundle.info
        x_test, y_test = ctx.bundle.arrays("test")
        plan = json.loads((ctx.stage_dir("export") / "exports.json").read_text())
        sources = {}

        def source_model(stage):
            if stage not in sources:
                sources[stage] = ctx.teacher() if stage == "teacher" else ctx.load_student(stage)
            return sources[stage]

        def row(name, role, fmt, variant, stage, rel, file, acc, **tflite_figures):
            size, gz = stats.file_sizes(file)
            model = source_model(stage if stage == "teacher" else ctx.stages[stage].weights_stage(ctx))
            return ModelRow(name=name, role=role, format=fmt, variant=variant, stage=stage, path=rel,
                            accuracy=float(acc), size_bytes=int(size), gzip_bytes=int(gz),
                            params=stats.count_params(model), macs=stats.count_macs(model),
                            input_scale=float(info.input_scale), input_offset=float(info.input_offset), **tflite_figures)

        keras_rows = [("teacher", "teacher", "teacher")] if r.teacher is not None else []
        keras_rows += [(*ctx.stages[n].keras_row, n) for n in ctx.enabled()
                       if n != "teacher" and ctx.stages[n].keras_row is not None]
        rows = []
        for name, role, stage in keras_rows:
            model = source_model(stage)
            file = ctx.teacher_file() if stage == "teacher" else ctx.stage_dir(stage) / ctx.stages[stage].model_file
            rel = os.path.relpath(file, ctx.run_dir) if stage != "teacher" or r.teacher.path is None else str(file)
            acc = stats.keras_accuracy(model, x_test, y_test, batch_size=512)
            rows.append(row(name, role, "keras", "fp32", stage, rel, file, acc))
        b = r.stages.benchmark
        files = {item["name"]: ctx.run_dir / item["path"] for item in plan}
        print(f"  timing {len(files)} models at {', '.join(map(str, b.threads))} thread(s) in {b.rounds} interleaved "
              "rounds", flush=True)
        latencies = litert.latency_rounds(files, x_test[0], b.threads, rounds=b.rounds,
                                          round_seconds=b.min_seconds / b.rounds, warmup_seconds=b.warmup_seconds)
        floats, predicted = {}, {}

        def keras_outputs(stage):  # each Keras model's outputs on the test set, once for all its files
            if stage not in predicted:
                predicted[stage] = source_model(stage).predict(x_test, batch_size=256, verbose=0)
            return predicted[stage]

        for item in plan:
            file = files[item["name"]]
            outputs = litert.TFLiteModel(file).predict(x_test)  # one pass over the test set: accuracy and parity
            acc = litert.top1(outputs, y_test)
            sparsity = stats.tflite_weight_sparsity(file)
            found = compat.runtime(file)
            error = None
            if item["variant"] in tflite.INTEGER:
                if item["stage"] not in floats:  # the float graph of the very Keras model the file was made from
                    fp32 = next((i for i in plan if i["stage"] == item["stage"] and i["variant"] == "fp32"), None)
                    floats[item["stage"]] = (files[fp32["name"]].read_bytes() if fp32
                                             else tflite.convert(source_model(item["stage"]), "fp32"))
                error = layer_error.layer_errors(floats[item["stage"]], file, x_test[: b.layer_error_samples])
            rows.append(row(item["name"], item["role"], "tflite", item["variant"], item["stage"], item["path"], file,
                            acc, latency=latencies[item["name"]], sparsity=sparsity["overall"],
                            sparsity_layers={stats.layer_of(k): v["sparsity"] for k, v in sparsity["layers"].items()},
                            parity=parity.parity(source_model(item["stage"]), file, x_test, tflite_outputs=outputs,
                                                 keras_outputs=keras_outputs(item["stage"])),
                            ops=parity.ops(file), min_runtime=found["min_runtime"], op_versions=found["ops"],
                            memory=litert.peak_memory(file), layer_error=error,
                            float_layers=item.get("float_layers")))
        teacher_acc = rows[0].accuracy if r.teacher is not None else None
        for m in rows:
            m.gap_to_teacher = None if teacher_acc is None else teacher_acc - m.accuracy
        write_json(out / "models.json", {"models": [m.to_dict() for m in rows], "runtime": litert.runtime_info(),
                                         "teacher": ctx.teacher_info if r.teacher is not None else None})
        return {"models": len(rows)}
