"""The benchmark scripts' own arithmetic and models (their real runs are too long for the test suite; a few
run the scripts' code on tiny recipes)."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_families_summary_is_mean_sample_std_and_time_relative_to_hinton_at_the_same_seed():
    families = _script("families")
    rows = [{"method": "hinton", "seed": 0, "accuracy": 0.90, "seconds_per_epoch": 10.0},
            {"method": "hinton", "seed": 1, "accuracy": 0.92, "seconds_per_epoch": 20.0},
            {"method": "at", "seed": 0, "accuracy": 0.91, "seconds_per_epoch": 15.0},
            {"method": "at", "seed": 1, "accuracy": 0.95, "seconds_per_epoch": 20.0}]
    s = families.summarise(rows)
    assert s["at"]["accuracy_mean"] == pytest.approx(0.93)
    assert s["at"]["accuracy_std"] == pytest.approx(np.std([0.91, 0.95], ddof=1))
    assert s["at"]["time_per_epoch_vs_hinton"] == pytest.approx((1.5 + 1.0) / 2)
    assert s["hinton"]["time_per_epoch_vs_hinton"] == pytest.approx(1.0)
    assert "student alone" not in s  # no rows, no line
    assert "| at | 93.00 ± 2.83 | 1.25× |" in families.table(s)


def test_families_methods_are_the_issues_rows():
    families = _script("families")
    assert list(families.METHODS) == ["student alone", "hinton", "fitnet", "at", "rkd", "crd", "dkd", "two teachers",
                                      "virtual teacher", "mean teacher", "mutual (DML)"]


def test_hinton_mnist_nets_have_the_papers_sizes():
    hinton = _script("hinton_mnist")
    teacher = hinton.mlp((1200, 1200), dropout_in=0.2, dropout=0.5, jitter=True)
    student = hinton.mlp((800, 800))
    assert teacher.count_params() == 784 * 1200 + 1200 + 1200 * 1200 + 1200 + 1200 * 10 + 10
    assert student.count_params() == 784 * 800 + 800 + 800 * 800 + 800 + 800 * 10 + 10
    x = np.ones((2, 28, 28, 1), np.float32)
    np.testing.assert_array_equal(teacher(x, training=False).numpy(), teacher(x, training=False).numpy())


def test_latency_repro_compares_each_models_medians_between_the_two_runs(tmp_path):
    repro = _script("latency_repro")

    def results(name, medians):
        lat = {str(t): {"median_ms": m, "q1_ms": m * 0.9, "q3_ms": m * 1.1} for t, m in medians.items()}
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(__import__("json").dumps({"models": [
            {"name": "student", "latency": None}, {"name": "student-int8", "latency": lat}]}))

    results("run-a", {1: 0.010, 2: 0.008})
    results("run-b", {1: 0.0112, 2: 0.0096})
    out = repro.compare(tmp_path, 0.15)
    assert [(r["model"], r["threads"]) for r in out["rows"]] == [("student-int8", 1), ("student-int8", 2)]
    assert out["rows"][0]["ratio"] == pytest.approx(1.12) and out["rows"][0]["within"]
    assert out["rows"][1]["ratio"] == pytest.approx(1.2) and not out["rows"][1]["within"]
    assert not out["all_within"] and out["worst_ratio"] == pytest.approx(1.2)


def test_throughput_times_the_contenders_in_turn_and_takes_the_median_ratios():
    throughput = _script("throughput")
    calls, now = [], [0.0]
    cost = {"edge-kd": 1.1, "student alone": 0.6, "teacher forward": 0.4, "Keras 3": 1.65}

    def runner(name):
        def step():
            calls.append(name)
            now[0] += cost[name]
        return step

    runs = {n: runner(n) for n in cost}
    times = throughput.measure(runs, steps=3, rounds=4, clock=lambda: now[0])
    timed = calls[-4 * 3 * 4:]  # after the warm-up: rounds of 3 steps of each contender in turn
    assert timed == [n for _ in range(4) for n in cost for _ in range(3)]
    s = throughput.summarise(times, steps=3, batch=10)
    assert s["floor_ratio"]["median"] == pytest.approx(1.1 / (0.6 + 0.4))
    assert s["keras3_ratio"]["median"] == pytest.approx(1.5)
    assert s["images_per_second"]["edge-kd"]["median"] == pytest.approx(10 / 1.1)


def test_throughput_quick_mode_runs_the_real_contenders(tmp_path):
    throughput = _script("throughput")
    out = throughput.main(["--quick", "--json", str(tmp_path / "t.json")])
    (pair,) = out.values()
    assert set(pair["images_per_second"]) == {"edge-kd", "student alone", "teacher forward", "Keras 3"}
    assert all(v["median"] > 0 for v in pair["images_per_second"].values())
    assert pair["floor_ratio"]["median"] > 0 and pair["keras3_ratio"]["median"] > 0  # no goal asserted: timing
    assert pair["jit_compile"]["edge-kd"] is False


def test_precision_quick_mode_times_float32_against_bfloat16_on_the_real_pair(tmp_path):
    precision = _script("precision")
    out = precision.main(["--quick", "--json", str(tmp_path / "p.json")])
    assert set(out["ms_per_step"]) == {f"{kind}, {p}" for kind in ("teacher forward", "distill step", "alone step")
                                       for p in ("float32", "mixed_bfloat16")}
    assert all(v > 0 for v in out["ms_per_step"].values()) and all(v > 0 for v in out["speedup"].values())
    if out["teachers"] is not None:  # with ../shared: the two teachers on 64 real test images
        t = out["teachers"]
        assert t["images"] == 64 and t["top_class_agreement"] >= 0.9 and 0 < t["max_logit_gap"] < 1.0
    assert json.loads((tmp_path / "p.json").read_text())["policy"] == "mixed_bfloat16"


def test_keras3_copy_computes_what_the_tf_keras_model_does():
    throughput = _script("throughput")
    import models

    m = models.build("resnet8", (32, 32, 3), 10)
    x = np.random.default_rng(0).random((4, 32, 32, 3), dtype=np.float32)
    copy = throughput.to_keras3(m)
    assert copy.count_params() == m.count_params() == 78_666
    np.testing.assert_allclose(np.asarray(copy(x)), m(x).numpy(), atol=1e-5)


def test_streaming_quick_mode_trains_from_a_streamed_folder_and_times_both_paths(tmp_path):
    streaming = _script("streaming")
    assert streaming.main(["--quick", "--folder", str(tmp_path / "images"), "--json", str(tmp_path / "s.json")]) == 0
    record = __import__("json").loads((tmp_path / "s.json").read_text())
    big = record["larger_than_memory"]
    assert big["streamed"] and big["train_images"] + big["val_images"] < big["folder"]["images"]  # a test split held out
    assert big["folder"]["bytes"] == sum(p.stat().st_size for p in (tmp_path / "images").rglob("*.png"))
    assert big["images_per_second"] > 0 and big["peak_rss_bytes"] > 0 and 0 <= big["val_accuracy"] <= 1
    small = record["small"]
    assert set(small["images_per_second"]) == {"in memory (.npz)", "streamed (PNG folder)"} and small["images"] == 361  # 400 less 10 % per class, rounded
    # the folder is reused when it matches what is asked
    spec = streaming.make_folder(tmp_path / "images", 32, 1000)
    assert spec == big["folder"]


def test_multiworker_times_the_epochs_after_the_first_and_counts_whole_global_batches_across_replicas():
    multiworker = _script("multiworker")
    got = multiworker.images_per_second([9.0, 2.0, 4.0, 3.0], 600)  # the first epoch traces: left out
    assert got["images_per_second"] == pytest.approx(200.0) and got["timed_epochs"] == 3
    with pytest.raises(ValueError):
        multiworker.images_per_second([5.0], 600)
    assert multiworker.epoch_images(5399, replicated=False) == 5399
    assert multiworker.epoch_images(5399, replicated=True) == 42 * 128  # each epoch drops its short last batch
    assert multiworker.contention(0.1, 2) is None and multiworker.contention(None, 2) is None
    assert "kept 1.80 of the machine's 2 cores busy" in multiworker.contention(1.8, 2)


def test_cifar10_targets_need_the_mean_gain_every_seed_and_the_mlperf_size_and_accuracy():
    cifar10 = _script("cifar10")

    def row(gain, final, tfmot, size=98_000):
        return {"teacher": 0.86, "distilled": 0.84 + gain / 100, "baseline": 0.84, "distilled_val": 0.85,
                "baseline_val": 0.84, "gain_pp": gain, "final_int8": final, "final_int8_bytes": size,
                "tfmot_int8": tfmot, "tfmot_gain_pp": 100 * (final - tfmot), "seconds": 1.0, "tfmot_seconds": 1.0}

    met = cifar10.summarise([row(1.5, 0.86, 0.845), row(1.2, 0.85, 0.835), row(0.9, 0.855, 0.84)])
    assert met["stats"]["gain_pp"]["mean"] == pytest.approx(1.2)
    assert met["stats"]["gain_pp"]["std"] == pytest.approx(np.std([1.5, 1.2, 0.9], ddof=1))
    assert all(met["targets"].values()), met["targets"]
    missed = cifar10.summarise([row(3.0, 0.86, 0.85), row(-0.1, 0.84, 0.84), row(1.0, 0.86, 0.85, size=98_497)])
    assert missed["targets"] == {"distilled_beats_alone_by_1.0_pp": True, "distilled_beats_alone_at_every_seed": False,
                                 "kd_prune_pqat_int8_beats_tfmot_alone_by_1.0_pp": False,
                                 "kd_prune_pqat_int8_at_most_98496_bytes_reaches_85_%": False}


def test_cifar10_mlperf_target_needs_the_mean_int8_accuracy_and_every_file_within_the_reference_size():
    cifar10 = _script("cifar10")

    def row(int8, size=95_536):
        return {"teacher": 0.878, "distilled": int8, "distilled_val": int8, "int8": int8, "int8_val": int8,
                "int8_bytes": size, "seconds": 1.0}

    met = cifar10.summarise_mlperf([row(0.8505), row(0.849), row(0.852)])
    assert met["stats"]["int8"]["mean"] == pytest.approx(0.8505)
    assert met["stats"]["int8"]["std"] == pytest.approx(np.std([0.8505, 0.849, 0.852], ddof=1))
    assert met["targets"] == {"int8_at_most_98496_bytes_reaches_85_%": True}
    assert not any(cifar10.summarise_mlperf([row(0.851), row(0.849), row(0.848)])["targets"].values())  # mean 84.93
    assert not any(cifar10.summarise_mlperf([row(0.86), row(0.86), row(0.86, size=98_497)])["targets"].values())


def test_cifar10_writes_its_rows_after_every_seed_and_keeps_rows_an_earlier_invocation_wrote(tmp_path):
    from types import SimpleNamespace

    cifar10, path = _script("cifar10"), tmp_path / "cifar10.json"

    def measure(seed, teacher=0.9):
        if seed == 2:
            raise KeyboardInterrupt  # a sitting that ends during seed 2
        return {"seed": seed, "teacher": teacher, "gain_pp": float(seed)}

    def summarise(rows):
        return {"stats": {"gain_pp": sum(r["gain_pp"] for r in rows) / len(rows)}}

    def gather(seeds, kept, run=measure):
        return cifar10.gather(SimpleNamespace(seeds=seeds, kept=kept), ["--seeds", "0"], str(path), run,
                              lambda row: f"seed {row['seed']}", summarise)

    with pytest.raises(KeyboardInterrupt):
        gather([0, 1, 2], [])
    written = json.loads(path.read_text())  # seeds 0 and 1 finished before the interruption: both kept on disk
    assert [r["seed"] for r in written["rows"]] == [0, 1] and written["stats"]["gain_pp"] == 0.5
    assert all("commit" in r and "cores" in r["machine"] for r in written["rows"]) and written["seeds"] == [0, 1, 2]

    def only_new(seed):  # a later sitting runs only what is not kept
        assert seed == 2
        return {"seed": 2, "teacher": 0.9, "gain_pp": 5.0}

    assert gather([0, 1, 2], [0, 1], only_new)["stats"]["gain_pp"] == pytest.approx(2.0)
    rows = json.loads(path.read_text())["rows"]
    assert [(r["seed"], r.get("kept", False)) for r in rows] == [(0, True), (1, True), (2, False)]
    with pytest.raises(SystemExit, match="no row for seed"):
        gather([0, 7], [0, 7])
    with pytest.raises(SystemExit, match="different test accuracy"):  # the teacher changed between sittings
        gather([0, 3], [0], lambda seed: {"seed": seed, "teacher": 0.95, "gain_pp": 1.0})
    assert [r["seed"] for r in json.loads(path.read_text())["rows"]] == [0]  # the refused row is not written
    with pytest.raises(SystemExit, match="holds no rows"):
        cifar10.kept_rows(tmp_path / "missing.json", [0])


def test_cifar10_mlperf_recipe_is_the_gain_recipes_student_and_training_with_a_longer_schedule():
    from pipelines import recipe as recipe_mod

    mlperf, kd = recipe_mod.load("cifar10_resnet8_mlperf"), recipe_mod.load("cifar10_resnet8")
    assert mlperf.student == kd.student and mlperf.training == kd.training and mlperf.augment == kd.augment
    assert mlperf.data == kd.data and mlperf.distillation == kd.distillation
    assert mlperf.stages.enabled() == ["distill", "export", "benchmark", "bundle", "report"]
    assert mlperf.stages.distill.epochs == 100 and kd.stages.distill.epochs == 30
    # the same shipped teacher, read with its mirror for the target (the gain recipe reads it once: half the cost)
    assert mlperf.teacher.path == kd.teacher.path and mlperf.teacher.flip_average and not kd.teacher.flip_average


def test_a_recorded_run_is_read_as_it_is_and_its_time_is_its_stages_times(tmp_path):
    default_gain = _script("default_gain")
    from pipelines import recipe as recipe_mod

    r = recipe_mod.apply_overrides(recipe_mod.load(), ["seed=3", "name=rec-seed3"])
    with pytest.raises(SystemExit, match="no finished run"):
        default_gain._run(r, tmp_path, "seed 3", recorded=True)
    run_dir = tmp_path / r.run_name()
    (run_dir / "manifests").mkdir(parents=True)
    for stage, seconds in (("distill", 12.5), ("qat", 7.25)):
        (run_dir / "manifests" / f"{stage}.json").write_text(json.dumps({"stage": stage, "seconds": seconds}))
    model = {"name": "qat-int8", "role": "student", "format": "tflite", "variant": "int8", "path": "x.tflite",
             "accuracy": 0.81, "size_bytes": 96_632, "gzip_bytes": 80_000, "params": 78_666, "macs": 12_500_000,
             "input_scale": 1 / 255, "input_offset": 0.0}
    (run_dir / "results.json").write_text(json.dumps({"models": [model]}))
    got_dir, seconds, models = default_gain._run(r, tmp_path, "seed 3", recorded=True)
    assert got_dir == run_dir and seconds == pytest.approx(19.75)
    assert models["qat-int8"].accuracy == 0.81 and models["qat-int8"].size_bytes == 96_632


def test_teacher_flip_reads_the_teacher_file_plain_and_averaged_with_its_mirror(tmp_path):
    import models
    from edge_kd.keras import keras

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (60, 12, 12, 3), np.uint8)
    np.savez(tmp_path / "d.npz", x_train=x[:40], y_train=np.arange(40) % 3, x_test=x[40:], y_test=np.arange(20) % 3)
    keras.utils.set_random_seed(1)
    teacher = models.build("cnn", (12, 12, 3), 3)
    teacher.save(tmp_path / "t.keras")
    row = _script("teacher_flip").measure(str(tmp_path / "t.keras"), "cifar10_teacher",
                                          [f"data.source={tmp_path / 'd.npz'}"])
    test = x[40:].astype(np.float32) / 255.0
    plain = teacher.predict(test, verbose=0)
    mirrored = (plain + teacher.predict(test[:, :, ::-1], verbose=0)) / 2
    y = np.arange(20) % 3
    assert row["images"]["test"] == 20 and row["file"] == "t.keras"
    assert row["test"] == {"plain": float((plain.argmax(-1) == y).mean()),
                           "flip_average": float((mirrored.argmax(-1) == y).mean())}
    assert (plain.argmax(-1) != mirrored.argmax(-1)).any()  # the mirror changed some answers: the two were measured


def test_datafree_training_pools_each_distinct_set_of_held_out_images_once_and_equally():
    bench = _script("datafree_training")
    rng = np.random.default_rng(0)
    small = (rng.integers(0, 256, (4, 2, 2, 1), np.uint8), np.array([0, 1, 2, 3]))
    big = (rng.integers(0, 256, (12, 2, 2, 1), np.uint8), np.arange(12) % 4)
    shared = (small[0].copy(), small[1].copy())  # a second run's copy of the same images (taken from the store)
    x, y = bench.held_out_pool([small, big, shared], seed=0)
    assert len(x) == len(y) == 8  # the shared set once, and 4 of the 12 beside the smallest's 4
    np.testing.assert_array_equal(x[:4], small[0])
    picked = [next(i for i in range(12) if (big[0][i] == im).all()) for im in x[4:]]
    np.testing.assert_array_equal(y[4:], big[1][picked])  # each image keeps its label
    assert len(set(picked)) == 4 and max(picked) > 3  # distinct images drawn from all of the set, not its first 4
    again = bench.held_out_pool([small, big, shared], seed=0)
    np.testing.assert_array_equal(again[0], x)  # seeded


def test_datafree_training_changes_the_shipped_method_only_for_a_gain_outside_the_noise():
    choose = _script("datafree_training").choose
    assert choose({"a": [0.80, 0.81, 0.82], "b": [0.70, 0.71, 0.72]}, "shipped") == "a"  # none shipped: the best
    assert choose({"shipped": [0.80, 0.81, 0.82], "b": [0.82, 0.83, 0.84]}, "shipped") == "b"  # +2 pp every seed
    # better on average, but by 0.48 ± 0.50 pp: inside the noise
    assert choose({"shipped": [0.7504, 0.7635, 0.7595], "b": [0.7607, 0.7672, 0.7599]}, "shipped") == "shipped"
    assert choose({"shipped": [0.80], "b": [0.90]}, "shipped") == "shipped"  # one seed cannot say
    assert choose({"shipped": [0.80, 0.81, 0.82], "b": [0.70, 0.71, 0.72]}, "shipped") == "shipped"


def test_datafree_training_names_its_targets_in_the_issues_whole_map():
    whole = _script("datafree_training").whole_targets({"fashion_mnist_student_at_least_85": False,
                                                        "fashion_mnist_run_at_most_15_minutes": True})
    assert whole == {
        "fashion_mnist: data-free student >= 85 % on test (the chosen method, benchmarks/datafree_training.py)": False,
        "fashion_mnist: a data-free run <= 15 minutes (the chosen method, benchmarks/datafree_training.py)": True}


@pytest.mark.slow
def test_datafree_training_gives_a_method_the_images_of_one_with_the_same_synthesis_and_counts_their_making(
        tmp_path, monkeypatch):
    import yaml

    from tests.pipelines.test_datafree_run import RECIPE

    bench = _script("datafree_training")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "held.npz", x_train=rng.integers(0, 256, (10, 28, 28), np.uint8), y_train=np.arange(10),
             x_test=rng.integers(0, 256, (20, 28, 28), np.uint8), y_test=np.arange(20) % 10)
    tiny = {**RECIPE, "data": {**RECIPE["data"], "test": str(tmp_path / "held.npz")}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(tiny))
    monkeypatch.setattr(bench, "RECIPE", str(tmp_path / "tiny.yaml"))
    monkeypatch.setattr(bench, "DATASETS", {"tiny": []})
    # two methods that differ only after synthesis, and one that makes other images
    monkeypatch.setattr(bench, "METHODS", {"one": [], "two": ["stages.distill.epochs=2"],
                                           "other": ["stages.synthesize.generator.diversity=0"]})
    out = tmp_path / "runs"
    one, two, other = (bench._run("tiny", m, 0, out) for m in ("one", "two", "other"))
    assert one["synthesis_from"] is None and other["synthesis_from"] is None
    assert two["synthesis_from"] == "datafree-tiny-one-0"  # taken from the store, not made again
    with np.load(out / "datafree-tiny-one-0" / "synthetic" / "images.npz") as a, \
            np.load(out / "datafree-tiny-two-0" / "synthetic" / "images.npz") as b:
        np.testing.assert_array_equal(a["x"], b["x"])
    assert len(json.loads((out / "datafree-tiny-two-0" / "distill" / "history.json").read_text())["loss"]) == 2
    # its time counts their making, as if it had made them: more than the stages it ran itself
    made = one["stage_seconds"]["synthesize"]
    assert two["stage_seconds"]["synthesize"] == made > 0
    cost = made + sum(v for k, v in two["stage_seconds"].items() if k != "synthesize")
    assert two["wall_seconds"] > cost - 0.1  # (the manifests' seconds and the row's are rounded)
    again = bench._run("tiny", "two", 0, out)  # a rerun finds every stage finished: it costs what it cost
    assert again["synthesis_from"] == "datafree-tiny-one-0" and again["wall_seconds"] > cost - 0.1
