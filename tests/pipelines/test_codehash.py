"""Fingerprints cover the code: a stage's code hash is the edge-kd source its module can import, so an edit
reruns exactly the stages that run the edited file."""
import shutil

import pytest

from pipelines import codehash, registry, runner

TRAINING = ("teacher", "distill", "baseline", "prune", "cluster", "qat")


def _closure(name, root=codehash.ROOT):
    return codehash.closure(runner.stage_modules(registry.STAGES[name]), root)


def test_each_stage_runs_its_own_module_the_context_and_what_they_import():
    for name, stage in registry.STAGES.items():
        files = _closure(name)
        assert f"pipelines/stages/{name}.py" in files and "pipelines/context.py" in files
        assert all(len(digest) == 64 for digest in files.values())
    for name in TRAINING:  # every training stage runs the Distiller, its losses and the data code
        files = _closure(name)
        assert {"edge_kd/distill/distiller.py", "edge_kd/distill/soft_targets.py", "edge_kd/data.py",
                "edge_kd/train.py", "models/__init__.py"} <= set(files)
        assert "edge_kd/export/tflite.py" not in files and "edge_kd/report/report.py" not in files
    assert "edge_kd/compress/prune.py" in _closure("prune")
    assert "edge_kd/export/tflite.py" in _closure("export")
    assert "edge_kd/bench/litert.py" in _closure("benchmark")
    assert "edge_kd/export/bundle.py" in _closure("bundle")
    assert "edge_kd/report/report.py" in _closure("report")
    # what picks the stages and their settings is not a stage's code: its result enters as the settings
    assert not any(f in _closure(n) for n in registry.STAGES for f in ("pipelines/recipe.py", "pipelines/runner.py"))


@pytest.fixture
def tree(tmp_path):
    """A copy of the project's source, to edit."""
    for pkg in codehash.PACKAGES:
        shutil.copytree(codehash.ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__", "_data"))
    return tmp_path


@pytest.mark.parametrize("edited, changed", [
    # the benchmark converts each integer file's float reference; the bundle prefers tflite.INTEGER variants
    ("edge_kd/export/tflite.py", {"export", "benchmark", "bundle"}),
    ("edge_kd/bench/layer_error.py", {"export", "benchmark"}),  # int8_mixed's worst layers; the report's errors
    ("edge_kd/report/report.py", {"report"}),
    ("edge_kd/distill/soft_targets.py", set(registry.STAGES)),  # the Distiller is imported by every stage's context
    ("edge_kd/compress/prune.py", {"prune"}),
    ("edge_kd/compress/qat.py", set(registry.STAGES)),  # the Distiller copies a mean teacher with it
    ("pipelines/stages/baseline.py", {"baseline"}),
    ("pipelines/recipe.py", set()),
])
def test_an_edit_changes_the_code_hash_of_exactly_the_stages_that_import_it(tree, edited, changed):
    before = {n: codehash.code_hash(runner.stage_modules(s), tree) for n, s in registry.STAGES.items()}
    assert before == {n: codehash.code_hash(runner.stage_modules(s), tree) for n, s in registry.STAGES.items()}
    with open(tree / edited, "a") as f:
        f.write("\n# an edit\n")
    after = {n: codehash.code_hash(runner.stage_modules(s), tree) for n, s in registry.STAGES.items()}
    assert {n for n in registry.STAGES if after[n] != before[n]} == changed
