"""Report files: every number the run produced comes back out of results.json/csv and report.md."""
import csv
import itertools
import json

import numpy as np
import pytest

from edge_kd.bench.results import ModelRow
from edge_kd.report.report import _plot_points, markdown_table, pareto_front, write_report


def _lat(threads, median, q3):
    return {"threads": threads, "init_ms": 3.1, "first_ms": 0.9, "median_ms": median, "q1_ms": median * 0.98,
            "q3_ms": q3, "min_ms": median * 0.9, "max_ms": q3 * 1.1, "rounds": 10, "runs": 1234}


def _model(name, role, fmt, variant, acc, size, lat, teacher_acc=0.9912):
    """One results row as results.json holds it."""
    return ModelRow(name=name, role=role, format=fmt, variant=variant, path=f"export/{name}.{fmt}", accuracy=acc,
                    size_bytes=size, gzip_bytes=size // 2, params=12345, macs=678910, input_scale=1 / 255,
                    input_offset=0.0, latency=lat, gap_to_teacher=teacher_acc - acc).to_dict()


@pytest.fixture
def results():
    return {
        "run": "mnist-test", "command": "python -m pipelines.compress --recipe default",
        "data": {"name": "mnist", "num_classes": 10, "input_shape": [28, 28, 1], "test_size": 10000},
        "runtime": {"cpu": "Test CPU @ 3GHz", "cores": 2, "litert_version": "2.3.0", "tensorflow_version": "2.21.0",
                    "python": "3.11.9", "platform": "Linux"},
        "created": "2025-01-01T00:00:00+00:00",
        "models": [
            _model("teacher", "teacher", "keras", "fp32", 0.9912, 1_500_000, None),
            _model("teacher-fp32", "teacher", "tflite", "fp32", 0.9912, 1_200_000,
                   {"1": _lat(1, 2.5, 2.9), "2": _lat(2, 1.4, 1.6)}),
            _model("student-int8", "student", "tflite", "int8", 0.9867, 40_960,
                   {"1": _lat(1, 0.123, 0.150), "2": _lat(2, 0.090, 0.101)}),
            _model("baseline-int8", "baseline", "tflite", "int8", 0.9801, 40_000,
                   {"1": _lat(1, 0.130, 0.160), "2": _lat(2, 0.095, 0.110)}),
        ],
    }


