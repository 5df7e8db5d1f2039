"""Past one machine: ``training.strategy: multi_worker`` runs the stages that train as one
``tf.distribute.MultiWorkerMirroredStrategy`` job over the workers that TF_CONFIG names.

The same command runs on every worker. ``connect`` reads TF_CONFIG and makes the process's strategy before
TensorFlow runs anything (collective ops can only be set up then), waiting up to ``training.worker_timeout``
seconds for every worker to start. The chief (TF_CONFIG's ``chief`` task, else worker 0) alone writes the run
folder; every other worker works in a scratch folder of its own (``scratch``), removed when it ends, and writes
nothing under ``--out``.

Two channels join the workers:

- the training steps' all-reduce, and the reads of batch statistics when a model is saved, go through the
  strategy's collective ops. Every worker runs the same training code in the same order, so their collectives
  pair up; a stage that does not train (export, benchmark, bundle, report) runs on the chief alone, outside the
  strategy.
- what the workers tell one another goes through TensorFlow's coordination service, which the chief hosts: a
  key-value store and barriers. Before training every worker publishes what it runs (``agree``: hashes of the
  recipe, the data and the code, and its devices) or the error its checks met, and each refuses, with the same
  line, when any differs or failed. For each stage that trains, the chief (the one that has the run folder, its
  manifests and saved epochs) publishes whether it is finished and its fingerprint (``decide``), and sends the
  files the others lack: the results of earlier stages it skipped that the stage reads, and the epochs saved of
  the stage itself, so every worker skips, resumes and trains alike (``follow``). After the last stage that
  trains, the chief lets the others end (``release``).

A worker that dies is noticed within seconds (the coordination service's heartbeats, a closed connection), one
that stops answering after ``training.worker_timeout`` (the collectives' and barriers' timeout); either fails the
others' next step, and ``lost`` makes that error one line: which worker, during what, and that the same commands
started again resume after the last finished epoch.
"""
from __future__ import annotations

import base64
import contextlib
import dataclasses
import io
import json
import os
import re
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

from edge_kd.errors import UserError, first_line

#: the exit status of a job that lost a worker: a temporary failure (EX_TEMPFAIL), the same commands resume it
EXIT_LOST = 75
#: the prefix of every key and barrier this module uses in the coordination service
PREFIX = "edge-kd/"
#: the most bytes of files one key of the coordination service carries
CHUNK = 32 * 2**20
JOBS = ("chief", "worker")
#: what ``agree`` compares, as its message names it
PARTS = {"recipe": "recipe", "data": "data", "code": "code (edge-kd's source, TensorFlow and tf_keras versions)",
         "devices": "devices (and the 16-bit type mixed_precision: true takes on them)"}


class WorkerLost(UserError):
    """A worker of the job died or stopped answering: one line saying which, and how to resume."""

    exit_code = EXIT_LOST


