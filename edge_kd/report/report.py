"""A run's results as results.json, results.csv, report.md and pareto.png.

``results`` is the dict the pipeline builds (see ``write_report``); its ``models`` are results rows
(``edge_kd.bench.results.ModelRow``, or their dicts as results.json holds them). This module only formats it.

Example::

    from edge_kd.report.report import markdown_table, write_report
    paths = write_report("tflite_out/mnist-default", results)   # {"json": ..., "csv": ..., "md": ..., "png": ...}
    print(markdown_table(results))
"""
from __future__ import annotations

import csv
import dataclasses
import io
import math
from pathlib import Path

from edge_kd.bench.results import LATENCY_FIELDS, LATENCY_SUMMARY, ModelRow, rows_of
from edge_kd.bench.stats import KB
from edge_kd.fileio import write_bytes, write_json, write_text

_MODEL_FIELDS = ("name", "role", "format", "variant", "path", "accuracy", "gap_to_teacher", "size_bytes",
                 "gzip_bytes", "params", "macs", "input_scale", "input_offset")
_ROLE_COLOURS = {"teacher": "tab:red", "student": "tab:blue", "baseline": "tab:gray"}
_FORMAT_MARKERS = {"keras": "s", "tflite": "o"}


def write_report(run_dir, results: dict) -> dict:
    """Returns {"json", "csv", "md", "png", "layers_png"}: the paths of the report files written into ``run_dir``."""
    _check(results)
    run_dir = Path(run_dir)
    plain = {**results, "models": [m.to_dict() for m in _rows(results)]}
    return {
        "json": write_json(run_dir / "results.json", plain),
        "csv": write_text(run_dir / "results.csv", results_csv(results)),
        "md": write_text(run_dir / "report.md", report_markdown(results)),
        "png": write_bytes(run_dir / "pareto.png", pareto_png(results)),
        "layers_png": write_bytes(run_dir / "layer_error.png", layer_error_png(results)),
    }


