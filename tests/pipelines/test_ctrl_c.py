"""Ctrl-C at any point of a real command ends it with exit 130 and the one line that says how to resume, records
nothing half-done, and the next run goes on from what was finished: in a Keras callback, in the TFLite converter's
calibration loop, in the LiteRT benchmark loop, and in a search. Each signal is sent by the process itself at a point
the test chooses (tests/pipelines/faults.py), never after a sleep. What a swallowed Ctrl-C or a second one does:
tests/test_interrupt.py; Ctrl-C in a later epoch, resumed to the uninterrupted result: test_default_run.py."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RECIPE = """
seed: 0
data: {source: fashion_mnist, val_fraction: 0.1, limit_train: 600, limit_test: 100}
teacher: {path: builtin:fashion_mnist}
student: {arch: cnn, options: {filters: [8]}}
training: {batch_size: 64, learning_rate: 0.002}
distillation:
  hard_weight: 0.1
  terms: [{name: hinton, weight: 0.9, temperature: 2.0}]
stages:
  distill: {epochs: 2}
  export: {variants: [int8]}
  benchmark: {threads: [1], min_seconds: 0.1, rounds: 3, warmup_seconds: 0.05, layer_error_samples: 16}
  report: {}
"""
LINE = "python -m pipelines.compress: interrupted during stage '{0}'; finished stages and epochs are kept: rerun the " \
       "same command to resume at '{0}'"


def _command(args, fault=()):
    """Runs ``python -m pipelines.<args[0]> <args[1:]>`` in a new process that signals itself as ``fault`` says
    (tests/pipelines/faults.py; none: the plain command); returns the finished process."""
    module = ["tests.pipelines.faults", *fault, "--", args[0]] if fault else [f"pipelines.{args[0]}"]
    return subprocess.run([sys.executable, "-m", *module, *args[1:]], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def _last_line(proc):
    return proc.stderr.strip().splitlines()[-1]


def test_ctrl_c_in_training_the_converter_or_litert_ends_the_run_with_130_and_the_next_run_goes_on(tmp_path):
    (tmp_path / "r.yaml").write_text(RECIPE)
    args = ["compress", "--recipe", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "out"), "--run-name", "r"]
    run = tmp_path / "out" / "r"

    def leftovers():
        return sorted(p.name for p in run.iterdir() if p.name.startswith(".") and p.name != ".lock")

    proc = _command(args, ("sigint", "batch:distill", "2"))  # inside the callback TensorFlow calls
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert _last_line(proc) == LINE.format("distill")
    assert sorted(p.name for p in run.iterdir()) == [".lock", "recipe.yaml"]  # nothing recorded, nothing left

    for fault, stage, before in ((("sigint", "convert", "3"), "export", "distill"),
                                 (("sigint", "litert", "20"), "benchmark", "export")):
        proc = _command(args, fault)
        assert proc.returncode == 130, proc.stderr[-3000:]
        assert _last_line(proc) == LINE.format(stage)
        assert f"] {before}: done in " in proc.stdout
        assert (run / "manifests" / f"{before}.json").is_file()
        assert not (run / "manifests" / f"{stage}.json").exists() and leftovers() == []

    proc = _command(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("finished earlier with the same settings, inputs and code, skipped") == 2
    assert "] benchmark: done in " in proc.stdout and (run / "report.md").is_file() and leftovers() == []


def test_ctrl_c_in_a_search_ends_it_with_130_naming_the_candidate(tmp_path):
    from tests.pipelines.test_search import QUICK, _args

    sets = [*QUICK, "search.variants=[int8]", "search.students=[{arch: mlp, options: {hidden: [8]}}]"]
    args = ["search", "--out", str(tmp_path), "--target-accuracy", "0.5", *_args(sets)]
    proc = _command(args, ("sigint", "batch:distill", "1"))
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert _last_line(proc) == ("python -m pipelines.search: interrupted during stage 'distill' of candidate mlp "
                                "hidden [8] · no pruning · int8; finished runs, stages and epochs are kept: rerun the "
                                "same command to resume")
    assert not list((tmp_path / "search" / "candidates").glob("*/manifests/distill.json"))
