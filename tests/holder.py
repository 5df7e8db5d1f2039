"""A real second process that holds a folder (``edge_kd.fileio.exclusive``) until its stdin closes or it is killed."""
import subprocess
import sys

SCRIPT = """
import sys
from edge_kd import fileio
with fileio.exclusive(sys.argv[1], sys.argv[2]):
    print("holding", flush=True)
    sys.stdin.readline()
"""


def hold(folder, note="python -m pipelines.compress --run-name r") -> subprocess.Popen:
    """Returns the process once it holds ``folder`` (it says so: the moment is the test's, not a sleep's)."""
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(folder), note], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "holding"
    return proc
