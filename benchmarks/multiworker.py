"""Images per second of the distill stage as a multi-worker job on one machine: 1 and 2 workers, one core each.

Two worker processes on 127.0.0.1, each pinned to a CPU core of its own (``sched_setaffinity``) with TensorFlow held to
one thread of each kind, stand for two hosts of one core each: the same ``MultiWorkerMirroredStrategy``, TF_CONFIG,
chief/worker roles and collectives, over loopback TCP. This simulates two hosts; it is not a speed-up claim for real
ones, whose network (and cores) differ. It shows what the job's plumbing costs and whether the work splits.

Every run is ``python -m pipelines.compress`` on the default recipe's data, teacher (the shipped ResNet-8 ×2), student
(cnn 16-32-48) and augmentation, the distill stage alone at the global batch 128 on ``--limit-train`` images for
``--epochs`` epochs (export, benchmark and report cut short, and not timed):

- ``none``: one process on core 0 (``training.strategy: none``), the baseline;
- ``1 worker``: a job of one worker on core 0 (``multi_worker``, TF_CONFIG naming one worker);
- ``2 workers``: a job of two workers, on cores 0 and 1.

A Keras callback in the chief times each epoch's training (from its start to its validation); the first epoch, which
traces the step, is left out. Images per second = the images an epoch trains on (whole global batches across
replicas) / the median of the other epochs' seconds.

``--gpu`` (on a machine with a GPU) instead times the same stage with ``training.strategy: mirrored`` on its GPU(s)
against ``none`` on its CPU (CUDA hidden, every core).

Writes ``benchmarks/results/multiworker.json`` (``--gpu``: ``multiworker_gpu.json``), with how many cores other
processes kept busy on average while the runs ran (``/proc/stat`` less the runs' own CPU time), and a sentence when
that was a quarter of a core or more: the figures are only as quiet as the machine was.

    python benchmarks/multiworker.py            # about 4 minutes on 2 cores
    python benchmarks/multiworker.py --gpu
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge_kd.fileio import write_json  # noqa: E402
from pipelines.multiworker import loopback_job  # noqa: E402

BATCH = 128
#: the distill stage alone; what the run needs after it (export, benchmark, report) as short as it goes
SETS = ["baseline=false", "prune=false", "qat=false", "bundle=false", "export.variants=[fp32]",
        "benchmark.threads=[1]", "benchmark.min_seconds=0.05", "benchmark.warmup_seconds=0.01", "benchmark.rounds=3",
        f"training.batch_size={BATCH}"]


def images_per_second(epoch_seconds: list[float], images: int) -> dict:
    """Returns the images per second of the epochs after the first (which traces) at their median, and the spread."""
    timed = [float(s) for s in epoch_seconds[1:]]
    if not timed:
        raise ValueError("images per second needs at least two epochs (the first traces the step and is left out)")
    return {"images_per_second": round(images / float(np.median(timed)), 1),
            "epoch_seconds": [round(s, 2) for s in epoch_seconds], "timed_epochs": len(timed)}


def busy_seconds() -> float | None:
    """Returns the CPU seconds every process of the machine has used since boot (Linux: /proc/stat), or None."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_seconds() -> float:
    """Returns the CPU seconds this process and its finished children (the runs) have used."""
    import resource

    return sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for f in ("ru_utime", "ru_stime"))


def contention(other_cores: float | None, cores: int) -> str | None:
    """Returns a sentence saying the figures are contended when other processes kept a quarter of a core or more
    busy, on average, while the runs ran (``other_cores``), else None."""
    if other_cores is None or other_cores < 0.25:
        return None
    return (f"other processes kept {other_cores:.2f} of the machine's {cores} cores busy on average during the "
            f"runs: the figures share their cores with that work; rerun on a quiet machine")


def epoch_images(train_images: int, replicated: bool) -> int:
    """Returns the images an epoch trains on: all of them on one device; whole global batches across replicas (each
    epoch's short last batch is dropped there)."""
    return (train_images // BATCH) * BATCH if replicated else train_images


# -- one worker process ----------------------------------------------------------------------------------------------
def worker(spec: dict) -> int:
    """Runs the command ``spec["args"]`` pinned to ``spec["core"]`` (None: every core), timing each distill epoch's
    training into ``spec["times"]``."""
    if spec.get("core") is not None:
        os.sched_setaffinity(0, {spec["core"]})
        for var in ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "OMP_NUM_THREADS"):
            os.environ[var] = "1"
    from edge_kd import interrupt, train
    from edge_kd.keras import keras, tf

    seconds, seen = [], {}

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            seen.update(replicas=int(self.model.distribute_strategy.num_replicas_in_sync),
                        gpus=len(tf.config.list_logical_devices("GPU")))
            self.start, self.open = time.perf_counter(), True

        def on_test_begin(self, logs=None):  # fit's validation: the epoch's training is over
            if getattr(self, "open", False):
                seconds.append(time.perf_counter() - self.start)
                self.open = False

    real = train.fit

    def fit(*args, callbacks=(), **kw):
        if interrupt.where() == "stage 'distill'":
            callbacks = [*callbacks, Timer()]
        return real(*args, callbacks=callbacks, **kw)

    train.fit = fit
    from pipelines.compress import main

    code = main(spec["args"], quiet_native=True)
    Path(spec["times"]).write_text(json.dumps({"epoch_seconds": seconds, **seen}))
    return code