def markdown_table(results: dict) -> str:
    """Returns the results table alone as GitHub markdown, one row per model in the given order."""
    _check(results)
    header = ["model", "role", "format", "variant", "accuracy %", "Δ vs teacher (pp)", "size (KB)", "gzip (KB)",
              "sparsity %", "latency 1 thr median ms (IQR)", "latency 2 thr median ms", "peak memory (MiB)",
              "min runtime", "params", "MACs"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 4 + ["---:"] * (len(header) - 4)) + "|"]
    for m in _rows(results):
        lat1, lat2 = _latency(m, 1), _latency(m, 2)
        cells = [
            _cell(m.name), _cell(m.role), _cell(m.format), _cell(m.variant),
            _pct(m.accuracy),
            _delta(m),
            _kb(m.size_bytes), _kb(m.gzip_bytes),
            _pct(m.sparsity) if _num(m.sparsity) else "—",
            f"{_ms(lat1.get('median_ms'))} ({_ms(lat1.get('q1_ms'))}–{_ms(lat1.get('q3_ms'))})" if lat1 else "—",
            _ms(lat2.get("median_ms")) if lat2 else "—",
            _mib((m.memory or {}).get("peak_bytes")),
            _cell(m.min_runtime),
            _int(m.params), _int(m.macs),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def report_markdown(results: dict) -> str:
    """Returns report.md's text: run, command, data, runtime, the table and how to read it."""
    _check(results)
    data = results.get("data") or {}
    runtime = results.get("runtime") or {}
    threads = _threads(results)
    runs = [lat["runs"] for m in _rows(results) for lat in (m.latency or {}).values() if lat and "runs" in lat]
    shape = "×".join(str(d) for d in data.get("input_shape") or []) or "?"
    test_size = data.get("test_size")

    out = [f"# edge-kd report: {results.get('run', '?')}", ""]
    if results.get("command"):
        out += ["Command:", "", "```", str(results["command"]), "```", ""]
    if untested(results):
        out.append(f"Data: no training images (data.source synthetic) and no test set, {data.get('num_classes', '?')} "
                   f"classes, input {shape}: **accuracy is unknown**. Each model is measured instead by its agreement "
                   f"with the teacher (the share of images on which it picks the teacher's class) on "
                   f"{_int(data.get('val_size'))} synthetic images that no model trained on.  ")
    elif "test_source" in data:
        out.append(f"Data: no training images (data.source synthetic): every model after the teacher trained on "
                   f"{_int(data.get('train_size'))} images made from the teacher alone, validation accuracy is the "
                   f"agreement with the teacher on {_int(data.get('val_size'))} more that no model trained on, and "
                   f"the test split is the {_int(test_size)} test images of {data['test_source']} "
                   f"({data.get('num_classes', '?')} classes, input {shape}).  ")
    else:
        out.append(f"Data: {data.get('name', '?')}, {data.get('num_classes', '?')} classes, input {shape}, "
                   f"{_int(test_size)} test images.  ")
    out.append(f"Runtime: {runtime.get('cpu', '?')}, {runtime.get('cores', '?')} cores, "
               f"LiteRT {runtime.get('litert_version', '?')} (TensorFlow {runtime.get('tensorflow_version', '?')}, "
               f"Python {runtime.get('python', '?')}); latency measured at "
               f"{', '.join(threads) if threads else 'no'} thread(s).  ")
    if results.get("created"):
        out.append(f"Created: {results['created']}")
    warnings = chance_warnings(results)
    if warnings:
        out += ["", *(f"> **Warning: {line}**" if i == 0 else f"> - {line}" for i, line in enumerate(warnings))]
    short = summary_lines(results)
    if short:
        out += ["", "## In short", "", *short]
    out += ["", "## Every model", "", markdown_table(results)]
    out += agreement_lines(results)
    out += calibration_lines(results)
    out += _distillation_lines(results)
    for stage, summary in (results.get("stage_summaries") or {}).items():
        if (summary or {}).get("float_note"):
            out += [f"Quantization-aware training ({stage}): {summary['float_note']}.", ""]
    stages = stage_table(results)
    if stages:
        out += ["## Trade-off across stages (each stage's int8 model)", "", stages]
    if results.get("bundle"):
        b = results["bundle"]
        out += [f"Bundle: `{b.get('path', 'bundle')}/` holds **{b.get('model', '?')}** with labels, manifest, golden "
                f"vectors and app snippets; check it with `python -m pipelines.verify {results.get('run', '<run>')}/"
                f"{b.get('path', 'bundle')}` from the output folder.", ""]
    layers = sparsity_table(results)
    if layers:
        out += ["## Sparsity per layer (exact zeros in each kernel of the exported .tflite)", "", layers]
    parity = parity_table(results)
    if parity:
        where = "the held-out synthetic images" if untested(results) else "whole test set"
        out += [f"## Runtime parity and ops (Keras model vs its .tflite under LiteRT, {where})", "", parity]
    runtimes = runtime_table(results)
    if runtimes:
        out += ["## Where each file runs (read from the file: its `min_runtime_version` and op versions)", "",
                runtimes]
    errors = layer_error_table(results)
    if errors:
        sample = next(m.layer_error for m in _rows(results) if m.layer_error)
        out += ["## Per-layer quantization error (SNR in dB against float, higher is better; ★ adds the most)", "",
                f"On {_int(sample.get('samples'))} {'held-out synthetic' if untested(results) else 'test'} images. "
                f"Method: {sample.get('method')}. The float reference is the float TFLite graph of the same Keras "
                "model (for QAT models, that model's own graph with its fake quantization). "
                "[layer_error.png](layer_error.png)", "", errors]
    out += synthetic_lines(results)
    k3 = keras3_lines(results)
    if k3:
        out += ["## Keras 3 copies of the float students", "", *k3, ""]
    out += ["## Latency in detail (ms, batch 1)", "", latency_table(results)]
    ties = latency_ties(results)
    if ties:
        out += ["Latencies this run cannot rank (ordered by median, each one's interquartile range overlaps the "
                "next one's): " + " | ".join(ties) + ".", ""]
    out += ["## How to read this", ""]
    if untested(results):
        out.append("- **accuracy %**: unknown, as the run had no test set (`data.test`); the agreement with the "
                   "teacher above and in the plot stands in for it, measured the same way: `tflite` rows through the "
                   "LiteRT interpreter exactly as they would be deployed, `keras` rows through Keras.")
    else:
        out.append(f"- **accuracy %**: top-1 on the whole test set ({_int(test_size)} images); `tflite` rows are run "
                   "through the LiteRT interpreter exactly as they would be deployed (int8 inputs quantized with the "
                   "model's own scale and zero point), `keras` rows through Keras.")
    out.append("- **Δ vs teacher (pp)**: this row's accuracy minus the teacher's, in percentage points "
               "(negative = worse than the teacher).")
    out.append(f"- **size / gzip (KB)**: the file on disk and the same bytes after gzip -9 (1 KB = {KB} bytes); "
               "gzip shows what the zeros left by pruning save in a compressed download.")
    run_note = f", at least {min(runs)} timed runs per row" if runs else ""
    out.append("- **latency**: batch 1 on the CPU above, LiteRT's default XNNPACK delegate. Every file gets its own "
               "interpreter (init and first run reported), a warm-up, then all files are timed in interleaved rounds "
               "(A B C … A B C …), each round a burst of `invoke()` calls whose median is the round's figure"
               f"{run_note}; the table gives the median over rounds and its interquartile range (IQR), so a slow "
               "spell of the machine hits every file alike. Two rows whose IQRs overlap are not shown apart. "
               "`keras` rows are not timed.")
    out.append("- **peak memory (MiB)**: the growth of a fresh process's peak resident memory across creating the "
               "interpreter, allocating it and one invoke (model file, tensor arena, scratch, delegate buffers).")
    out.append("- **min runtime**: the oldest TFLite / LiteRT runtime that loads the file, as the converter stamped it "
               "from the op versions the file uses; `stages.bundle.min_runtime` bundles only files that load there.")
    out.append("- **sparsity %**: the share of exact zeros in the conv and dense kernels, read from the exported "
               "`.tflite` weights themselves (for int8, values equal to the zero point), not from the recipe.")
    out.append("- **parity**: the Keras model and its `.tflite` run on every test image; max abs diff of the "
               "(dequantized) outputs and the share of images where both pick the same class, so a loss from "
               "conversion shows and is attributed. Ops that fall back from XNNPACK run on LiteRT's slower "
               "reference kernels on the phone too.")
    out.append("- **params / MACs**: weights of the Keras model the row comes from, and multiply-accumulates of "
               "one forward pass of one image (conv, depthwise, separable and dense layers).")
    out += ["", ("Agreement with the teacher" if untested(results) else "Accuracy")
            + " against size and against 1-thread latency, with each panel's Pareto front: "
                "[pareto.png](pareto.png)", "", "![Pareto fronts](pareto.png)", ""]
    return "\n".join(out)


def summary_lines(results: dict) -> list[str]:
    """The report's answer first: the file to ship (the bundle's) with its bytes, accuracy, latency and oldest
    runtime; its gap to the teacher; what distillation changed against the same student alone. [] without a
    bundle."""
    b = results.get("bundle") or {}
    rows = _rows(results)
    ship = next((m for m in rows if m.name == b.get("model")), None)
    if ship is None:
        return []
    threads = _plot_threads(results)
    lat = (_latency(ship, threads) or {}).get("median_ms")
    runtime = ship.min_runtime or b.get("min_runtime")
    lines = [f"- **Ship `{b.get('path', 'bundle')}/{ship.name}.tflite`**: {_int(ship.size_bytes)} bytes, "
             + (f"{_pct(ship.accuracy)} % top-1 on the test set" if not untested(results) else
                f"accuracy unknown (no test set), {_pct(ship.val_accuracy)} % agreement with the teacher on held-out "
                "synthetic images")
             + (f", {lat:.3f} ms a batch-1 inference at {threads} thread(s) (median)" if _num(lat) else "")
             + (f", loads on TFLite / LiteRT {runtime} or later" if runtime else "") + "." + _picked(b)]
    teacher = next((m for m in rows if m.role == "teacher" and m.format == "tflite"), None) or \
        next((m for m in rows if m.role == "teacher"), None)
    if teacher is not None and _num(teacher.accuracy) and _num(ship.accuracy):
        size = (f", at {100 * ship.size_bytes / teacher.size_bytes:.1f} % of its {_int(teacher.size_bytes)} bytes"
                if _num(ship.size_bytes) and _num(teacher.size_bytes) and teacher.size_bytes else "")
        lines.append(f"- Against the teacher ({teacher.name}, {_pct(teacher.accuracy)} %): "
                     f"{100 * (ship.accuracy - teacher.accuracy):+.2f} pp{size}.")
    pair = _distilled_and_alone(results)
    if pair:
        s, alone = pair
        lines.append(f"- Distillation: {100 * (s - alone):+.2f} pp over the same student trained alone ({_pct(s)} % "
                     f"against {_pct(alone)} %), in this one run: one seed, so not yet a gain or a loss (under the "
                     "table).")
    return lines


def _picked(bundle: dict) -> str:
    """Returns how the bundle's file was chosen, as a sentence after the ship line ("" for a bundle recorded
    without it)."""
    if bundle.get("picked_by") == "name":
        return " Named by the recipe (`stages.bundle.pick`)."
    if bundle.get("picked_by") == "validation" and _num(bundle.get("val_accuracy")):
        return (f" Picked on the validation split, never the test split: the smallest file within "
                f"{bundle.get('tolerance_pp', 0.5):g} pp of the best student file's validation accuracy, integer "
                f"ones first (its own: {_pct(bundle['val_accuracy'])} %).")
    return ""


def calibration_lines(results: dict) -> list[str]:
    """Returns the lines that name, per set, the calibrated files (int8, int8_mixed, int16x8) calibrated on it."""
    words = {"train": "training images", "synthetic": "synthetic images made from the teacher alone (below)"}
    by = {}
    for m in _rows(results):
        if m.calibration:
            by.setdefault(m.calibration, []).append(m.name)
    return [f"Calibrated on {words.get(k, k)}: {', '.join(f'`{n}`' for n in names)}.  " for k, names in by.items()] + (
        [""] if by else [])


def synthetic_lines(results: dict) -> list[str]:
    """Returns the section on the synthesize stage's images (how they were made, how data-like, their grid), or []."""
    s = (results.get("stage_summaries") or {}).get("synthesize")
    if not s:
        return []
    return ["## Images made from the teacher alone (stage synthesize)", "",
            f"{_int(s['images'])} images, "
            + (f"drawn from a generator trained {s['steps']} iterations against a student in {s.get('rounds')} "
               f"rounds (an equal share at the end of each)" if s.get("method") == "generator"
               else f"{s['steps']} steps of DeepInversion a batch of {s['batch_size']}") + ": the "
            f"teacher gives {s['teacher_agreement']:.1%} of them the class each was made for. Their BatchNormalization "
            f"statistics loss (the distance of the teacher's per-layer batch mean and variance from the ones it "
            f"recorded in training, one batch) is {s['bn_loss']:.3g}; uniform noise scores {s['bn_loss_noise']:.3g}. "
            "A row per class: [synthetic.png](synthetic.png)", "", "![synthetic images](synthetic.png)", ""]


def untested(results: dict) -> bool:
    """Returns whether the run had no test set (data.source synthetic without data.test): accuracy is unknown."""
    data = results.get("data") or {}
    return data.get("test_size") == 0


def agreement_lines(results: dict) -> list[str]:
    """Returns, for a run without a test set, each model's agreement with the teacher on the held-out synthetic
    images (what stands in for accuracy there), or []."""
    if not untested(results):
        return []
    rows = [m for m in _rows(results) if _num(m.val_accuracy)]
    return ["Agreement with the teacher on the held-out synthetic images (no test set, so no accuracy): "
            + ", ".join(f"`{m.name}` {_pct(m.val_accuracy)} %" for m in rows) + ". Agreement on images made from the "
            "teacher is not accuracy on real images: a student can agree with the teacher there and still miss on "
            "the user's data; a labelled test set (data.test) measures that.", ""]


def _distilled_and_alone(results: dict) -> tuple[float, float] | None:
    """The test accuracies of the distilled student and of the same student trained without a teacher; None
    without both."""
    by_role = {m.role: m for m in _rows(results) if m.format == "keras"}
    if "student" not in by_role or "baseline" not in by_role:
        return None
    return by_role["student"].accuracy, by_role["baseline"].accuracy


def _distillation_lines(results: dict) -> list:
    """Returns the lines stating how the student was distilled and comparing it with the same student trained
    without a teacher, said for what one run can show; without that student (no baseline stage), the settings
    alone."""
    d = results.get("distillation") or {}
    how = ", ".join(f"{k} {v:g}" if isinstance(v, (int, float)) else f"{k} {v}" for k, v in d.items())
    pair = _distilled_and_alone(results)
    if pair is None:
        return [f"Distillation ({how}). No student was trained without distillation in this run (the recipe has no "
                "baseline stage), so it cannot say what distillation changed.", ""] if d else []
    s, b = pair
    return [f"Distillation ({how}): the distilled student scores {_pct(s)} % against {_pct(b)} % for the same "
            f"student trained without distillation (same augmentation, epochs and initial weights): "
            f"{100 * (s - b):+.2f} pp in this run. One run is one seed: a difference this size can be noise, not a "
            "gain or a loss, until it holds over seeds (`benchmarks/default_gain.py` measures the default recipe "
            "over three).", ""]


def keras3_lines(results: dict) -> list[str]:
    """One line per stage that kept a float student: its Keras 3 file (which plain Keras 3 opens), or why none."""
    lines = []
    for stage, summary in (results.get("stage_summaries") or {}).items():
        if "keras3_file" not in (summary or {}):
            continue
        if summary["keras3_file"]:
            lines.append(f"- {stage}: `{summary['keras3_file']}` (`keras.saving.load_model` in Keras 3; outputs "
                         "checked equal to the tf_keras model's within 1e-5)")
        else:
            lines.append(f"- {stage}: no Keras 3 copy: {summary.get('keras3_reason')}")
    return lines


def chance_warnings(results: dict) -> list[str]:
    """Returns one line per model group that ends at chance level, with the likeliest causes this run measured.

    Chance is the better of guessing uniformly and always answering the test split's most frequent class
    (``data.majority_fraction``); a model within two binomial standard deviations of it on the test split is
    at chance. Causes read from the training histories: the model's stage fitting its training images far
    better than its validation images (batch-normalization statistics that lag the weights), or not fitting
    even those (it did not learn); and a teacher at chance, which has nothing to pass on."""
    data = results.get("data") or {}
    n, classes = data.get("test_size") or 0, data.get("num_classes") or 0
    if not n or not classes:
        return []
    floor = max(1.0 / classes, float(data.get("majority_fraction") or 0.0))
    bar = floor + 2.0 * math.sqrt(floor * (1.0 - floor) / n)
    flagged = [m for m in _rows(results) if m.accuracy is not None and m.accuracy <= bar]
    if not flagged:
        return []
    names = ", ".join(m.name for m in flagged)
    lines = [f"at chance level: {names} (test accuracy at most {bar:.1%}; chance is {floor:.1%}: "
             f"{'always the most frequent class' if floor > 1.0 / classes else f'1 of {classes} classes'})"]
    for stage, h in (results.get("history") or {}).items():
        train, val = (h.get("accuracy") or [None])[-1], (h.get("val_accuracy") or [None])[-1]
        if train is None or val is None:
            continue
        if val <= bar and train - val >= 0.2:
            lines.append(f"{stage}: training accuracy {train:.1%} against validation {val:.1%}: the model fits its "
                         "training batches but not held-out images, the mark of batch-normalization moving "
                         "statistics that lag the weights (few steps for its momentum: more epochs or steps, or "
                         "a lower bn_momentum)")
        elif val <= bar and train <= bar:
            lines.append(f"{stage}: training accuracy {train:.1%}, validation {val:.1%}: it did not learn (check "
                         "the learning rate, the epochs and the labels)")
    if any(m.role == "teacher" for m in flagged):
        lines.append("the teacher itself is at chance on this data: distillation has nothing to pass on (is it the "
                     "teacher for these classes and this input range? --teacher-input-range)")
    return lines


def stage_table(results: dict) -> str:
    """Returns a markdown table with each compression stage's int8 TFLite model, or "" where there is none."""
    rows = [m for m in _rows(results) if m.format == "tflite" and m.variant == "int8"
            and m.role != "teacher" and m.stage]
    if not rows:
        return ""
    lines = ["| stage | model | accuracy % | Δ vs teacher (pp) | size (KB) | gzip (KB) | sparsity % | "
             "latency 1 thr median ms |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for m in rows:
        lat1 = _latency(m, 1)
        cells = [m.stage, m.name, _pct(m.accuracy), _delta(m), _kb(m.size_bytes),
                 _kb(m.gzip_bytes), _pct(m.sparsity) if _num(m.sparsity) else "—",
                 _ms(lat1.get("median_ms")) if lat1 else "—"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def sparsity_table(results: dict) -> str:
    """Returns a markdown table of per-kernel sparsity for the tflite rows that were pruned, or ""."""
    rows = [m for m in _rows(results) if m.sparsity_layers and _num(m.sparsity)
            and m.sparsity >= 0.05]
    if not rows:
        return ""
    layers = list(dict.fromkeys(k for m in rows for k in m.sparsity_layers))
    lines = ["| kernel | " + " | ".join(m.name for m in rows) + " |", "|---|" + "---:|" * len(rows)]
    for k in layers:
        lines.append(f"| {k} | " + " | ".join(_pct(m.sparsity_layers.get(k)) if k in m.sparsity_layers
                                               else "—" for m in rows) + " |")
    lines.append("| **overall** | " + " | ".join(_pct(m.sparsity) for m in rows) + " |")
    return "\n".join(lines) + "\n"


def parity_table(results: dict) -> str:
    """Returns a markdown table of each tflite row's parity with its Keras model and the ops it uses, or ""."""
    rows = [m for m in _rows(results) if m.parity]
    if not rows:
        return ""
    lines = ["| model | max abs diff | top-1 agreement % | ops | falls back from XNNPACK |",
             "|---|---:|---:|---|---|"]
    for m in rows:
        p, o = m.parity, m.ops or {}
        ops = ", ".join(f"{k}×{v}" for k, v in sorted((o.get("ops") or {}).items()))
        fallback = ", ".join(f"{k}×{v}" for k, v in sorted((o.get("xnnpack_fallback") or {}).items())) or "none"
        lines.append(f"| {m.name} | {p['max_abs_diff']:.2e} | {_pct(p.get('top1_agreement'))} | {ops or '—'} | "
                     f"{fallback} |")
    return "\n".join(lines) + "\n"


def latency_table(results: dict) -> str:
    """Returns a markdown table of every timed row's latency figures per thread count."""
    lines = ["| model | threads | init | first run | median | IQR | min–max over rounds | rounds | runs |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in _rows(results):
        for threads, lat in sorted((m.latency or {}).items(), key=lambda kv: int(kv[0])):
            if not lat:
                continue
            cells = [m.name, threads, _ms(lat.get("init_ms")), _ms(lat.get("first_ms")), _ms(lat.get("median_ms")),
                     f"{_ms(lat.get('q1_ms'))}–{_ms(lat.get('q3_ms'))}", f"{_ms(lat.get('min_ms'))}–{_ms(lat.get('max_ms'))}",
                     _int(lat.get("rounds")), _int(lat.get("runs"))]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def latency_ties(results: dict) -> list[str]:
    """Returns, per thread count, the chains of models the run cannot rank: by median, each one's IQR overlaps the next's."""
    out = []
    for threads in _threads(results):
        timed = sorted((lat["median_ms"], lat["q1_ms"], lat["q3_ms"], m.name) for m in _rows(results)
                       for lat in [_latency(m, threads)]
                       if lat and all(_num(lat.get(k)) for k in LATENCY_SUMMARY))
        chains, chain = [], []
        for med, q1, q3, name in timed:
            if chain and q1 > chain[-1][1]:  # this IQR starts above the previous one's end: a rank is shown
                chains.append(chain)
                chain = []
            chain.append((name, q3))
        chains += [chain] if chain else []
        tied = [c for c in chains if len(c) > 1]
        if tied:
            out.append(f"{threads} thread(s): " + "; ".join(" ≈ ".join(n for n, _ in c) for c in tied))
    return out


def runtime_table(results: dict) -> str:
    """Returns a markdown table of each .tflite's minimum runtime and op versions, or ""."""
    rows = [m for m in _rows(results) if m.format == "tflite" and (m.min_runtime or m.op_versions)]
    if not rows:
        return ""
    lines = ["| model | min runtime | op versions |", "|---|---|---|"]
    for m in rows:
        ops = ", ".join(f"{k} v{v}" for k, v in sorted((m.op_versions or {}).items()))
        lines.append(f"| {m.name} | {_cell(m.min_runtime)} | {ops or '—'} |")
    return "\n".join(lines) + "\n"


def layer_error_table(results: dict) -> str:
    """Returns a markdown table of each layer's SNR (dB) against float per integer .tflite, with the worst named, or ""."""
    rows = [m for m in _rows(results) if m.layer_error and m.layer_error.get("layers")]
    if not rows:
        return ""
    per_model = {m.name: _by_position(m.layer_error["layers"]) for m in rows}
    keys = list(dict.fromkeys(k for m in rows for k in per_model[m.name]))
    lines = ["| layer | " + " | ".join(m.name for m in rows) + " |", "|---|" + "---:|" * len(rows)]
    for key in keys:
        cells = []
        for m in rows:
            e = per_model[m.name].get(key)
            mark = " ★" if e and e["tensor"] in (m.layer_error.get("worst_tensors") or [])[:1] else ""
            cells.append("—" if e is None else _snr(e) + mark)
        lines.append(f"| {key[0]}{f' ({key[1] + 1})' if key[1] else ''} | " + " | ".join(cells) + " |")
    lines.append("")
    for m in rows:
        worst = list(dict.fromkeys(m.layer_error.get("worst") or []))
        kept = f"; kept in float: {', '.join(m.float_layers)}" if m.float_layers else ""
        lines.append(f"- **{m.name}**: the layers adding the most error: {', '.join(worst) or 'none'}{kept}.")
    return "\n".join(lines) + "\n"


def _by_position(layers: list[dict]) -> dict:
    """Returns {(layer label, its occurrence): entry}: ops of one Keras layer (or the output) keep apart."""
    seen: dict = {}
    out = {}
    for e in layers:
        k = seen.get(e["layer"], 0)
        seen[e["layer"]] = k + 1
        out[(e["layer"], k)] = e
    return out


def _snr(e: dict) -> str:
    if e.get("snr_db") is not None:
        return f"{e['snr_db']:.1f}"
    return "exact" if e.get("nrmse") == 0 else "n/a"


def results_csv(results: dict) -> str:
    """Returns results.csv's text: one row per model, nested latency flattened to latency_<threads>_<field>."""
    _check(results)
    threads = _threads(results)
    known = set(_MODEL_FIELDS) | {"latency"}
    # the scalar fields only: nested ones (parity, ops, layer_error, ...) are in results.json
    extra = [f.name for f in dataclasses.fields(ModelRow) if f.name not in known
             and any(getattr(m, f.name) is not None for m in _rows(results))
             and not any(isinstance(getattr(m, f.name), (dict, list)) for m in _rows(results))]
    columns = (list(_MODEL_FIELDS) + [f"latency_{t}_{f}" for t in threads for f in LATENCY_FIELDS] + extra
               + ["peak_memory_bytes"])

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for m in _rows(results):
        lat = m.latency or {}
        row = [getattr(m, k) for k in _MODEL_FIELDS]
        row += [(lat.get(t) or {}).get(f) for t in threads for f in LATENCY_FIELDS]
        row += [getattr(m, k) for k in extra] + [(m.memory or {}).get("peak_bytes")]
        writer.writerow(["" if v is None else v for v in row])
    return buf.getvalue()


#: a panel's cost axis is logarithmic when its largest value is more than this many times its smallest
LOG_SPAN = 10.0

#: the Pareto panels' marker areas (points²) and the shipped ring's line width (points)
DOT_AREA, RING_AREA, RING_LINE = 40, 220, 1.8


def pareto_png(results: dict) -> bytes:
    """Returns PNG bytes of accuracy vs size and vs batch-1 latency, each with its Pareto front (``pareto_figure``)."""
    fig, _ = pareto_figure(results)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def pareto_figure(results: dict):
    """Returns (the figure, per panel the labels written as [(text, display box)]): accuracy vs size and vs batch-1
    latency at the fewest threads timed, each with its Pareto front; the front's models and the shipped one (the
    bundle's, ringed) named beside their points, the others numbered with a key beside the panel; an axis spanning
    more than ``LOG_SPAN``× is logarithmic."""
    _check(results)
    # Figure + Agg canvas directly: no pyplot, so no global backend switch and no GUI.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 10), layout="constrained")
    FigureCanvasAgg(fig)
    ax_size, ax_lat = fig.subplots(2, 1)
    shipped = (results.get("bundle") or {}).get("model")
    size_points, lat_points = _plot_points(results)
    ylabel = ("agreement with the teacher, held-out synthetic images (%)" if untested(results)
              else "top-1 accuracy (%)")
    labels = [_panel(ax_size, size_points, "size (KB)", shipped, ylabel),
              _panel(ax_lat, lat_points, f"latency, batch 1, {_plot_threads(results)} thread(s) (ms, median over rounds)",
                     shipped, ylabel)]
    fig.suptitle(f"edge-kd: {results.get('run', '')}")
    fig.draw_without_rendering()  # lays the figure out, so that the labels are placed where they will be drawn
    return fig, [_place_labels(ax, items) for ax, items in zip((ax_size, ax_lat), labels)]


#: the most layer names layer_error.png writes under its x axis
MAX_LAYER_LABELS = 40


def layer_error_png(results: dict) -> bytes:
    """Returns PNG bytes of each integer .tflite's per-layer SNR against float, layer by layer."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    rows = [m for m in _rows(results) if m.layer_error and m.layer_error.get("layers")]
    per_model = {m.name: _by_position(m.layer_error["layers"]) for m in rows}
    keys = list(dict.fromkeys(k for m in rows for k in per_model[m.name]))
    for m in rows:
        by = per_model[m.name]
        xs = [i for i, k in enumerate(keys) if k in by and by[k]["snr_db"] is not None]
        ax.plot(xs, [by[keys[i]]["snr_db"] for i in xs], marker="o", markersize=6 if len(keys) <= 60 else 2,
                label=m.name)
    # a backbone has a few hundred layers: name every step-th, so that the names stay readable (the table in
    # report.md has them all)
    step = max(1, math.ceil(len(keys) / MAX_LAYER_LABELS))
    shown = range(0, len(keys), step)
    ax.set_xticks(shown, [f"{keys[i][0]}{f' ({keys[i][1] + 1})' if keys[i][1] else ''}" for i in shown], rotation=35,
                  ha="right", fontsize=8)
    if step > 1:
        ax.set_xlabel(f"layer, in execution order ({len(keys)} layers, one name in {step}; report.md names them all)")
    ax.set_ylabel("SNR against float (dB), higher is better")
    ax.grid(True, alpha=0.3)
    if rows:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no integer model", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(f"edge-kd: per-layer quantization error, {results.get('run', '')}")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def _plot_points(results):
    """(size KB, accuracy %, model) and (median ms at the fewest threads timed, accuracy %, model) for the rows that
    have them."""
    field = "val_accuracy" if untested(results) else "accuracy"
    size_points = [(m.size_bytes / KB, getattr(m, field) * 100, m) for m in _rows(results)
                   if _num(m.size_bytes) and _num(getattr(m, field))]
    threads = _plot_threads(results)
    # keras rows carry no latency, so they drop out of the latency panel here.
    lat_points = [(_latency(m, threads)["median_ms"], getattr(m, field) * 100, m) for m in _rows(results)
                  if _latency(m, threads) and _num(_latency(m, threads).get("median_ms")) and _num(getattr(m, field))]
    return size_points, lat_points


def _plot_threads(results) -> int:
    """The fewest threads the benchmark timed at (1 unless the run timed at more only)."""
    counts = [int(t) for t in _threads(results) if t.isdigit()]
    return min(counts) if counts else 1


def pareto_front(points):
    """Returns the (cost, accuracy, ...) tuples no other point beats: lower-or-equal cost and higher accuracy."""
    front, best = [], -math.inf
    for p in sorted(points, key=lambda p: (p[0], -p[1])):
        if p[1] > best:
            front.append(p)
            best = p[1]
    return front


def _panel(ax, points, xlabel, shipped, ylabel="top-1 accuracy (%)"):
    """Draws ``points`` (cost, accuracy %, row) on ``ax`` with their Pareto front and a key; returns the labels to
    place once the figure is laid out: (x, y, text, bold) for the front's points and the shipped one."""
    from matplotlib.lines import Line2D

    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    if not points:
        ax.set_xlabel(xlabel)
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        return []
    costs = [p[0] for p in points if p[0] > 0]
    log = bool(costs) and max(costs) > LOG_SPAN * min(costs)
    if log:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel + (", log scale" if log else ""))
    for role in _ROLE_COLOURS:
        for fmt in _FORMAT_MARKERS:
            sel = [p for p in points if p[2].role == role and p[2].format == fmt]
            if sel:
                ax.scatter([p[0] for p in sel], [p[1] for p in sel], c=_ROLE_COLOURS[role],
                           marker=_FORMAT_MARKERS[fmt], s=DOT_AREA, zorder=3, label=f"{role} ({fmt})")
    others = [p for p in points if p[2].role not in _ROLE_COLOURS or p[2].format not in _FORMAT_MARKERS]
    if others:
        ax.scatter([p[0] for p in others], [p[1] for p in others], c="tab:green", s=DOT_AREA, zorder=3, label="other")
    front = pareto_front(points)
    ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="black", alpha=0.6,
            linewidth=1.2, zorder=2, label="Pareto front")
    ship = [p for p in points if p[2].name == shipped]
    if ship:
        ax.scatter([p[0] for p in ship], [p[1] for p in ship], s=RING_AREA, facecolors="none", edgecolors="black",
                   linewidths=RING_LINE, zorder=4, label=f"shipped: {shipped}")
    named = {p[2].name for p in front} | {shipped}
    keyed = sorted((p for p in points if p[2].name not in named), key=lambda p: (-p[1], p[0]))
    handles, texts = ax.get_legend_handles_labels()
    for i, p in enumerate(keyed, 1):
        m = p[2]
        handles.append(Line2D([], [], linestyle="none", marker=f"${i}$", color="black", markersize=7))
        texts.append(f"{m.name} ({p[1]:.2f} %)")
    ax.legend(handles, texts, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0,
              title="numbered: not on the front" if keyed else None, title_fontsize=7)
    if log or any(p[0] < 1 for p in points):  # plain numbers (0.05, 100), not 5×10⁻²
        from matplotlib.ticker import FuncFormatter

        plain = FuncFormatter(lambda v, _: f"{v:g}")
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(FuncFormatter(
            lambda v, _: f"{v:g}" if v > 0 and round(v / 10 ** math.floor(math.log10(v))) in (2, 5) else ""))
    return ([(x, y, m.name, m.name == shipped, 8) for x, y, m in points if m.name in named]
            + [(x, y, str(i), False, 7) for i, (x, y, _) in enumerate(keyed, 1)])


def marker_radius(shipped: bool) -> float:
    """The drawn radius, in points, of a Pareto panel's marker: the shipped file's ring (its line included) or a
    dot."""
    return math.sqrt(RING_AREA) / 2 + RING_LINE / 2 if shipped else math.sqrt(DOT_AREA) / 2


def _place_labels(ax, items) -> list:
    """Writes each (x, y, text, bold, font size) beside its point, inside the axes, on the side and at the height
    where it covers no marker (the shipped file's ring, drawn for the bold one, included) and no label already
    written (names first, highest accuracy first); returns [(text, its display box)]."""
    from matplotlib.text import Text
    from matplotlib.transforms import Bbox

    renderer = ax.figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    dots = [ax.transData.transform((x, y)) for x, y, *_ in items]
    radii = [marker_radius(bold) for _, _, _, bold, _ in items]  # points
    pixels = ax.figure.dpi / 72
    taken = [Bbox.from_extents(u - r * pixels, v - r * pixels, u + r * pixels, v + r * pixels)
             for (u, v), r in zip(dots, radii)]
    order = sorted(range(len(items)), key=lambda i: (items[i][4] != 8, -items[i][1], items[i][0]))
    written = []
    for i in order:
        x, y, text, bold, size = items[i]
        own = taken[i]
        gap = radii[i] + 2.5  # points from the point's centre to its label
        choice = None
        for dy in (0, *(s * k for k in range(9, 82, 9) for s in (1, -1))):  # up to 9 lines above or below
            for dx in (gap, -gap):
                label = ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=size,
                                    fontweight="bold" if bold else "normal", va="center",
                                    ha="left" if dx > 0 else "right", zorder=6,
                                    arrowprops=dict(arrowstyle="-", linewidth=0.5, color="0.45", shrinkA=0,
                                                    shrinkB=radii[i]) if dy else None)
                label.update_positions(renderer)
                box = Text.get_window_extent(label, renderer).padded(1.5)  # the text alone, not its leader line
                fits = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
                if fits and not any(box.overlaps(b) for b in taken if b is not own):
                    choice = box
                    break
                label.remove()
            if choice is not None:
                break
        if choice is None:  # no free place within reach: beside the point, on top of what is there
            choice = ax.annotate(text, (x, y), textcoords="offset points", xytext=(gap, 0), fontsize=size,
                                 va="center", zorder=6).get_window_extent(renderer)
        taken.append(choice)
        written.append((text, choice))
    return written


def _check(results):
    if not isinstance(results, dict) or not isinstance(results.get("models"), list):
        raise ValueError("results must be a dict with a 'models' list")
    _rows(results)


def _rows(results) -> list[ModelRow]:
    """Returns the results' models as typed rows (they may be given as rows or as their dicts)."""
    return rows_of(results["models"])


def _threads(results) -> list[str]:
    keys = {str(k) for m in _rows(results) for k in (m.latency or {})}
    return sorted(keys, key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0, k))


def _latency(m, threads: int):
    lat = m.latency or {}
    return lat.get(str(threads)) or lat.get(threads)


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _cell(v) -> str:
    return "—" if v is None else str(v).replace("|", "\\|")


def _pct(v) -> str:
    return f"{v * 100:.2f}" if _num(v) else "—"


def _delta(m) -> str:
    gap = m.gap_to_teacher
    if not _num(gap):
        return "—"
    return f"{-gap * 100 + 0.0:+.2f}"  # + 0.0 turns -0.0 into 0.0, so the teacher reads +0.00


def _kb(v) -> str:
    return f"{v / KB:,.1f}" if _num(v) else "—"


def _ms(v) -> str:
    if not _num(v):
        return "—"
    return f"{v:.3f}" if v < 10 else f"{v:.1f}"


def _mib(v) -> str:
    return f"{v / 2 ** 20:.1f}" if _num(v) else "—"


def _int(v) -> str:
    return f"{int(v):,}" if _num(v) else "—"
