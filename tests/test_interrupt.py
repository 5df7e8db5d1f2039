"""Ctrl-C always works: a swallowed one is honoured at the next check, a second one (or a first one left unanswered)
ends the process at once with exit 130 and the one line that says how to resume. The children here import no
TensorFlow: they run ``pipelines.compress.run_command`` around work that swallows every KeyboardInterrupt, the way a
callback that TensorFlow calls and whose errors it only reports does."""
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_kd import interrupt

ROOT = Path(__file__).resolve().parents[1]

SWALLOWER = """
import sys, time
from edge_kd import interrupt
from pipelines.compress import run_command
interrupt.GRACE = float(sys.argv[1])

def body(native_log):
    interrupt.at("stage 'distill'")
    swallow(first=True)

def swallow(first=False):  # work that swallows every Ctrl-C, and never checks
    try:
        if first:
            print("ready", flush=True)  # inside the try: the test's signal cannot land outside it
        while True:
            time.sleep(0.05)
    except KeyboardInterrupt:
        print("swallowed", flush=True)
        swallow()  # a later Ctrl-C raises nothing (edge_kd.interrupt): the watcher answers it

sys.exit(run_command("prog", body, False, kept="finished stages and epochs"))
"""
LINE = "prog: interrupted during stage 'distill'; finished stages and epochs are kept: rerun the same command to resume"


def _start(grace):
    proc = subprocess.Popen([sys.executable, "-c", SWALLOWER, str(grace)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"  # the point the signal is sent at: the work is running
    return proc


def test_a_swallowed_ctrl_c_still_ends_the_command_after_the_grace_period():
    proc = _start(grace=0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert err.strip().splitlines() == [LINE]


def test_a_second_ctrl_c_ends_the_command_at_once():
    proc = _start(grace=3600)  # only the second signal can end it before the test's timeout
    proc.send_signal(signal.SIGINT)
    assert proc.stdout.readline().strip() == "swallowed"  # the first arrived (signals sent together may merge)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert err.strip().splitlines() == [LINE]


def test_check_raises_only_after_a_ctrl_c_and_the_handler_is_restored():
    import os

    before = signal.getsignal(signal.SIGINT)
    with interrupt.handling(lambda: "x"):
        interrupt.check()  # nothing arrived: no error
        try:
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(100):  # the handler runs at the next bytecode
                time.sleep(0.001)
        except KeyboardInterrupt:
            pass  # swallowed, as a finaliser would
        assert interrupt.requested()
        with pytest.raises(KeyboardInterrupt):
            interrupt.check()
    assert signal.getsignal(signal.SIGINT) is before
    assert interrupt.requested()  # still readable after the block: the command exits 130
