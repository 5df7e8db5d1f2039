"""python -m pipelines.search: it finds what a brute-force run of the same space picks, resumes without retraining,
respects each constraint, exits 1 with the closest candidates when the target is out of reach, and refuses bad
settings in one line with exit 2 before anything trains.

One small space is searched once per module (three students, int8, on a slice of the built-in Fashion-MNIST); the
other searches run in its folder and so reuse its cached candidate runs.
"""
import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.search import __main__ as search_cli

ROOT = Path(__file__).resolve().parents[2]
STUDENTS = "[{arch: mlp, options: {hidden: [16]}}, {arch: cnn, options: {filters: [8]}}, " \
           "{arch: cnn, options: {filters: [16, 32]}}]"
QUICK = ["data.limit_train=1200", "data.limit_test=200", "distill.epochs=2", "qat.epochs=1",
         "training.learning_rate=0.005", "distillation.consistent=false", "distillation.teacher_cache=true",
         "benchmark.min_seconds=0.1", "benchmark.warmup_seconds=0.05",
         "benchmark.rounds=3", "benchmark.threads=[1]", "benchmark.layer_error_samples=16", "search.sparsity=[0]", "search.eta=2"]
SPACE = [*QUICK, "search.variants=[int8]", f"search.students={STUDENTS}"]


def _args(sets, *extra):
    return [a for s in sets for a in ("--set", s)] + [str(e) for e in extra]


def _search(out, sets, *extra):
    """Runs the command in this process; returns (exit status, stdout, stderr)."""
    so, se = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(so), contextlib.redirect_stderr(se):
        try:
            code = search_cli.main(["--out", str(out), *_args(sets, *extra)])
        except SystemExit as e:  # argparse's own errors
            code = e.code
    return code, so.getvalue(), se.getvalue()


@pytest.fixture(scope="module")
def space_runs(tmp_path_factory):
    """Every candidate of SPACE trained to the end by plain pipelines.run runs (the brute force), in the folder and
    store a search of SPACE uses; returns (out, {label: (val accuracy, size bytes)} in the space's order)."""
    from pipelines import recipe as recipe_mod
    from pipelines.run import run
    from pipelines.search import space

    out = tmp_path_factory.mktemp("search")
    args = search_cli.build_parser().parse_args(["--target-accuracy", "0.5", *_args(SPACE)])
    r, spec = search_cli.load(args)
    measured = {}
    for c in space.candidates(r, spec):
        run_dir = run(recipe_mod.from_dict(c.rung_recipe(1.0, spec.rungs - 1)), out=out / "search" / "candidates",
                      stream=io.StringIO(), store=out / "search" / "store")
        row = next(m for m in json.loads((run_dir / "results.json").read_text())["models"] if m["format"] == "tflite")
        measured[c.label] = (row["val_accuracy"], row["size_bytes"])
    return out, measured


@pytest.fixture(scope="module")
def searched(space_runs):
    """The search of SPACE at a target that the cheapest candidate misses; returns (out, target, the brute-force
    pick, search.json, stdout)."""
    out, measured = space_runs
    by_size = sorted(measured.items(), key=lambda kv: kv[1][1])
    cheapest, others = by_size[0], by_size[1:]
    reach = min(v for _, (v, _) in others)
    assert reach > cheapest[1][0] + 0.005, f"the space does not separate its candidates: {measured}"
    target = round(reach - 0.0025, 4)  # the cheapest misses it, the others meet it
    brute = min((kv for kv in measured.items() if kv[1][0] >= target), key=lambda kv: kv[1][1])[0]
    code, stdout, stderr = _search(out, SPACE, "--target-accuracy", target)
    assert code == 0, stdout + stderr
    return out, target, brute, json.loads((out / "search" / "search.json").read_text()), stdout