# -- the runs ---------------------------------------------------------------------------------------------------------
def run(name: str, strategy: str, cores: list, folder: Path, args, env=None) -> dict:
    """Runs the distill stage with ``strategy`` as one process per entry of ``cores`` (a core, or None for every core);
    returns the chief's epoch times and the processes' exit status."""
    sets = [*SETS, f"training.strategy={strategy}", f"distill.epochs={args.epochs}",
            f"data.limit_train={args.limit_train}", f"name={name.replace(' ', '_')}"]
    tf_configs = loopback_job(len(cores))
    procs = []
    try:
        for i, core in enumerate(cores):
            times = folder / f"{name}-{i}.json"
            spec = {"core": core, "times": str(times),
                    "args": ["--out", str(folder / f"out{i}"), *[a for s in sets for a in ("--set", s)]]}
            worker_env = {**os.environ, **(env or {})}
            if strategy == "multi_worker":
                worker_env["TF_CONFIG"] = tf_configs[i]
            log = open(folder / f"{name}-{i}.log", "w")
            procs.append((subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec)], cwd=ROOT,
                                           env=worker_env, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True), times, log))
        for p, _, _ in procs:
            p.wait(timeout=args.timeout)
    finally:
        for p, _, log in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
            log.close()
    codes = [p.returncode for p, _, _ in procs]
    if any(codes):
        tail = (folder / f"{name}-0.log").read_text()[-2000:]
        raise SystemExit(f"{name}: a process exited with {codes}; the chief's log ends:\n{tail}")
    return {**json.loads(procs[0][1].read_text()), "processes": len(cores), "cores": list(cores)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--limit-train", type=int, default=6000, help="training images taken (before the validation split)")
    p.add_argument("--epochs", type=int, default=3, help="distill epochs a run (the first is not timed)")
    p.add_argument("--gpu", action="store_true", help="mirrored on this machine's GPU(s) against none on its CPU")
    p.add_argument("--timeout", type=float, default=3600, help="seconds a run may take")
    p.add_argument("--json", default=None, help="where the results go (default: benchmarks/results/multiworker.json, "
                                                "with --gpu multiworker_gpu.json)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker))
    if args.json is None:
        args.json = str(ROOT / "benchmarks" / "results" / f"multiworker{'_gpu' if args.gpu else ''}.json")
    if args.epochs < 2:
        p.error("--epochs must be at least 2: the first traces the step and is not timed")

    from edge_kd import data

    train_images = data.load("fashion_mnist", limit_train=args.limit_train, seed=0).count("train")
    cores = sorted(os.sched_getaffinity(0))
    if not args.gpu and len(cores) < 2:
        raise SystemExit("the two-worker run needs two cores; this process may use one")
    load_before = os.getloadavg()
    start, busy_start, own_start = time.time(), busy_seconds(), own_seconds()
    with tempfile.TemporaryDirectory(prefix="edge-kd-bench-multiworker-") as tmp:
        folder = Path(tmp)
        if args.gpu:
            plan = [("none on the CPU", "none", [None], {"CUDA_VISIBLE_DEVICES": "-1"}),
                    ("mirrored on the GPU", "mirrored", [None], {})]
        else:
            plan = [("none", "none", [cores[0]], {}),
                    ("1 worker", "multi_worker", [cores[0]], {}),
                    ("2 workers", "multi_worker", cores[:2], {})]
        rows = {}
        for name, strategy, on, env in plan:
            print(f"{name} ...", flush=True)
            got = run(name, strategy, on, folder, args, env)
            if args.gpu and strategy == "mirrored" and not got["gpus"]:
                raise SystemExit("--gpu: TensorFlow sees no GPU on this machine; nothing was measured")
            got.update(images_per_second(got["epoch_seconds"], epoch_images(train_images, got["replicas"] > 1)))
            got["strategy"] = strategy
            rows[name] = got
            print(f"{name}: {got['images_per_second']} images/s (epochs {got['epoch_seconds']} s)", flush=True)
    elapsed, busy_end = time.time() - start, busy_seconds()
    other_cores = (None if busy_start is None or busy_end is None else
                   max(0.0, (busy_end - busy_start) - (own_seconds() - own_start)) / elapsed)
    base = rows["none on the CPU" if args.gpu else "none"]["images_per_second"]
    for row in rows.values():
        row["vs_none"] = round(row["images_per_second"] / base, 2)
    result = {
        "command": " ".join(["python benchmarks/multiworker.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"),
        "what": ("mirrored on the GPU against none on the CPU" if args.gpu else
                 "two worker processes on 127.0.0.1, one core each: a simulation of two hosts of one core, not a "
                 "speed-up claim for real hosts"),
        "recipe": "fashion_mnist (default) with " + " ".join(f"--set {s}" for s in SETS),
        "train_images": train_images, "global_batch": BATCH, "epochs": args.epochs,
        "load_average_before": [round(x, 2) for x in load_before],
        "other_work_cores": None if other_cores is None else round(other_cores, 2),
        "contended": contention(other_cores, os.cpu_count()),
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "seconds": round(elapsed, 1),
        "runs": rows,
    }
    write_json(Path(args.json), result)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
