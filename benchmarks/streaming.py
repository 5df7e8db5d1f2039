"""Training from an image folder larger than memory: the streamed data path under a memory cap.

1. **Larger than memory.** Writes a folder of generated PNG photos (``--size`` px, RGB, ten classes:
   a colour gradient per class under heavy noise, so PNG cannot shrink them much) until the folder
   holds ``--ratio`` × ``--cap-mb`` bytes, then trains a small MobileNet-style student on it for
   ``--epochs`` in a child process confined by a memory cgroup of ``--cap-mb`` (cgroup v2
   ``memory.max`` or v1 ``memory.limit_in_bytes``; page cache counts against it too, and is
   reclaimed). The child loads the folder (``edge_kd.data``: headers only), trains through
   ``DataBundle.dataset`` (read, decode, shuffle, batch, prefetch) with the pipeline's own
   ``train.fit``, then walks the validation split (``batches``) for its accuracy. Reported: images
   per second of training, the child's peak RSS (VmHWM), the cgroup's peak usage and whether it hit
   the cap (page cache counts against the cap, so reading a folder larger than it reaches the cap by
   design: the kernel reclaims the cache; what matters is ``oom_kills``); a run the kernel kills
   for memory says so. Then, as the contrast, a child under the same
   cap reads the training split into one array (``DataBundle.raw``: what the in-memory path holds)
   and is expected to be killed for memory.
2. **Small data in memory against streamed.** The first ``--small`` Fashion-MNIST training images,
   once as arrays (the ``.npz`` path) and once as a PNG folder (streamed), each iterated through
   ``DataBundle.dataset`` for one shuffled epoch of batches of 128, in interleaved rounds: images per
   second of each, and their ratio.

Part 1 needs to create a memory cgroup (root, with the cgroup v1 or v2 memory controller); without
that it says so in one line and exits with 2. Writes ``benchmarks/results/streaming.json``. The folder is kept under ``--folder``
and reused when it matches; it is written under a temporary name and renamed when complete.

    python benchmarks/streaming.py                       # ~43,000 224×224 PNGs (6 GiB) under a 1.5 GiB cap
    python benchmarks/streaming.py --quick --json /tmp/streaming.json   # the test suite's: tiny, 512 MiB-free
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge_kd.bench import stats  # noqa: E402
from edge_kd.fileio import write_json  # noqa: E402

CLASSES = 10
STUDENT = ("mobilenet", {"width": 0.5, "blocks": [[32, 2], [64, 2], [128, 2]]})


# -- the folder ---------------------------------------------------------------------------------------------
def _image(label: int, index: int, size: int) -> np.ndarray:
    """A generated photo: class ``label``'s colour gradient under noise, different for every ``index``."""
    rng = np.random.default_rng(label * 1_000_003 + index)
    ramp = np.linspace(0, 1, size, dtype=np.float32)
    hue = np.array([(label * 37) % 256, (label * 91) % 256, (label * 53) % 256], np.float32)
    base = hue * ramp[:, None, None] + (255 - hue) * ramp[None, :, None]
    return np.clip(base * 0.5 + rng.normal(64, 48, (size, size, 3)), 0, 255).astype(np.uint8)


def _write_chunk(args):
    from PIL import Image

    folder, size, start, stop = args
    total = 0
    for i in range(start, stop):
        label = i % CLASSES
        path = Path(folder) / f"c{label}" / f"{i:06d}.png"
        Image.fromarray(_image(label, i, size)).save(path, compress_level=1)
        total += path.stat().st_size
    return total