@dataclasses.dataclass
class Cluster:
    """This process's place in a multi-worker job, and its strategy."""

    strategy: object
    #: this worker's index: TensorFlow's id in the cluster (the chief is 0)
    index: int
    #: (job, task index, address) of every worker, by index
    tasks: list
    #: training.worker_timeout, in seconds
    timeout: float
    #: the runs this process began in the job (``agree`` counts them): each run's keys and barriers are its own
    round: int = 0

    @property
    def count(self) -> int:
        return len(self.tasks)

    @property
    def is_chief(self) -> bool:
        return self.index == 0

    @property
    def replicas(self) -> int:
        return int(self.strategy.num_replicas_in_sync)

    def name(self, index: int | None = None) -> str:
        """Returns how a worker is named in messages: ``worker 1 (10.0.0.2:12345)``."""
        index = self.index if index is None else index
        return f"worker {index} ({self.tasks[index][2]})"

    # -- what the workers tell one another -----------------------------------------------------------------------
    def agree(self, keys: dict | None, problem: str | None = None) -> None:
        """Publishes what this worker runs (``keys``: a hash per part) or the ``problem`` its checks met, and waits for
        every worker's; raises a UserError, the same line on every worker, when another worker met a problem or
        runs something else than the chief. A worker with a problem of its own returns, to raise it itself."""
        self.round += 1
        every = self._exchange("agree", {"error": problem} if problem else keys)
        if problem:
            return
        failed = [(i, v["error"]) for i, v in enumerate(every) if "error" in v]
        if failed:
            i, error = failed[0]
            raise UserError(f"{self.name(i)} stopped before training: {error}")
        chief = every[0]
        differ = [(i, [k for k in chief if v.get(k) != chief[k]]) for i, v in enumerate(every) if i]
        differ = [(i, parts) for i, parts in differ if parts]
        if differ:
            said = "; ".join(f"{self.name(i)} differs from the chief, {self.name(0)}, in its "
                             f"{' and '.join(PARTS.get(k, k) for k in parts)}" for i, parts in differ)
            raise UserError(f"{said}: every worker runs the same command on the same data (or an identical copy) with "
                            f"the same edge-kd and TensorFlow, on devices of the same kinds and number; nothing was "
                            f"trained")

    def decide(self, stage: str, fingerprint: str, finished: bool, files: dict) -> None:
        """The chief: publishes whether stage ``stage`` is ``finished`` (skipped) and its ``fingerprint``, and sends
        ``files`` ({path in the run folder: file}) to the other workers; returns once they have them."""
        payload = _pack(files) if files else b""
        chunks = [payload[i:i + CHUNK] for i in range(0, len(payload), CHUNK)]
        kv = _context()
        with self.talking(f"stage '{stage}'"):
            for k, chunk in enumerate(chunks):
                kv.set_config_key_value(self._key(f"files/{stage}/{k}"), base64.b64encode(chunk).decode("ascii"))
            kv.set_config_key_value(self._key(f"stage/{stage}"), json.dumps(
                {"finished": finished, "fingerprint": fingerprint, "chunks": len(chunks)}))
            if chunks:
                kv.wait_at_barrier(self._key(f"files/{stage}"), self._ms())
                for k in range(len(chunks)):
                    kv.delete_config_key_value(self._key(f"files/{stage}/{k}"))

    def follow(self, stage: str, folder: Path) -> tuple[str, bool]:
        """A worker other than the chief: returns (fingerprint, finished) of stage ``stage`` as the chief decided,
        with the files the chief sent written into ``folder`` (its scratch run folder)."""
        kv = _context()
        with self.talking(f"stage '{stage}'"):
            said = json.loads(kv.get_config_key_value(self._key(f"stage/{stage}"), self._ms()))
            if said["chunks"]:
                parts = [kv.get_config_key_value(self._key(f"files/{stage}/{k}"), self._ms())
                         for k in range(said["chunks"])]
                payload = b"".join(base64.b64decode(part) for part in parts)
                _unpack(payload, Path(folder))
                kv.wait_at_barrier(self._key(f"files/{stage}"), self._ms())
        return said["fingerprint"], bool(said["finished"])

    def release(self) -> None:
        """After the last stage that trains: the chief lets the other workers end (once its last collective step is
        done, which a worker gone sooner could leave unanswered); the others wait for that word."""
        kv = _context()
        with self.talking("the end of training"):
            if self.is_chief:
                kv.set_config_key_value(self._key("released"), "1")
            else:
                kv.get_config_key_value(self._key("released"), self._ms())

    def _exchange(self, topic: str, value: dict) -> list[dict]:
        """Publishes this worker's ``value`` under ``topic``; returns every worker's, by index, once all have."""
        kv = _context()
        with self.talking("the checks before training"):
            kv.set_config_key_value(self._key(f"{topic}/{self.index}"), json.dumps(value))
            kv.wait_at_barrier(self._key(topic), self._ms())
            return [json.loads(kv.get_config_key_value(self._key(f"{topic}/{i}"), self._ms()))
                    for i in range(self.count)]

    def _key(self, name: str) -> str:
        return f"{PREFIX}{self.round}/{name}"

    def _ms(self) -> int:
        return int(self.timeout * 1000)

    # -- a worker lost ---------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def talking(self, during: str, resume: str | None = None):
        """Turns the error of a worker lost while the block runs into ``WorkerLost`` (``lost``)."""
        try:
            yield
        except Exception as e:
            if not is_lost(e):
                raise
            raise self.lost(e, during, resume) from None

    def lost(self, error: BaseException, during: str, resume: str | None = None) -> WorkerLost:
        """Returns the one-line ``WorkerLost`` of a TensorFlow ``error`` that says a worker is gone, met ``during``
        ("stage 'distill'"); ``resume`` says where the same commands started again resume."""
        from edge_kd.keras import tf

        who = self._culprit(str(error))
        if isinstance(error, tf.errors.DeadlineExceededError):
            why = f"did not answer within {self.timeout:g} s (training.worker_timeout)"
        else:
            why = "stopped or cannot be reached (see its own output)"
        again = resume or "start the same command on every worker again"
        return WorkerLost(f"{who} {why} during {during}; {again}")

    def _culprit(self, text: str) -> str:
        """Returns which worker a TensorFlow error names as gone (the unhealthy task, else the remote target; in a job
        of two, the other one), or "another worker" when it names none but this one."""
        where = text.split("unhealthy", 1)[1] if "unhealthy" in text else text
        for job, task in re.findall(r"/job:(\w+)/(?:replica:\d+/)?task:(\d+)", where):
            found = [i for i, (j, t, _) in enumerate(self.tasks) if j == job and t == int(task)]
            if found and found[0] != self.index:
                return self.name(found[0])
        return self.name(1 - self.index) if self.count == 2 else "another worker"


