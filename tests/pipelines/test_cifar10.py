"""MLPerf Tiny's task: the CIFAR-10 recipes and the shipped CIFAR-10 teacher, on a slice of the real
cifar10_jpeg75.npz (skipped where ../shared is absent)."""
import json

import pytest

from edge_kd import builtin_teachers
from pipelines import recipe
from tests.conftest import shared_npz
from tests.pipelines.test_compress import _main_ok


def test_the_cifar10_recipes_differ_only_by_the_teacher():
    kd, alone = recipe.load("cifar10_resnet8"), recipe.load("cifar10_tfmot_only")
    assert kd.teacher.path == builtin_teachers.resolve("builtin:cifar10") and alone.teacher is None
    assert kd.student == alone.student and kd.student.arch == "resnet8"
    assert kd.training == alone.training and kd.augment == alone.augment and kd.data == alone.data
    for stage in ("distill", "prune", "qat", "export"):
        assert getattr(kd.stages, stage) == getattr(alone.stages, stage), stage
    assert kd.distils("distill") and kd.distils("prune") and kd.distils("qat")
    teacher = recipe.load("cifar10_teacher")  # the recipe that made builtin:cifar10, on the same validation split
    assert teacher.data == kd.data and teacher.seed == kd.seed
    # with path: null the distilling recipe trains the shipped teacher's recipe
    made = ("arch", "epochs", "optimizer", "momentum", "nesterov", "learning_rate", "warmup_epochs", "label_smoothing")
    assert {k: getattr(kd.teacher, k) for k in made} == {k: getattr(teacher.teacher, k) for k in made}


@pytest.mark.slow
def test_the_cifar10_recipe_runs_end_to_end_on_a_slice_of_the_real_set(tmp_path, capsys):
    npz = shared_npz("cifar10_jpeg75.npz")
    out = tmp_path / "out"
    _main_ok(capsys, "--recipe", "cifar10_resnet8", "--data", npz, "--out", out, "--run-name", "c10",
             "--set", "data.limit_train=640", "--set", "data.limit_test=256", "--set", "distill.epochs=1",
             "--set", "prune.epochs=1", "--set", "prune.frequency=1",
             "--set", "qat.epochs=1", "--set", "export.models=final", "--set", "benchmark.threads=[1]",
             "--set", "benchmark.min_seconds=0", "--set", "benchmark.rounds=3", "--set", "benchmark.warmup_seconds=0",
             "--set", "benchmark.layer_error_samples=16")
    results = json.loads((out / "c10" / "results.json").read_text())
    models = {m["name"]: m for m in results["models"]}
    assert results["teacher"]["trained_by"] == "edge-kd, shipped (builtin:cifar10)"
    # the shipped teacher itself, through the pipeline's adapter, on 256 real test images (it scored 9x % on all)
    assert models["teacher"]["accuracy"] >= 0.8
    int8 = models["qat-int8"]
    assert int8["size_bytes"] <= 110_000 and int8["accuracy"] is not None
    assert (out / "c10" / "bundle").is_dir() and (out / "c10" / "report.md").is_file()