def make_folder(folder: Path, size: int, target_bytes: int) -> dict:
    """Returns the spec of an image folder of at least ``target_bytes``, written (atomically) unless present."""
    spec_file = folder / "spec.json"
    if spec_file.is_file():
        spec = json.loads(spec_file.read_text())
        if spec["size"] == size and spec["bytes"] >= target_bytes:
            return spec
    from concurrent.futures import ProcessPoolExecutor

    per_image = _png_bytes(size)  # of one image, to know how many make target_bytes
    n = int(np.ceil(target_bytes / per_image / CLASSES) * CLASSES)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    for c in range(CLASSES):
        (partial / f"c{c}").mkdir(parents=True)
    start = time.perf_counter()
    step = 1000
    chunks = [(str(partial), size, s, min(s + step, n)) for s in range(0, n, step)]
    written = 0
    # a pool for the real folder (the script run, before anything imports TensorFlow); in-process when small
    pool = ProcessPoolExecutor(max_workers=os.cpu_count() or 1) if len(chunks) > 1 else None
    try:
        for done, b in enumerate((pool.map if pool else map)(_write_chunk, chunks), start=1):
            written += b
            print(f"  writing images: {min(done * step, n):,}/{n:,} ({written / 2**30:.2f} GiB)", flush=True)
    finally:
        if pool:
            pool.shutdown()
    spec = {"size": size, "images": n, "bytes": written, "decoded_bytes": n * size * size * 3,
            "seconds_to_write": round(time.perf_counter() - start, 1)}
    write_json(partial / "spec.json", spec)
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return spec


def _png_bytes(size: int) -> float:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(_image(0, 0, size)).save(buf, "PNG", compress_level=1)
    return len(buf.getvalue())


# -- the memory cap -----------------------------------------------------------------------------------------
class Cgroup:
    """A fresh memory cgroup of ``cap`` bytes (v2 or v1), for a child process to start in."""

    def __init__(self, cap: int):
        v2 = Path("/sys/fs/cgroup/cgroup.controllers")
        name = f"edgekd-streaming-{os.getpid()}"
        if v2.is_file() and "memory" in v2.read_text().split():
            self.kind, self.dir = "v2", Path("/sys/fs/cgroup") / name
            files = {"limit": "memory.max", "peak": "memory.peak", "events": "memory.events"}
        else:
            own = next((line.split(":", 2)[2].strip() for line in Path("/proc/self/cgroup").read_text().splitlines()
                        if line.split(":")[1] == "memory"), None)
            if own is None:
                _refuse("no memory cgroup controller on this machine; part 1 needs one")
            self.kind, self.dir = "v1", Path("/sys/fs/cgroup/memory") / own.lstrip("/") / name
            files = {"limit": "memory.limit_in_bytes", "peak": "memory.max_usage_in_bytes", "events": "memory.failcnt"}
        self.files = files
        try:
            self.dir.mkdir()
            (self.dir / files["limit"]).write_text(str(cap))
            if self.kind == "v2" and (self.dir / "memory.swap.max").exists():
                (self.dir / "memory.swap.max").write_text("0")
            elif self.kind == "v1" and (self.dir / "memory.memsw.limit_in_bytes").exists():
                (self.dir / "memory.memsw.limit_in_bytes").write_text(str(cap))
        except OSError as e:
            self.remove()
            _refuse(f"cannot create a memory cgroup at {self.dir} ({e.strerror}); part 1 needs root")
        self.cap = int((self.dir / files["limit"]).read_text().strip())

    def join(self):  # runs in the child between fork and exec
        (self.dir / "cgroup.procs").write_text(str(os.getpid()))

    def peak(self) -> int | None:
        f = self.dir / self.files["peak"]
        return int(f.read_text().strip()) if f.is_file() else None

    def events(self) -> dict:
        """Returns how often usage reached the cap (the kernel then reclaims, page cache first) and OOM kills."""
        if self.kind == "v1":
            oom = dict(line.split() for line in (self.dir / "memory.oom_control").read_text().splitlines())
            return {"reached_cap": int((self.dir / self.files["events"]).read_text().strip()),
                    "oom_kills": int(oom.get("oom_kill", 0))}
        events = dict(line.split() for line in (self.dir / self.files["events"]).read_text().splitlines())
        return {"reached_cap": int(events.get("max", 0)), "oom_kills": int(events.get("oom_kill", 0))}

    def remove(self):
        try:
            self.dir.rmdir()
        except OSError:
            pass


def _refuse(why: str):
    print(f"benchmarks/streaming.py: {why}", file=sys.stderr)
    sys.exit(2)