def is_lost(error: BaseException) -> bool:
    """Returns whether a TensorFlow ``error`` is what a worker gone leaves its peers: a collective or the
    coordination service cut off, aborted or timed out."""
    from edge_kd.keras import tf

    if isinstance(error, (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.AbortedError,
                          tf.errors.CancelledError)):
        return True
    return isinstance(error, tf.errors.OpError) and "Collective ops is aborted" in str(error)


# -- joining the job ---------------------------------------------------------------------------------------------
_joined: Cluster | None = None


def connect(training, prog: str = "edge-kd") -> Cluster | None:
    """Returns this process's place in the multi-worker job of ``training`` (a recipe's ``training`` section), joined
    once per process, or None unless its ``strategy`` is ``multi_worker``; ``prog`` begins the lines it ends the
    process with.

    Joining makes the ``MultiWorkerMirroredStrategy``, with collectives that give up after ``worker_timeout``
    seconds; it must come before TensorFlow runs anything in the process. It waits for every worker to start, up to
    ``worker_timeout`` seconds; after that, or at Ctrl-C, a watchdog ends the process with one line (the wait is
    inside TensorFlow, which holds Python's lock meanwhile).
    """
    global _joined
    if training.strategy != "multi_worker":
        return None
    if _joined is not None:
        return _joined
    tasks, index = read_tf_config()
    from tensorflow.python.eager import context

    from edge_kd.keras import tf

    if context.context()._context_handle is not None:
        raise UserError("training.strategy: multi_worker: TensorFlow has already run in this process, and a "
                        "multi-worker job must be joined before it does; run python -m pipelines.compress, or call "
                        "pipelines.multiworker.connect(recipe.training) first thing in your program")
    timeout = float(training.worker_timeout)
    here = f"worker {index} of {len(tasks)} ({tasks[index][2]})"
    print(f"{here}: waiting up to {timeout:g} s for every worker of TF_CONFIG to start ...", flush=True)
    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=timeout)
    with _watchdog(timeout, f"{prog}: error: {here}: not every worker of TF_CONFIG started within {timeout:g} s "
                            f"(training.worker_timeout): start the same command on each of "
                            f"{', '.join(t[2] for t in tasks)}",
                   f"{prog}: interrupted while {here} waited for the other workers; nothing was trained"):
        try:
            strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
        except RuntimeError as e:  # TensorFlow ran before, where this module could not see it
            raise UserError(f"training.strategy: multi_worker: {first_line(e)}; the job must be joined before "
                            f"TensorFlow runs anything in the process") from None
        except tf.errors.OpError as e:  # its address in use, or not this host's
            raise UserError(f"{here}: cannot join the job: {first_line(e)} (is {tasks[index][2]} this host's, and "
                            f"free?)") from None
    _joined = Cluster(strategy, index, tasks, timeout)
    chief = ("the chief, writes the run folder" if _joined.is_chief
             else f"writes nothing: {_joined.name(0)} is the chief")
    print(f"{here}: every worker started; {_joined.replicas} replicas in all; this worker {chief}", flush=True)
    return _joined


def read_tf_config(text: str | None = None) -> tuple[list, int]:
    """Returns ((job, task index, address) of every worker in TensorFlow's order: the chief first, then the workers;
    this worker's place in that list), read from TF_CONFIG (or ``text``); a missing or malformed one is a UserError."""
    text = os.environ.get("TF_CONFIG", "") if text is None else text
    example = ('e.g. TF_CONFIG=\'{"cluster": {"worker": ["host-a:12345", "host-b:12345"]}, '
               '"task": {"type": "worker", "index": 0}}\' (docs/distribution.md)')
    if not text.strip():
        raise UserError(f"training.strategy: multi_worker needs TF_CONFIG, naming every worker and this one's place, "
                        f"{example}")
    try:
        cfg = json.loads(text)
    except ValueError as e:
        raise UserError(f"TF_CONFIG is not JSON ({first_line(e)}); {example}") from None
    cluster = cfg.get("cluster") if isinstance(cfg, dict) else None
    task = cfg.get("task") if isinstance(cfg, dict) else None
    if not isinstance(cluster, dict) or not isinstance(task, dict):
        raise UserError(f"TF_CONFIG needs \"cluster\" and \"task\" objects; {example}")
    other = sorted(set(cluster) - set(JOBS))
    if other:
        raise UserError(f"TF_CONFIG's cluster has {', '.join(other)} tasks; a multi-worker job has only worker tasks "
                        f"(and at most one chief)")
    for job in JOBS:
        hosts = cluster.get(job, [])
        if not isinstance(hosts, list) or not all(isinstance(h, str) and re.fullmatch(r"\S+:\d+", h) for h in hosts):
            raise UserError(f"TF_CONFIG's cluster.{job} must be a list of \"host:port\" strings, got {hosts!r}")
    if len(cluster.get("chief", [])) > 1:
        raise UserError(f"TF_CONFIG's cluster.chief names {len(cluster['chief'])} tasks; a job has at most one chief")
    tasks = [(job, i, h) for job in JOBS for i, h in enumerate(cluster.get(job, []))]
    if not tasks:
        raise UserError(f"TF_CONFIG's cluster names no worker; {example}")
    if len({h for _, _, h in tasks}) < len(tasks):
        raise UserError("TF_CONFIG's cluster names an address twice; each worker needs its own host:port")
    kind, number = task.get("type"), task.get("index", 0)
    if kind not in JOBS or isinstance(number, bool) or not isinstance(number, int):
        raise UserError(f"TF_CONFIG's task must be {{\"type\": \"worker\" (or \"chief\"), \"index\": i}}, got "
                        f"{json.dumps(task)}")
    place = [i for i, (job, k, _) in enumerate(tasks) if job == kind and k == number]
    if not place:
        raise UserError(f"TF_CONFIG's task is {kind} {number}, but its cluster has {len(cluster.get(kind, []))} "
                        f"{kind} task(s)")
    return tasks, place[0]


