"""``training.strategy: multi_worker`` for real: two worker processes on 127.0.0.1 (free ports) form a
MultiWorkerMirroredStrategy job, the same collectives, TF_CONFIG and chief/worker roles as two hosts.

The job distils, prunes and runs QAT on a small recipe, each worker with its own --out. Worker 1 is killed mid-epoch
in QAT: the chief ends with one line and keeps the finished epochs; the same commands resume QAT after its last
finished epoch (the chief sends its saved epoch and the pruned student to worker 1) and end with what one process
gives over the same two replicas (MirroredStrategy on two logical CPUs: the same global batch, split the same way,
the same per-replica augmentation and batch statistics); worker 1 writes nothing under its --out; a rerun skips every
stage on both. Workers that differ are refused before training; a worker whose peers never start gives up. Every
process is killed in the end, whatever happened, and each waits within a generous timeout: no test can hang.
"""
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from edge_kd.errors import UserError
from pipelines.multiworker import loopback_job

ROOT = Path(__file__).resolve().parents[2]
#: a small job: 360 training images, a global batch of 32 (16 a replica), a CNN with batch normalisation, a shift
#: augmentation (drawn per replica), distill, prune and QAT (2 epochs, so that a worker can die in the second)
RECIPE = """
seed: 0
data: {{source: fashion_mnist, val_fraction: 0.1, limit_train: 400, limit_test: 100}}
teacher: {{path: {teacher}}}
student: {{arch: cnn, options: {{filters: [4]}}}}
training: {{batch_size: 32, learning_rate: 0.002, strategy: multi_worker, worker_timeout: 240}}
augment: {{translate: 1}}
distillation:
  hard_weight: 0.1
  terms: [{{name: hinton, weight: 0.9, temperature: 2.0}}]
stages:
  distill: {{epochs: 1}}
  prune: {{epochs: 1, target_sparsity: 0.5, frequency: 2}}
  qat: {{epochs: 2}}
  export: {{variants: [dynamic]}}
  benchmark: {{threads: [1], min_seconds: 0.05, rounds: 3, warmup_seconds: 0.01}}
  bundle: {{}}
  report: {{}}
"""
TRAINED = {"distill": "student.keras", "prune": "pruned.keras", "qat": "qat.keras"}
STAGES = ["distill", "prune", "qat", "export", "benchmark", "bundle", "report"]
SKIPPED = "] {}: finished earlier with the same settings, inputs and code, skipped"
#: the same recipe in one process over two logical CPU devices (set before TensorFlow touches the CPU)
ONE_PROCESS = textwrap.dedent("""
    import sys
    from edge_kd.keras import tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from pipelines import recipe
    from pipelines.run import run
    run(recipe.apply_overrides(recipe.load(sys.argv[1]), ["training.strategy=mirrored", "name=r"]), out=sys.argv[2])
""")


class Worker:
    """One finished worker process: its exit status, stdout and stderr."""

    def __init__(self, pid, returncode, stdout, stderr):
        self.pid, self.returncode, self.stdout, self.stderr = pid, returncode, stdout, stderr

    def last_line(self):
        return self.stderr.strip().splitlines()[-1] if self.stderr.strip() else ""

    def __repr__(self):
        return f"exit {self.returncode}\n--- stdout\n{self.stdout[-3000:]}\n--- stderr\n{self.stderr[-3000:]}"


def _job(tmp_path, commands, timeout=420, attempts=3):
    """Runs ``commands`` (one argument list per worker, after ``python -m``) as the workers of one job on free ports of
    127.0.0.1; returns a ``Worker`` each. Every process is killed when the call ends, however it ends. Should another
    program take a port first (a worker cannot listen on it), the job starts again on other ports at once."""
    for attempt in range(attempts):
        tf_configs = loopback_job(len(commands))
        procs, logs = [], []
        try:
            for i, cmd in enumerate(commands):
                logs.append((tmp_path / f"worker{i}.out", tmp_path / f"worker{i}.err"))
                with open(logs[-1][0], "w") as o, open(logs[-1][1], "w") as e:
                    procs.append(subprocess.Popen([sys.executable, "-m", *cmd], cwd=ROOT, stdout=o, stderr=e,
                                                  env={**os.environ, "TF_CONFIG": tf_configs[i]},
                                                  start_new_session=True))
            deadline, taken = time.monotonic() + timeout, False
            while any(p.poll() is None for p in procs) and not taken:
                assert time.monotonic() < deadline, f"the job ran past {timeout} s"
                time.sleep(0.5)
                taken = any(p.poll() is not None and "cannot join the job" in e.read_text() for p, (_, e) in
                            zip(procs, logs))
        finally:
            for p in procs:  # TensorFlow catches SIGTERM in a multi-worker job: SIGKILL, its watchdog too
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
        if not taken or attempt == attempts - 1:
            return [Worker(p.pid, p.returncode, o.read_text(), e.read_text()) for p, (o, e) in zip(procs, logs)]