def test_the_search_picks_what_brute_force_picks_and_writes_its_folder(searched, space_runs):
    out, target, brute, results, stdout = searched
    assert results["chosen"]["label"] == brute
    assert brute != min(space_runs[1].items(), key=lambda kv: kv[1][1])[0]  # not trivially the cheapest
    ch = results["chosen"]
    assert ch["val_accuracy"] >= target and 0 < ch["test_accuracy"] <= 1
    assert results["target"] == {"split": "validation", "accuracy": target, "given": f"target_accuracy {target:g}",
                                 "teacher_val_accuracy": None}
    # one progress line per candidate run, with its settings, accuracy, size and time, and the running best
    lines = [ln for ln in stdout.splitlines() if ln.startswith("[rung ")]
    assert len(lines) == sum(len(c["runs"]) for c in results["candidates"])
    progress = re.compile(r"\] .+ \(distill \d+, qat \d+ epochs\) \.\.\. val \d+\.\d\d% · test \d+\.\d\d% · "
                          r"\d+\.\d KB · \d+\.\d+ ms · \d+ s.*   best: .+ · search \d+\.\d min$")
    assert all(progress.search(ln) for ln in lines), lines
    assert f"best: {brute}" in lines[-1]
    root = out / "search"
    for name in ("search.json", "search.csv", "search.md", "pareto.png", "recipe.yaml"):
        assert (root / name).is_file(), name
    assert (root / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert brute in (root / "search.md").read_text() and "Chosen" in (root / "search.md").read_text()
    csv_lines = (root / "search.csv").read_text().splitlines()
    assert csv_lines[0].startswith("candidate,")
    assert len(csv_lines) == 1 + sum(max(1, len(c["runs"])) for c in results["candidates"])  # a row per run
    # every reported run was measured through LiteRT on the whole test split: the run's benchmark says so
    chosen_run = root / ch["run"]
    rows = json.loads((chosen_run / "results.json").read_text())
    assert rows["data"]["test_size"] == 200 and ch["file"].endswith(".tflite") and (root / ch["file"]).is_file()
    # the bundle of the chosen model, verified against its golden outputs
    from pipelines import verify

    assert verify.main([str(root / "bundle")]) == 0
    assert json.loads((root / "bundle" / "manifest.json").read_text())["measured"]["name"] == ch["model"]


def test_the_chosen_recipe_reproduces_the_candidate_alone_with_compress(searched):
    from pipelines import recipe as recipe_mod

    out, _, _, results, _ = searched
    r = recipe_mod.load(out / "search" / "recipe.yaml")
    chosen_run = out / "search" / results["chosen"]["run"]
    used = recipe_mod.load(chosen_run / "recipe.yaml")
    # the same recipe as the chosen run, but for its folder's name (and the bundle's runtime, the search's own
    # check): compress trains exactly that candidate
    def plain(recipe):
        d = {**recipe.to_dict(), "name": None}
        d["stages"]["bundle"]["min_runtime"] = None
        return d

    assert plain(r) == plain(used)
    assert r.search is None and r.stages.export.variants == ["int8"]


def test_a_rerun_trains_nothing_and_finds_the_same(searched):
    out, target, brute, results, _ = searched
    code, stdout, _ = _search(out, SPACE, "--target-accuracy", target)
    assert code == 0
    again = json.loads((out / "search" / "search.json").read_text())
    assert again["chosen"]["label"] == brute and again["runs_trained"] == 0
    lines = [ln for ln in stdout.splitlines() if ln.startswith("[rung ")]
    assert lines and all("(cached)" in ln for ln in lines)


def test_each_constraint_is_respected(searched, space_runs):
    out, target, brute, results, _ = searched
    measured = space_runs[1]
    # max_kb below the pick's size: the pick is left out before training, and a dearer one is not allowed either
    size = measured[brute][1]
    code, stdout, stderr = _search(out, SPACE, "--target-accuracy", target, "--max-kb", (size - 1) / 1024)
    res = json.loads((out / "search" / "search.json").read_text())
    assert res["chosen"] is None or res["chosen"]["size_bytes"] <= size - 1
    assert any(c["status"].startswith("excluded before training: file") for c in res["candidates"])
    assert code == 1 and "no candidate met" in stderr  # only the cheapest fits, and it misses the target
    # min_runtime: int8 files load on 2.14; the pick stays and says where it loads
    code, _, _ = _search(out, SPACE, "--target-accuracy", target, "--min-runtime", "2.14")
    res = json.loads((out / "search" / "search.json").read_text())
    from edge_kd.bench.compat import loads_on

    assert code == 0 and loads_on(res["chosen"]["min_runtime"], "2.14")
    assert res["constraints"]["min_runtime"] == "2.14"
    # latency: a bound nothing meets excludes every candidate before training; a loose one keeps the pick
    code, _, stderr = _search(out, SPACE, "--target-accuracy", target, "--max-latency-ms", 1e-6)
    assert code == 1 and "every candidate breaks a constraint" in stderr and "latency" in stderr
    assert "no candidate met the target" in (out / "search" / "search.md").read_text().lower()
    code, _, _ = _search(out, SPACE, "--target-accuracy", target, "--max-latency-ms", 1000)
    res = json.loads((out / "search" / "search.json").read_text())
    assert code == 0 and res["chosen"]["latency_ms"] <= 1000 and res["chosen"]["label"] == brute


def test_an_impossible_target_exits_1_with_the_closest_candidates(searched, space_runs):
    out = searched[0]
    code, stdout, stderr = _search(out, SPACE, "--target-accuracy", 1.0)
    assert code == 1
    assert "no candidate met validation accuracy >= 100.00%" in stderr and "The closest:" in stderr
    res = json.loads((out / "search" / "search.json").read_text())
    best = max((c for c in res["candidates"] if c["runs"]), key=lambda c: c["runs"][-1]["val_accuracy"])["label"]
    assert stderr.splitlines()[1].strip().startswith(best)  # the closest first
    assert res["chosen"] is None and not (out / "search" / "bundle").exists()
    assert not (out / "search" / "recipe.yaml").exists()
    assert "No candidate met the target" in (out / "search" / "search.md").read_text()


def test_max_drop_counts_from_the_teachers_validation_accuracy(searched):
    out = searched[0]
    code, _, _ = _search(out, SPACE, "--max-drop", 100)
    res = json.loads((out / "search" / "search.json").read_text())
    teacher_val = res["target"]["teacher_val_accuracy"]
    assert code == 0 and 0.5 < teacher_val <= 1 and res["target"]["accuracy"] == pytest.approx(teacher_val - 1.0)


BAD = {
    "no target": ([], ["--target-accuracy", "--max-drop"]),
    "both targets": (["--target-accuracy", "0.9", "--max-drop", "1"], ["not both"]),
    "a percentage as a fraction": (["--target-accuracy", "90"], ["search.target_accuracy", "90"]),
    "unknown objective": (["--target-accuracy", "0.9", "--objective", "speed"], ["--objective", "speed"]),
    "no candidates": (["--target-accuracy", "0.9", "--max-candidates", "0"], ["search.max_candidates"]),
    "bad runtime": (["--target-accuracy", "0.9", "--min-runtime", "new"], ["search.min_runtime", "2.14"]),
    "bad variant": (["--target-accuracy", "0.9", "--set", "search.variants=[fp16]"], ["search.variants", "fp16"]),
    "empty widths": (["--target-accuracy", "0.9", "--set", "search.widths=[]"], ["search.widths"]),
    "unknown option": (["--target-accuracy", "0.9", "--set", "search.students=[{options: {depth: 3}}]"],
                       ["search.students.0", "depth"]),
    "bad loss": (["--target-accuracy", "0.9", "--set", "search.losses=[{temperature: 2}]"], ["search.losses.0"]),
    "drop without teacher": (["--max-drop", "1", "--set", "teacher=null", "--set", "stages.teacher=false", "--set", "distillation.terms=[]",
                              "--set", "baseline=false"], ["--max-drop", "no teacher"]),
    "bad data": (["--target-accuracy", "0.9", "--set", "data.source=/nope.npz"], ["not found"]),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_settings_are_one_line_exit_2_before_anything_trains(case, tmp_path):
    args, needles = BAD[case]
    code, stdout, stderr = _search(tmp_path / "out", [], *args)
    assert code == 2, stdout + stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    for n in needles:
        assert n.lower() in lines[0].lower(), lines[0]
    assert not (tmp_path / "out" / "search" / "candidates").exists()


def test_a_killed_search_resumes_without_retraining_finished_candidates(tmp_path):
    sets = [*QUICK, "search.variants=[dynamic]", "search.students=[{arch: mlp, options: {hidden: [16]}}, "
                                                 "{arch: mlp, options: {hidden: [24]}}]", "search.rungs=1"]
    cmd = [sys.executable, "-m", "pipelines.search", "--out", str(tmp_path), "--target-accuracy", "0.99",
           *_args(sets)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    first = None
    deadline = time.monotonic() + 600
    for line in proc.stdout:  # kill it as soon as one candidate run has finished
        if line.startswith("[rung ") and "best: " in line:
            first = line
            os.killpg(proc.pid, signal.SIGKILL)
            break
        assert time.monotonic() < deadline
    proc.wait()
    assert first is not None and proc.returncode == -signal.SIGKILL
    label = first.split("] ", 1)[1].split(" (", 1)[0]
    finished = sorted((tmp_path / "search" / "candidates").glob("*/manifests/report.json"))
    assert len(finished) >= 1
    stamps = {p: p.read_text() for p in (tmp_path / "search" / "candidates").glob("*/manifests/*.json")}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr  # 99 % is out of reach: the closest are shown
    again = next(ln for ln in proc.stdout.splitlines() if ln.startswith("[rung ") and f"] {label} (" in ln)
    assert "(cached)" in again
    for p, text in stamps.items():  # a finished run's stages were not run again, its bundle and report included
        if p.parent.parent in {f.parent.parent for f in finished}:
            assert p.read_text() == text, p


def test_candidates_share_the_teacher_stage_instead_of_retraining_it(tmp_path):
    sets = [*QUICK, "teacher.path=null", "teacher.arch=mlp", "teacher.options={hidden: [32]}", "teacher.epochs=1",
            "search.variants=[dynamic]", "search.students=[{arch: mlp, options: {hidden: [8]}}, "
                                         "{arch: mlp, options: {hidden: [16]}}]"]
    code, stdout, stderr = _search(tmp_path, [*sets, "search.rungs=1"], "--target-accuracy", 0.99)
    assert code == 1, stdout + stderr  # out of reach, so both candidates are trained
    logs = {p.stem: p.read_text() for p in (tmp_path / "search" / "logs").glob("*.log")}
    assert sorted(name.split("-")[1] for name in logs) == ["h_16_", "h_8_"]  # two candidates
    trained = [log for log in logs.values() if "teacher: train teacher 'mlp'" in log]
    shared = [log for log in logs.values() if "teacher: finished by another run with the same settings" in log]
    assert len(trained) == 1 and len(shared) == 1
    # and a runtime constraint the dynamic-range files break leaves every candidate out before training
    code, _, stderr = _search(tmp_path, [*sets, "search.rungs=1"], "--target-accuracy", 0.99, "--min-runtime", "2.14")
    assert code == 1 and "every candidate breaks a constraint" in stderr and "needs TFLite 2.17" in stderr


def test_a_candidate_whose_training_fails_is_reported_and_the_search_goes_on(tmp_path):
    sets = [*QUICK, "search.variants=[dynamic]", "search.students=[{arch: mlp, options: {hidden: [8]}}]",
            "search.losses=[{hard_weight: 1.0e+38}, {hard_weight: 0.1}]", "search.rungs=1"]
    code, stdout, stderr = _search(tmp_path, sets, "--target-accuracy", 0.05)
    assert code == 0, stdout + stderr
    res = json.loads((tmp_path / "search" / "search.json").read_text())
    failed, ok = res["candidates"]
    assert failed["status"].startswith("failed in rung 1: stage 'distill': the training loss became nan") and not failed["runs"]
    assert res["chosen"]["label"] == ok["label"] and "loss 1" in ok["label"]
    assert " failed: stage 'distill'" in stdout