def test_write_report_files_round_trip(tmp_path, results):
    paths = write_report(tmp_path / "run", results)
    assert set(paths) == {"json", "csv", "md", "png", "layers_png"}
    for p in paths.values():
        assert p.exists() and p.parent == tmp_path / "run"

    assert json.loads(paths["json"].read_text()) == results

    rows = list(csv.DictReader(paths["csv"].open()))
    assert [r["name"] for r in rows] == [m["name"] for m in results["models"]]
    for row, m in zip(rows, results["models"]):
        assert float(row["accuracy"]) == m["accuracy"]
        assert int(row["size_bytes"]) == m["size_bytes"] and int(row["macs"]) == m["macs"]
        assert float(row["gap_to_teacher"]) == pytest.approx(m["gap_to_teacher"])
        if m["latency"] is None:
            assert row["latency_1_median_ms"] == "" and row["latency_2_q3_ms"] == ""
        else:
            assert float(row["latency_1_median_ms"]) == m["latency"]["1"]["median_ms"]
            assert float(row["latency_2_q3_ms"]) == m["latency"]["2"]["q3_ms"]
            assert int(row["latency_1_runs"]) == 1234

    png = paths["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    from matplotlib.image import imread
    h, w = imread(paths["png"]).shape[:2]
    assert w > h > 300


def test_report_md_has_every_model_and_number(tmp_path, results):
    md = write_report(tmp_path, results)["md"].read_text()
    assert md.startswith("# edge-kd report: mnist-test")
    assert results["command"] in md
    assert "Test CPU @ 3GHz" in md and "2 cores" in md and "LiteRT 2.3.0" in md
    assert "pareto.png" in md and "How to read this" in md
    for m in results["models"]:
        assert f"| {m['name']} |" in md
        assert f"{m['accuracy'] * 100:.2f}" in md
    table = markdown_table(results)
    assert table in md
    lines = table.strip().splitlines()
    assert len(lines) == 2 + len(results["models"])
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["model", "role", "format", "variant", "accuracy %", "Δ vs teacher (pp)", "size (KB)",
                      "gzip (KB)", "sparsity %", "latency 1 thr median ms (IQR)", "latency 2 thr median ms",
                      "peak memory (MiB)", "min runtime", "params", "MACs"]
    student = [c.strip() for c in lines[4].strip("|").split("|")]
    assert student == ["student-int8", "student", "tflite", "int8", "98.67", "-0.45", "40.0", "20.0", "—",
                       "0.123 (0.121–0.150)", "0.090", "—", "—", "12,345", "678,910"]
    keras_row = [c.strip() for c in lines[2].strip("|").split("|")]
    assert keras_row[5] == "+0.00" and keras_row[8] == "—" and keras_row[9] == "—" and keras_row[10] == "—"


def test_plot_points_leave_untimed_keras_rows_out_of_the_latency_panel(results):
    size_points, lat_points = _plot_points(results)
    assert [p[2].name for p in size_points] == [m["name"] for m in results["models"]]
    assert [p[2].name for p in lat_points] == ["teacher-fp32", "student-int8", "baseline-int8"]
    assert size_points[2][:2] == (40.0, pytest.approx(98.67))
    assert lat_points[1][:2] == (0.123, pytest.approx(98.67))
    front = pareto_front(lat_points)
    assert [p[2].name for p in front] == ["student-int8", "teacher-fp32"]


def test_pareto_front_matches_brute_force(rng):
    points = [(float(c), float(a), i) for i, (c, a) in enumerate(zip(rng.uniform(1, 100, 40), rng.uniform(0, 1, 40)))]
    dominated = {p[2] for p, q in itertools.permutations(points, 2)
                 if q[0] <= p[0] and q[1] >= p[1] and (q[0] < p[0] or q[1] > p[1])}
    front = pareto_front(points)
    assert sorted(p[2] for p in front) == sorted(p[2] for p in points if p[2] not in dominated)
    assert np.all(np.diff([p[0] for p in front]) > 0) and np.all(np.diff([p[1] for p in front]) > 0)


def test_report_rejects_results_without_models(tmp_path):
    with pytest.raises(ValueError, match="models"):
        write_report(tmp_path, {"run": "x"})


def test_stage_parity_and_distillation_sections(results):
    from edge_kd.report.report import parity_table, report_markdown, stage_table

    extra = [
        {**_model("student", "student", "keras", "fp32", 0.9890, 90_000, None), "stage": "distill"},
        {**_model("baseline", "baseline", "keras", "fp32", 0.9886, 90_000, None), "stage": "baseline"},
        {**_model("pruned-int8", "student", "tflite", "int8", 0.9871, 18_800, {"1": _lat(1, 0.011, 0.012)}),
         "stage": "prune", "sparsity": 0.7512,
         "parity": {"max_abs_diff": 0.0123, "top1_agreement": 0.9981},
         "ops": {"ops": {"CONV_2D": 2, "FULLY_CONNECTED": 1}, "xnnpack_fallback": {}}},
        {**_model("qat-int8", "student", "tflite", "int8", 0.9880, 18_900, {"1": _lat(1, 0.010, 0.011)}),
         "stage": "qat", "sparsity": 0.75,
         "parity": {"max_abs_diff": 0.05, "top1_agreement": 1.0},
         "ops": {"ops": {"CONV_2D": 2, "SOFTMAX": 1}, "xnnpack_fallback": {"SOFTMAX": 1}}},
    ]
    results = {**results, "models": results["models"] + extra,
               "distillation": {"loss": "hinton", "temperature": 4.0}, "bundle": {"path": "bundle", "model": "qat-int8"}}
    stages = stage_table(results).strip().splitlines()
    assert [r.split("|")[1].strip() for r in stages[2:]] == ["prune", "qat"]  # only int8 student rows with a stage
    assert [c.strip() for c in stages[2].strip("|").split("|")] == [
        "prune", "pruned-int8", "98.71", "-0.41", "18.4", "9.2", "75.12", "0.011"]
    parity = parity_table(results).strip().splitlines()
    assert len(parity) == 4
    assert [c.strip() for c in parity[3].strip("|").split("|")] == [
        "qat-int8", "5.00e-02", "100.00", "CONV_2D×2, SOFTMAX×1", "SOFTMAX×1"]
    assert parity[2].endswith("| none |")
    md = report_markdown(results)
    assert ("the distilled student scores 98.90 % against 98.86 % for the same student trained without "
            "distillation (same augmentation, epochs and initial weights): +0.04 pp in this run. One run is one seed: "
            "a difference this size can be noise, not a gain or a loss") in md
    assert "holds **qat-int8**" in md
    # the answer first: the bundle's file, its bytes, accuracy, latency and runtime, the gap to the teacher
    short = md[md.index("## In short"):md.index("## Every model")]
    assert "**Ship `bundle/qat-int8.tflite`**: 18,900 bytes, 98.80 % top-1 on the test set, 0.010 ms a batch-1 " \
           "inference at 1 thread(s) (median)" in short
    assert "- Against the teacher (teacher-fp32, 99.12 %): -0.32 pp, at 1.6 % of its 1,200,000 bytes." in short
    assert "Picked on" not in short and "Named by" not in short  # a bundle recorded before it said how it was chosen
    # how the file was chosen: on the validation split by default, or named by the recipe
    from edge_kd.report.report import summary_lines

    chosen = {**results, "bundle": {**results["bundle"], "picked_by": "validation", "tolerance_pp": 0.5,
                                    "val_accuracy": 0.9874}}
    assert summary_lines(chosen)[0].endswith(
        "(median). Picked on the validation split, never the test split: the smallest file within 0.5 pp of the best "
        "student file's validation accuracy, integer ones first (its own: 98.74 %).")
    named = {**results, "bundle": {**results["bundle"], "picked_by": "name"}}
    assert summary_lines(named)[0].endswith(" Named by the recipe (`stages.bundle.pick`).")
    assert ("- Distillation: +0.04 pp over the same student trained alone (98.90 % against 98.86 %), in this one run: "
            "one seed, so not yet a gain or a loss (under the table).") in short
    assert md.index("## In short") < md.index("| model | role |")


def test_a_run_without_a_baseline_still_states_how_it_distilled(results):
    from edge_kd.report.report import report_markdown

    no_baseline = {**results, "models": [m for m in results["models"] if m["role"] != "baseline"],
                   "distillation": {"loss": "hinton", "temperature": 4.0, "precision": "mixed_bfloat16"}}
    md = report_markdown(no_baseline)
    assert ("Distillation (loss hinton, temperature 4, precision mixed_bfloat16). No student was trained without "
            "distillation in this run (the recipe has no baseline stage), so it cannot say what distillation "
            "changed.") in md
    assert "without distillation" not in report_markdown({**no_baseline, "distillation": None})  # it did not distil


def test_latency_ties_chain_the_models_whose_iqrs_overlap_and_old_rows_still_render(results):
    from edge_kd.report.report import latency_ties

    def lat(median, q1, q3):
        return {"median_ms": median, "q1_ms": q1, "q3_ms": q3}

    results["models"][1]["latency"] = {"1": lat(2.5, 2.4, 2.6)}
    results["models"][2]["latency"] = {"1": lat(0.123, 0.120, 0.126)}
    results["models"][3]["latency"] = {"1": lat(0.125, 0.124, 0.130)}  # overlaps student-int8: no ranking shown
    assert latency_ties(results) == ["1 thread(s): student-int8 ≈ baseline-int8"]
    results["models"][3]["latency"] = {"1": lat(0.130, 0.127, 0.131)}  # starts above the other's IQR
    assert latency_ties(results) == []
    results["models"][3]["latency"] = {"1": {"mean_ms": 0.13, "p90_ms": 0.2}}  # a row from before the rounds
    assert "| baseline-int8 |" in markdown_table(results)


def test_layer_error_table_stars_the_worst_tensor_and_keeps_repeated_labels_apart(results):
    from edge_kd.report.report import layer_error_table

    def e(tensor, layer, snr, added):
        return {"tensor": tensor, "layer": layer, "op": "CONV_2D", "dtype": "int8", "rmse": 0.1,
                "nrmse": 10 ** (-snr / 20), "snr_db": snr, "cosine": 0.99, "added": added}

    results["models"][2]["layer_error"] = {
        "method": "m", "samples": 8, "worst": ["c2", "(model output)"], "worst_tensors": ["t2", "out"],
        "layers": [e("t1", "c1", 40.0, 0.01), e("t2", "c2", 30.0, 0.02), e("q", "(model output)", 35.0, -0.01),
                   e("out", "(model output)", 29.0, 0.015)]}
    table = layer_error_table(results)
    assert "| c2 | 30.0 ★ |" in table and "| c1 | 40.0 |" in table
    assert "| (model output) | 35.0 |" in table and "| (model output) (2) | 29.0 |" in table
    assert "the layers adding the most error: c2, (model output)." in table


def test_a_model_at_chance_level_is_flagged_at_the_top_with_the_causes_the_histories_show(tmp_path, results):
    from edge_kd.report.report import chance_warnings

    assert chance_warnings(results) == []  # every model far above 10 %
    results["data"]["majority_fraction"] = 0.1
    results["models"][2] = _model("student-int8", "student", "tflite", "int8", 0.1059, 40_960, None)
    results["history"] = {"distill": {"accuracy": [0.5, 0.93], "val_accuracy": [0.2, 0.1]},
                          "baseline": {"accuracy": [0.97], "val_accuracy": [0.97]}}
    lines = chance_warnings(results)
    # 10 % chance + 2 binomial standard deviations over 10,000 images = 10.6 %: 10.59 % is at chance
    assert lines[0] == ("at chance level: student-int8 (test accuracy at most 10.6%; chance is 10.0%: 1 of 10 "
                        "classes)")
    assert len(lines) == 2 and lines[1].startswith("distill: training accuracy 93.0% against validation 10.0%")
    assert "batch-normalization" in lines[1]
    write_report(tmp_path, results)
    md = (tmp_path / "report.md").read_text()
    assert md.index("> **Warning: at chance level: student-int8") < md.index("| model |")

    # a teacher at chance says so; a skewed test split raises the bar to its most frequent class
    results["data"]["majority_fraction"] = 0.5
    results["models"][0] = _model("teacher", "teacher", "keras", "fp32", 0.5, 1_500_000, None)
    lines = chance_warnings(results)
    assert lines[0].startswith("at chance level: teacher, student-int8 (") and "always the most frequent" in lines[0]
    assert lines[-1].startswith("the teacher itself is at chance on this data")


def test_pareto_labels_never_cover_each_other_and_the_shipped_file_is_named(results):
    from edge_kd.report.report import marker_radius, pareto_figure

    # twelve variants of one student almost on one spot, as a run's fp32/fp16/dynamic/int8 files are
    results["models"] += [_model(f"v{i}-int8", "student", "tflite", "int8", 0.9860 + 0.0001 * (i % 3), 40_000 + 50 * i,
                                 {"1": _lat(1, 0.120 + 0.001 * i, 0.13)}) for i in range(12)]
    results["bundle"] = {"path": "bundle", "model": "v5-int8"}
    fig, panels = pareto_figure(results)
    for written in panels:
        boxes = [box for _, box in written]
        assert all(not a.overlaps(b) for a, b in itertools.combinations(boxes, 2))
    size_panel, lat_panel = fig.axes[:2]
    ring = marker_radius(True) * fig.dpi / 72  # no label covers the shipped file's ring (its edge drawn in pixels)
    for ax, written in zip((size_panel, lat_panel), panels):
        centre = ax.collections[-1].get_offset_transform().transform(ax.collections[-1].get_offsets()[0])
        assert all(box.x0 > centre[0] + ring or box.x1 < centre[0] - ring or box.y0 > centre[1] + ring
                   or box.y1 < centre[1] - ring for _, box in written)
    assert size_panel.get_xscale() == "log"  # 40 KB to 1.5 MB: more than 10×
    assert lat_panel.get_xscale() == "log"  # 0.12 to 2.5 ms
    named = [text for text, _ in panels[0]]
    assert {"v5-int8", "teacher-fp32"} <= set(named)  # the shipped file and the front's most accurate end
    assert "v6-int8" not in named and len(named) == len(results["models"])  # the rest by number, every point written


def test_the_report_names_the_set_each_calibrated_file_was_calibrated_on_and_shows_the_synthetic_images(results):
    from edge_kd.report.report import report_markdown

    results["models"][2]["calibration"] = "synthetic"
    results["models"][3]["calibration"] = "train"
    md = report_markdown(results)
    assert "Calibrated on synthetic images made from the teacher alone (below): `student-int8`.  " in md
    assert "Calibrated on training images: `baseline-int8`.  " in md
    assert "## Images made from the teacher alone" not in md  # no synthesize stage: no section
    results["stage_summaries"] = {"synthesize": {"images": 512, "steps": 200, "batch_size": 128,
                                                 "teacher_agreement": 0.998, "bn_loss": 8.54, "bn_loss_noise": 46.3}}
    md = report_markdown(results)
    assert ("512 images, 200 steps of DeepInversion a batch of 128: the teacher gives 99.8% of them the class each "
            "was made for. Their BatchNormalization statistics loss") in md
    assert "is 8.54; uniform noise scores 46.3." in md and "![synthetic images](synthetic.png)" in md
    results["models"][2]["calibration"] = results["models"][3]["calibration"] = None
    assert "Calibrated on" not in report_markdown(results)


def test_a_run_without_training_images_says_what_it_trained_on_and_what_measured_it(results):
    from edge_kd.report.report import report_markdown

    results["data"].update({"name": "synthetic", "train_size": 7373, "val_size": 819, "test_source": "fashion_mnist"})
    md = report_markdown(results)
    assert ("every model after the teacher trained on 7,373 images made from the teacher alone, validation accuracy "
            "is the agreement with the teacher on 819 more that no model trained on, and the test split is the "
            "10,000 test images of fashion_mnist") in md
    results["data"].update({"test_size": 0, "test_source": None})
    for m in results["models"]:
        m["accuracy"], m["gap_to_teacher"], m["val_accuracy"] = None, None, 0.5
    md = report_markdown(results)
    assert "**accuracy is unknown**" in md and "`student-int8` 50.00 %" in md
    assert "Agreement with the teacher against size" in md