def _compress(recipe, out, *extra):
    return ["pipelines.compress", "--recipe", str(recipe), "--out", str(out), "--run-name", "r", *extra]


def _load(path):
    from edge_kd.keras import keras
    from edge_kd.tfmot import qat

    with qat.scope():
        return keras.models.load_model(path, compile=False)


def _weight_gap(a_file, b_file):
    a, b = _load(a_file).get_weights(), _load(b_file).get_weights()
    assert [w.shape for w in a] == [w.shape for w in b]
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


def _history_gap(a_file, b_file):
    a, b = (json.loads(Path(f).read_text()) for f in (a_file, b_file))
    assert sorted(a) == sorted(b) and all(len(a[k]) == len(b[k]) for k in a)
    return max(abs(x - y) for k in a for x, y in zip(a[k], b[k]))


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    """The job's recipe file, with a small teacher of its own (an MLP trained on 2,000 images: quick to trace)."""
    from edge_kd import data
    from edge_kd.keras import keras
    import models

    folder = tmp_path_factory.mktemp("recipe")
    b = data.load("fashion_mnist", limit_train=2000, limit_test=100)
    keras.utils.set_random_seed(0)
    teacher = models.build("mlp", b.info.input_shape, b.info.num_classes, hidden=(32,))
    teacher.compile(keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    teacher.fit(*b.arrays("train"), batch_size=64, epochs=3, verbose=0)
    teacher.save(folder / "teacher.keras")
    (folder / "r.yaml").write_text(RECIPE.format(teacher=folder / "teacher.keras"))
    return folder / "r.yaml"


@pytest.fixture(scope="module")
def job(recipe, tmp_path_factory):
    """The recipe run in one process over two replicas, then as a job of two workers, each with its own --out: a first
    time with worker 1 killed (kill -9) at the end of its third batch of QAT's second epoch, mid-step for the chief;
    then the same commands twice. Returns what each gave, and what the chief's run folder held after the kill."""
    base = tmp_path_factory.mktemp("job")
    proc = subprocess.run([sys.executable, "-c", ONE_PROCESS, str(recipe), str(base / "one")], cwd=ROOT,
                          capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got_one = proc.stdout
    chief, other = _compress(recipe, base / "w0"), _compress(recipe, base / "w1")
    killed = ["tests.pipelines.faults", "kill", "batch:qat:2", "3", "--", "compress", *other[1:]]
    got = {"one": base / "one" / "r", "one_stdout": got_one, "run": base / "w0" / "r", "other_out": base / "w1"}
    for step, commands in (("killed", [chief, killed]), ("resumed", [chief, other]), ("again", [chief, other])):
        (base / step).mkdir()
        got[step] = _job(base / step, commands)
        if step == "killed":  # what the kill left
            state = got["run"] / ".resume" / "qat" / "state.json"
            got["left"] = {"manifests": sorted(p.stem for p in (got["run"] / "manifests").glob("*.json")),
                           "qat epochs": json.loads(state.read_text())["epochs"] if state.is_file() else None,
                           "other out": got["other_out"].exists()}
    return got


@pytest.mark.slow
@pytest.mark.heavy
def test_a_worker_killed_mid_epoch_fails_the_job_with_one_line_keeping_the_finished_epochs(job):
    chief, other = job["killed"]
    assert other.returncode == -signal.SIGKILL, other
    assert chief.returncode == 75, chief
    assert re.fullmatch(r"python -m pipelines.compress: error: worker 1 \(127.0.0.1:\d+\) stopped or cannot be "
                        r"reached \(see its own output\) during stage 'qat'; its finished epochs are kept: start the "
                        r"same command on every worker again to resume stage 'qat' after its epoch 1",
                        chief.last_line()), chief
    assert job["left"] == {"manifests": ["distill", "prune"], "qat epochs": 1, "other out": False}


@pytest.mark.slow
@pytest.mark.heavy
def test_the_same_commands_resume_after_the_last_finished_epoch_and_only_the_chief_writes(job):
    chief, other = job["resumed"]
    assert [chief.returncode, other.returncode] == [0, 0], (chief, other)
    for w in (chief, other):  # the chief's word, and its saved epoch and pruned student sent to worker 1
        assert all(SKIPPED.format(s) in w.stdout for s in ("distill", "prune")), w
        assert "] qat: quantization-aware training while distilling (2 epochs) (resumed after epoch 1) ..." in w.stdout
        assert w.stdout.count("MultiWorkerMirroredStrategy over 2 replicas on 2 workers") == 1, w
    for stage in ("export", "benchmark", "bundle", "report"):
        assert f"] {stage}: left to the chief, worker 0 (127.0.0.1:" in other.stdout, other
        assert (job["run"] / "manifests" / f"{stage}.json").is_file()
    assert "training done; the chief, worker 0 (127.0.0.1:" in other.stdout
    run = job["run"]
    assert (run / "report.md").is_file() and (run / "bundle").is_dir() and list((run / "tflite").glob("*.tflite"))
    assert not (run / ".resume").exists()
    assert not job["other_out"].exists()  # nothing under the other worker's --out, not even the folder
    for w in (*job["killed"], *job["resumed"]):  # its scratch folder is gone (the killed one's, at the next start)
        assert not list(Path(tempfile.gettempdir()).glob(f"edge-kd-worker1-{w.pid}-*"))


@pytest.mark.slow
@pytest.mark.heavy
def test_the_chief_has_what_one_process_trains_over_the_same_two_replicas(job):
    one, run = job["one"], job["run"]
    # Distill and prune ran through: the same weights and histories (validation included) as one process over two
    # replicas. Each replica computes the same ops on the same slice of each global batch, and a sum of two gradients
    # is the same either way round, so they agree to the last bit here; 1e-5 leaves room for a platform whose kernels
    # are not bit-reproducible.
    for stage in ("distill", "prune"):
        assert _weight_gap(run / stage / TRAINED[stage], one / stage / TRAINED[stage]) <= 1e-5, stage
        assert _history_gap(run / stage / "history.json", one / stage / "history.json") <= 1e-5, stage
    # QAT resumed from its saved epoch, which holds the state each replica keeps apart (batch normalisation's moving
    # statistics, the quantizers' moving ranges) as the mean of the two replicas' (what any save reads), where a run
    # that never stopped goes on with each replica's own. The mean moves as the replicas' states do (an average of
    # averages), to rounding: the weights agree within 1e-6 (6e-8 measured) and the training figures exactly; the
    # validation figures, which each replica computes with its own state, within 2e-3 (5.6e-4 measured).
    assert _weight_gap(run / "qat" / TRAINED["qat"], one / "qat" / TRAINED["qat"]) <= 1e-6
    assert _history_gap(run / "qat" / "history.json", one / "qat" / "history.json") <= 2e-3
    ours, theirs = (json.loads((f / "qat" / "history.json").read_text()) for f in (run, one))
    assert {k: v for k, v in ours.items() if not k.startswith("val_")} == {
        k: v for k, v in theirs.items() if not k.startswith("val_")}
    ours, theirs = ({m["name"]: m["accuracy"] for m in json.loads((f / "results.json").read_text())["models"]}
                    for f in (run, one))
    assert ours.keys() == theirs.keys()
    for name in ours:  # a test image whose top two logits tie within 1e-6 may go either way (1 of 100 is 0.01)
        assert ours[name] == theirs[name] if not name.startswith("qat") else abs(ours[name] - theirs[name]) <= 0.02


@pytest.mark.slow
@pytest.mark.heavy
def test_the_pipeline_trains_under_mirrored_strategy_on_two_devices(job):
    # the one-process reference itself: every stage that trains ran under MirroredStrategy over two logical CPU
    # devices, and pruning under the strategy reached its target in the exported file
    assert job["one_stdout"].count("MirroredStrategy over 2 replicas") == 3  # distill, prune, qat
    models = {m["name"]: m for m in json.loads((job["one"] / "results.json").read_text())["models"]}
    assert {"student", "student-dynamic", "pruned-dynamic", "qat-int8"} <= set(models)
    assert models["pruned-dynamic"]["sparsity"] == pytest.approx(0.5, abs=0.02)
    assert all(0 <= m["accuracy"] <= 1 for m in models.values())


@pytest.mark.slow
@pytest.mark.heavy
def test_a_rerun_of_the_job_skips_every_stage_on_every_worker(job):
    chief, other = job["again"]
    assert [chief.returncode, other.returncode] == [0, 0], (chief, other)
    assert all(SKIPPED.format(s) in chief.stdout for s in STAGES), chief
    assert all(SKIPPED.format(s) in other.stdout for s in TRAINED), other  # the chief's word: it has no run folder
    assert "Epoch" not in chief.stdout + other.stdout and not job["other_out"].exists()


@pytest.mark.slow
def test_workers_that_differ_are_refused_before_training_with_one_line_on_each(recipe, tmp_path):
    chief, other = _job(tmp_path, [_compress(recipe, tmp_path / "w0"),
                                   _compress(recipe, tmp_path / "w1", "--set", "seed=1")])
    for w in (chief, other):
        assert w.returncode == 2, w
        assert re.fullmatch(r"python -m pipelines.compress: error: worker 1 \(127.0.0.1:\d+\) differs from the chief, "
                            r"worker 0 \(127.0.0.1:\d+\), in its recipe and data: every worker runs the same command "
                            r"on the same data \(or an identical copy\) .*; nothing was trained", w.last_line()), w
    assert chief.last_line() == other.last_line()
    assert not (tmp_path / "w0").exists() and not (tmp_path / "w1").exists()  # a refused run leaves nothing


@pytest.mark.slow
def test_a_worker_whose_peers_never_start_gives_up_after_worker_timeout_with_one_line(recipe, tmp_path):
    tf_config = loopback_job(2)[0]
    a, b = json.loads(tf_config)["cluster"]["worker"]
    proc = subprocess.run([sys.executable, "-m", *_compress(recipe, tmp_path / "w0", "--worker-timeout", "3")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TF_CONFIG": tf_config})
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == (
        f"python -m pipelines.compress: error: worker 0 of 2 ({a}): not every worker of TF_CONFIG "
        f"started within 3 s (training.worker_timeout): start the same command on each of {a}, {b}")
    assert not (tmp_path / "w0").exists()


# -- without a cluster ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tf_config, said", [
    (None, "training.strategy: multi_worker needs TF_CONFIG"),
    ("{not json", "TF_CONFIG is not JSON"),
    ('{"cluster": {"worker": ["a:1"]}}', 'TF_CONFIG needs "cluster" and "task" objects'),
    ('{"cluster": {"worker": ["a:1"], "ps": ["b:2"]}, "task": {"type": "worker", "index": 0}}',
     "TF_CONFIG's cluster has ps tasks"),
    ('{"cluster": {"worker": ["a"]}, "task": {"type": "worker", "index": 0}}',
     "TF_CONFIG's cluster.worker must be a list of \"host:port\" strings"),
    ('{"cluster": {"worker": ["a:1", "a:1"]}, "task": {"type": "worker", "index": 0}}', "names an address twice"),
    ('{"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 2}}',
     "TF_CONFIG's task is worker 2, but its cluster has 2 worker task(s)"),
])
def test_a_missing_or_malformed_tf_config_is_one_line(monkeypatch, tf_config, said):
    from pipelines import multiworker, recipe

    if tf_config is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", tf_config)
    r = recipe.apply_overrides(recipe.load(), ["training.strategy=multi_worker"])
    with pytest.raises(UserError) as e:
        multiworker.connect(r.training)
    assert said in str(e.value) and "\n" not in str(e.value)


def test_tf_config_gives_the_chief_index_0_and_the_workers_after_it():
    from pipelines.multiworker import read_tf_config

    spec = {"cluster": {"chief": ["c:1"], "worker": ["w:1", "w:2"]}, "task": {"type": "worker", "index": 1}}
    tasks, index = read_tf_config(json.dumps(spec))
    assert tasks == [("chief", 0, "c:1"), ("worker", 0, "w:1"), ("worker", 1, "w:2")] and index == 2


def test_what_replicas_cannot_share_is_refused_when_the_recipe_loads():
    from pipelines import recipe

    with pytest.raises(UserError, match="mean_teacher updates its teacher inside each step"):
        recipe.apply_overrides(recipe.load(), ["training.strategy=multi_worker", "teacher=null",
                                               "distillation.mode=mean_teacher", "baseline=false",
                                               "stages.teacher=false"])
    with pytest.raises(UserError, match="crd with a memory bank"):
        recipe.apply_overrides(recipe.load(), ["training.strategy=mirrored",
                                               "distillation.terms=[{name: crd, weight: 0.5, bank_size: 64}]"])


def test_a_search_refuses_a_multi_worker_recipe():
    from pipelines.search.__main__ import build_parser, load

    with pytest.raises(UserError, match="a search runs on one host"):
        load(build_parser().parse_args(["--target-accuracy", "0.5", "--set", "training.strategy=multi_worker"]))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """An MNIST slice in memory, an image folder and a prepared tfds dataset (streamed), each image told apart by its
    pixels."""
    from PIL import Image

    from edge_kd import data
    from tests import tfds_tiny

    root = tmp_path_factory.mktemp("sources")
    for i in range(120):
        folder = root / "images" / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((4, 4), i, np.uint8)).save(folder / f"{i:03d}.png")
    with pytest.MonkeyPatch.context() as m:
        m.setenv("TFDS_DATA_DIR", str(root / "tfds"))
        tfds = data.load(f"tfds:{tfds_tiny.NAME}", val_fraction=0.25)
    return {"memory": data.load("mnist", limit_train=200, limit_test=20), "folder": data.load(str(root / "images")),
            "tfds": tfds}


@pytest.mark.parametrize("source", ["memory", "folder", "tfds"])
@pytest.mark.parametrize("workers, replicas", [(2, 2), (2, 4), (3, 3)])
def test_each_worker_reads_its_replicas_slices_of_every_global_batch(sources, source, workers, replicas):
    """In memory and streamed alike, the workers' batches, replica by replica, are the one-process batches cut in
    order: replica r takes examples r*b .. (r+1)*b - 1 of each global batch (b = global / replicas)."""
    from edge_kd.keras import tf

    b, batch = sources[source], 3 * replicas

    def batches(ctx=None):
        return [x for x, _ in b.dataset("train", batch, seed=3, drop_remainder=True, epochs=range(1, 3),
                                        input_context=ctx).as_numpy_iterator()]

    whole, local = batches(), replicas // workers
    shares = [batches(tf.distribute.InputContext(workers, w, replicas)) for w in range(workers)]
    assert len(whole) >= 3 and all(len(s) == len(whole) * local for s in shares)
    assert all(len(x) == batch // replicas for s in shares for x in s)
    for step, expected in enumerate(whole):
        joined = np.concatenate([shares[w][step * local + j] for w in range(workers) for j in range(local)])
        assert np.array_equal(joined, expected), step
    with pytest.raises(ValueError, match="drop_remainder"):
        b.dataset("train", batch, input_context=tf.distribute.InputContext(workers, 0, replicas))


def test_a_lost_worker_is_named_from_the_error_tensorflow_gives():
    from edge_kd.keras import tf
    from pipelines.multiworker import Cluster, WorkerLost, is_lost

    tasks = [("worker", 0, "a:1"), ("worker", 1, "b:1"), ("worker", 2, "c:1")]
    chief = Cluster(None, 0, tasks, 60.0)
    heartbeats = ("Error reported from /job:worker/task:1: The following tasks are unhealthy (stopped sending "
                  "heartbeats):\n/job:worker/replica:0/task:2\nThe tasks have crashed.")
    assert chief._culprit(heartbeats) == "worker 2 (c:1)"
    assert chief._culprit("Additional GRPC error information from remote target /job:worker/replica:0/task:1 "
                          "while calling /tensorflow.WorkerService/CompleteInstance") == "worker 1 (b:1)"
    assert chief._culprit("Socket closed") == "another worker"
    assert Cluster(None, 1, tasks[:2], 60.0)._culprit("Socket closed") == "worker 0 (a:1)"  # the only other one
    late = tf.errors.DeadlineExceededError(None, None, "Collective has timed out during execution.")
    assert is_lost(late) and not is_lost(tf.errors.ResourceExhaustedError(None, None, "OOM"))
    lost = chief.lost(late, "stage 'qat'")
    assert isinstance(lost, WorkerLost) and lost.exit_code == 75
    assert str(lost) == ("another worker did not answer within 60 s (training.worker_timeout) during stage 'qat'; "
                         "start the same command on every worker again")