def loopback_job(n: int) -> list[str]:
    """Returns TF_CONFIG for each of ``n`` workers of a job on this machine, on ports of 127.0.0.1 free now (another
    program may still take one before the worker listens on it): a job to try on one host, as the tests and
    ``benchmarks/multiworker.py`` do."""
    import socket

    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        hosts = [f"127.0.0.1:{s.getsockname()[1]}" for s in socks]
    finally:
        for s in socks:
            s.close()
    return [json.dumps({"cluster": {"worker": hosts}, "task": {"type": "worker", "index": i}}) for i in range(n)]


#: the watchdog of the wait for the workers: TensorFlow waits holding Python's lock, so no thread of this process can
#: run meanwhile (not even Ctrl-C's): a small process of its own ends this one, with one line, after the timeout or at
#: Ctrl-C; it ends quietly when its stdin closes (the wait is over, or this process ended)
_WATCHDOG = """
import os, select, signal, sys
parent, seconds, late, stopped = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3], sys.argv[4]
try:
    ready, _, _ = select.select([sys.stdin], [], [], seconds)
    line = None if ready else late
except KeyboardInterrupt:
    line = stopped
if line:
    sys.stderr.write(line + "\\n")
    sys.stderr.flush()
    try:
        os.kill(parent, signal.SIGKILL)
    except ProcessLookupError:
        pass
"""


@contextlib.contextmanager
def _watchdog(seconds: float, late: str, stopped: str):
    """Ends this process with the line ``late`` on stderr if the block still runs after ``seconds``, or with ``stopped``
    at Ctrl-C (a SIGINT to the terminal's process group), while the block runs."""
    import subprocess

    try:
        err = sys.stderr.fileno()  # where this command's own lines go (TensorFlow's log may have fd 2)
    except (AttributeError, OSError, ValueError):
        err = None
    dog = subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(seconds), late, stopped],
                           stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err)
    try:
        yield
    finally:
        dog.stdin.close()
        dog.wait()


@contextlib.contextmanager
def scratch(index: int):
    """Yields a new scratch folder for worker ``index``'s copy of the run, removed when the block ends; first removes
    the scratch folders that workers killed earlier left (their process is gone)."""
    from edge_kd.fileio import _alive

    root = Path(tempfile.gettempdir())
    for old in root.glob("edge-kd-worker*-*"):
        m = re.fullmatch(r"edge-kd-worker\d+-(\d+)-.*", old.name)
        if m and old.is_dir() and old.stat().st_uid == os.getuid() and not _alive(int(m[1])):
            shutil.rmtree(old, ignore_errors=True)
    folder = Path(tempfile.mkdtemp(prefix=f"edge-kd-worker{index}-{os.getpid()}-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _context():
    from tensorflow.python.eager import context

    return context.context()


def _pack(files: dict) -> bytes:
    """Returns a tar of ``files`` ({name in the archive: file})."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, path in sorted(files.items()):
            tar.add(str(path), arcname=name, recursive=False)
    return buf.getvalue()


def _unpack(payload: bytes, folder: Path) -> None:
    """Writes the files of tar ``payload`` under ``folder`` (replacing what is there; nothing outside it)."""
    with tarfile.open(fileobj=io.BytesIO(payload), mode="r") as tar:
        tar.extractall(folder, filter="data")