# -- the child: train from the folder -----------------------------------------------------------------------
def child(folder: str, epochs: int, batch: int, copy: bool = False) -> dict:
    import models
    from edge_kd import data, train
    from edge_kd.distill import Distiller
    from edge_kd.keras import keras, tf

    start = time.perf_counter()
    b = data.load(folder, val_fraction=0.05, test_fraction=0.05, seed=0)
    load_s = time.perf_counter() - start
    if copy:  # what a full NumPy copy of the training split (the in-memory path) needs
        x = b.raw("train")
        return {"copied_bytes": int(x.nbytes)}
    keras.utils.set_random_seed(0)
    student = models.build(STUDENT[0], b.info.input_shape, b.info.num_classes, **STUDENT[1])
    model = Distiller(student)
    start = time.perf_counter()
    train.fit(model, b.dataset("train", batch, shuffle=True, seed=0), epochs, 2e-3, verbose=2)
    fit_s = time.perf_counter() - start
    correct = 0
    logits = tf.function(lambda x: student(x, training=False))
    for x, y in b.batches("val", 64):
        correct += int((logits(tf.constant(x)).numpy().argmax(1) == y).sum())
    status = {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in open("/proc/self/status"))
              if k in ("VmHWM", "VmRSS")}
    return {"streamed": b.streamed, "train_images": b.count("train"), "val_images": b.count("val"),
            "input_shape": list(b.info.input_shape), "load_seconds": round(load_s, 1),
            "fit_seconds": round(fit_s, 1), "images_per_second": round(b.count("train") * epochs / fit_s, 1),
            "val_accuracy": correct / max(b.count("val"), 1), "peak_rss_bytes": status["VmHWM"],
            "student": {"arch": STUDENT[0], "options": STUDENT[1], "params": stats.count_params(student)}}


def _child_in_cgroup(cap: int, *child_args: str):
    """Runs this script's child with ``child_args`` in a fresh cgroup of ``cap`` bytes; returns (the finished
    process, what the cgroup saw: its cap, kind, peak usage, reclaims and OOM kills, and the return code)."""
    group = Cgroup(cap)
    try:
        proc = subprocess.run([sys.executable, __file__, "--child", *child_args], preexec_fn=group.join,
                              capture_output=True, text=True)
        return proc, {"cap_bytes": group.cap, "cgroup": group.kind, "cgroup_peak_bytes": group.peak(),
                      **group.events(), "returncode": proc.returncode}
    finally:
        group.remove()


def _killed(proc) -> bool:
    """True when the kernel killed ``proc`` (SIGKILL: out of memory under the cap)."""
    return proc.returncode in (-9, 137)


def larger_than_memory(args) -> dict:
    cap = args.cap_mb * 2**20
    spec = make_folder(Path(args.folder), args.size, int(args.ratio * cap))
    print(f"  training {args.epochs} epoch(s) on {spec['images']:,} images ({spec['bytes'] / 2**30:.2f} GiB on "
          f"disk, {spec['decoded_bytes'] / 2**30:.2f} GiB decoded) under a {cap / 2**30:.2f} GiB cgroup", flush=True)
    proc, result = _child_in_cgroup(cap, args.folder, "--epochs", str(args.epochs), "--batch", str(args.batch))
    result["folder"] = spec
    cap = result["cap_bytes"]  # as the kernel set it
    # the contrast: the same folder read into one array under the same cap
    print("  the same training split read into one array, under the same cap:", flush=True)
    copy, copied = _child_in_cgroup(cap, args.folder, "--copy")
    result["full_copy"] = {**{k: copied[k] for k in ("returncode", "reached_cap", "oom_kills")},
                           "killed_for_memory": _killed(copy), "needed_bytes": spec["decoded_bytes"]}
    sys.stdout.write(proc.stdout[-2000:])
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        result["failed"] = ("killed by the kernel (out of memory under the cap)" if _killed(proc)
                            else proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "no result")
        return result
    result.update(json.loads(lines[-1][len("RESULT "):]))
    result["folder_to_cap"] = round(spec["bytes"] / cap, 2)
    result["decoded_to_cap"] = round(spec["decoded_bytes"] / cap, 2)
    return result


