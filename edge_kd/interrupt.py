"""Ctrl-C that always works: the first SIGINT stops the command within a few seconds, a second one at once.

Python turns SIGINT into a ``KeyboardInterrupt`` raised wherever the main thread happens to be. Raised
inside a finaliser or a callback that TensorFlow calls and whose errors it only reports, it is swallowed
and the command goes on. ``handling()`` (what the command-line entry points run in) makes the signal
stick three ways:

- the first SIGINT sets a flag and raises ``KeyboardInterrupt`` as usual;
- ``check()`` raises it again wherever the flag is found set: after every training batch
  (``CheckInterrupt``), between converted files and measured rounds, and before a finished stage is
  recorded, so a swallowed interrupt is honoured at the next of those points;
- a watcher thread sees every SIGINT as it arrives (through ``signal.set_wakeup_fd``, even while the
  main thread is inside a long native call): a second SIGINT, or the first one still unanswered after
  ``GRACE`` seconds, ends the process with exit status 130 and the one line ``on_forced_exit`` gives.

A forced exit leaves at worst a hidden staging folder, which the next run removes; what a stage records
is written last and atomically, so nothing half-done is ever taken for finished.
"""
from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import threading
import time

#: seconds the main thread has to act on the first Ctrl-C before the watcher ends the process
GRACE = 5.0
EXIT_STATUS = 130

_state = {"requested": 0.0, "where": None}


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a named part of the work (``where``: "stage 'distill'"), for the line that says how to resume."""

    def __init__(self, where: str, resume_at: str | None = None):
        super().__init__(where)
        self.where, self.resume_at = where, resume_at


def requested() -> bool:
    """Returns whether a Ctrl-C arrived since the last ``handling()`` began."""
    return bool(_state["requested"])


def at(where: str | None) -> None:
    """Records which part of the work runs now ("stage 'distill'"), for the line of a forced exit."""
    _state["where"] = where


def where() -> str | None:
    """Returns what ``at`` recorded last (None outside any part)."""
    return _state["where"]


def check() -> None:
    """Raises ``KeyboardInterrupt`` if a Ctrl-C arrived (and was swallowed where it was raised)."""
    if _state["requested"]:
        raise KeyboardInterrupt


def _keras_callback():
    from edge_kd.keras import keras

    class CheckInterrupt(keras.callbacks.Callback):
        """Calls ``check()`` after every training, validation and prediction batch.

        Its hooks read no logs, so they declare TensorFlow logs acceptable and Keras copies nothing to NumPy
        for them.
        """

        def __init__(self):
            super().__init__()
            self._supports_tf_logs = True

        def on_train_batch_end(self, batch, logs=None):
            check()

        def on_test_batch_end(self, batch, logs=None):
            check()

        def on_epoch_end(self, epoch, logs=None):
            check()

    return CheckInterrupt


def callback():
    """Returns a Keras callback that honours a swallowed Ctrl-C at the end of the batch it arrived in."""
    return _keras_callback()()


@contextlib.contextmanager
def handling(on_forced_exit):
    """Runs the block with Ctrl-C made reliable (module docstring); restores the previous handler after.

    ``on_forced_exit()`` returns the line printed on stderr when the watcher ends the process itself.
    ``requested()`` still tells, after the block, whether a Ctrl-C arrived in it. Outside the main thread
    (where signal handlers cannot be set) the block runs unchanged.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    os.set_blocking(write_fd, False)
    stop = threading.Event()

    def handler(signum, frame):
        if not _state["requested"]:
            _state["requested"] = time.monotonic()
            raise KeyboardInterrupt
        # a second Ctrl-C reaching Python: the watcher has seen it too and ends the process

    def force_exit():
        try:
            sys.stderr.write(on_forced_exit() + "\n")
            sys.stderr.flush()
        finally:
            os._exit(EXIT_STATUS)

    def watch():
        seen = 0
        first = None
        while not stop.is_set():
            timeout = 0.2 if first is None else max(0.0, min(0.2, first + GRACE - time.monotonic()))
            ready, _, _ = select.select([read_fd], [], [], timeout)
            if ready:
                try:
                    data = os.read(read_fd, 64)
                except BlockingIOError:
                    data = b""
                seen += sum(1 for b in data if b == signal.SIGINT)
                if seen and first is None:
                    first = time.monotonic()
            if stop.is_set():
                return
            if seen >= 2 or (first is not None and time.monotonic() - first >= GRACE):
                force_exit()

    previous = signal.signal(signal.SIGINT, handler)
    previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    watcher = threading.Thread(target=watch, name="edge-kd-ctrl-c", daemon=True)
    _state.update(requested=0.0, where=None)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()
        signal.set_wakeup_fd(previous_fd)
        signal.signal(signal.SIGINT, previous)
        os.close(read_fd)
        os.close(write_fd)