# -- part 2: small data, in memory against streamed ---------------------------------------------------------
def small_in_memory_vs_streamed(n: int, rounds: int, folder: Path) -> dict:
    from PIL import Image

    from edge_kd import data

    source = data.BUILTIN["fashion_mnist"]
    with np.load(source) as f:
        x, y = f["x_train"][:n], f["y_train"][:n]
        x_test, y_test = f["x_test"][: n // 5], f["y_test"][: n // 5]
    npz = folder / "small.npz"
    pngs = folder / "small_png"
    if not (pngs / "done").is_file():
        shutil.rmtree(pngs, ignore_errors=True)
        for split, (xs, ys) in {"train": (x, y), "test": (x_test, y_test)}.items():
            for c in range(10):
                (pngs / split / f"c{c}").mkdir(parents=True, exist_ok=True)
            for i, (im, label) in enumerate(zip(xs, ys)):
                Image.fromarray(im).save(pngs / split / f"c{label}" / f"{i:05d}.png")
        (pngs / "done").write_text("")
    np.savez(npz, x_train=x, y_train=y, x_test=x_test, y_test=y_test)
    bundles = {"in memory (.npz)": data.load(str(npz), val_fraction=0.1), "streamed (PNG folder)":
               data.load(str(pngs), val_fraction=0.1)}
    assert not bundles["in memory (.npz)"].streamed and bundles["streamed (PNG folder)"].streamed
    per_round = {k: [] for k in bundles}
    for name, b in bundles.items():  # warm-up: builds each pipeline once
        next(iter(b.dataset("train", 128, shuffle=True)))
    for r in range(rounds):
        for name, b in bundles.items():
            start = time.perf_counter()
            count = sum(int(lab.shape[0]) for _, lab in b.dataset("train", 128, shuffle=True, seed=r))
            per_round[name].append(count / (time.perf_counter() - start))
    med = {k: float(np.median(v)) for k, v in per_round.items()}
    names = list(bundles)
    return {"images": int(bundles[names[0]].count("train")), "rounds": rounds,
            "images_per_second": {k: round(v, 1) for k, v in med.items()},
            "in_memory_to_streamed": round(med[names[0]] / med[names[1]], 2)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--folder", default=str(ROOT / "tflite_out" / "bench-streaming" / "images"))
    p.add_argument("--previous", help="a JSON of an earlier run to keep in the record (e.g. at another cap)")
    # 1 GiB was measured too little for the training process itself at 224 px, batch 64 (TensorFlow's runtime and
    # the batch's activations; it was killed for memory there), so the cap is 1.5 GiB and the folder 6 GiB
    p.add_argument("--cap-mb", type=int, default=1536, help="the memory cap of the training process, MiB")
    p.add_argument("--ratio", type=float, default=4.0, help="folder bytes / cap")
    p.add_argument("--size", type=int, default=224, help="image side, px")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--small", type=int, default=10_000, help="images in part 2")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds in part 2")
    p.add_argument("--quick", action="store_true", help="tiny sizes, no cgroup (the test suite's run)")
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "streaming.json"))
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--copy", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.epochs, args.batch, copy=args.copy)), flush=True)
        return 0
    record = {"command": "python benchmarks/streaming.py" + (" " + " ".join(argv) if argv else
                                                               " " + " ".join(sys.argv[1:]) if sys.argv[1:] else ""),
              "machine": stats.machine(), "date": time.strftime("%Y-%m-%d")}
    work = Path(args.folder).parent
    work.mkdir(parents=True, exist_ok=True)
    if args.quick:
        spec = make_folder(Path(args.folder), 32, 200 * 3200)
        record["larger_than_memory"] = {"quick": True, "folder": spec, **child(args.folder, 1, 32)}
        record["small"] = small_in_memory_vs_streamed(400, 1, work)
    else:
        record["larger_than_memory"] = larger_than_memory(args)
        record["small"] = small_in_memory_vs_streamed(args.small, args.rounds, work)
    if args.previous:
        record["previous"] = json.loads(Path(args.previous).read_text())
    write_json(args.json, record)
    print(json.dumps(record, indent=2))
    return 0 if "failed" not in record["larger_than_memory"] else 1


if __name__ == "__main__":
    sys.exit(main())
