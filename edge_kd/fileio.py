"""Atomic writes: an artefact is either absent or complete, never half-written; and one writer per folder.

Files are written beside their destination and renamed onto it (``atomic_path``). A folder is built in
``staging_dir(dest)`` and swapped onto ``dest`` by ``swap_dir``; ``clean_leftovers`` removes (or puts
back) whatever a process killed in the middle of either left behind. ``exclusive(folder)`` holds a
folder for one process at a time (a run folder, a search folder).
"""
import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path beside ``path``; renames it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part" + "".join(path.suffixes[-1:]), dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes 0600; results are ordinary files
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def umask() -> int:
    """Returns the process's file-creation mask (read without changing it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sha256_file(path) -> str:
    """Returns the hex sha256 of the file at ``path``."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_bytes(path, data: bytes) -> Path:
    """Writes ``data`` to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path, text: str) -> Path:
    """Writes ``text`` to ``path`` atomically; returns the path."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path, obj) -> Path:
    """Writes ``obj`` as indented JSON to ``path`` atomically; returns the path."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


# -- folders ------------------------------------------------------------------------------------------------
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old)-(?P<pid>\d+)-[A-Za-z0-9_]+$")


def staging_dir(dest) -> Path:
    """Returns a new empty hidden folder beside ``dest`` (``.<name>.partial-<pid>-<random>``) to build it in."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-{os.getpid()}-", dir=dest.parent))


def swap_dir(work, dest) -> Path:
    """Puts folder ``work`` in the place of ``dest`` (replacing an existing folder); returns ``dest``.

    On Linux the two are exchanged in one atomic rename (renameat2 RENAME_EXCHANGE), then the old
    folder is deleted. Elsewhere the old folder steps aside to ``.<name>.old-<pid>-<random>`` first and
    comes back if ``work`` cannot take its place; a kill between the two renames leaves ``dest``
    absent and the old folder aside, which ``clean_leftovers`` puts back.
    """
    work, dest = Path(work), Path(dest)
    if dest.exists() and not dest.is_dir():
        raise NotADirectoryError(f"{dest} exists and is not a folder")
    if dest.exists() and _exchange(work, dest):
        shutil.rmtree(work, ignore_errors=True)  # work now holds the old folder
        return dest
    old = None
    if dest.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-{os.getpid()}-", dir=dest.parent))
        old.rmdir()
        os.replace(dest, old)
    try:
        os.replace(work, dest)
    except BaseException:
        if old is not None:
            os.replace(old, dest)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return dest


def clean_leftovers(parent) -> list[Path]:
    """Removes the staging folders of dead processes under ``parent``; puts back a swapped-out folder.

    A ``.<name>.old-*`` folder whose ``<name>`` is missing is the last complete version of it (its
    process died between the two renames of ``swap_dir``): it is renamed back. Folders of processes
    still running (other than this one) are left alone. Returns the paths removed or restored.
    """
    parent, done = Path(parent), []
    if not parent.is_dir():
        return done
    for p in sorted(parent.iterdir()):
        m = _LEFTOVER.match(p.name)
        if not m or not p.is_dir():
            continue
        pid = int(m["pid"])
        if pid != os.getpid() and _alive(pid):
            continue
        target = parent / m["name"]
        if m["kind"] == "old" and not target.exists():
            os.replace(p, target)
        else:
            shutil.rmtree(p, ignore_errors=True)
        done.append(p)
    return done


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _exchange(a: Path, b: Path) -> bool:
    """Swaps two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); returns False where unsupported."""
    if sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


# -- one writer per folder ------------------------------------------------------------------------------------
LOCK_NAME = ".lock"


class FolderBusy(Exception):
    """Another process holds the folder ``exclusive`` was asked for."""

    def __init__(self, folder: Path, holder: str):
        super().__init__(f"{folder} is in use by {holder}")
        self.folder, self.holder = folder, holder


@contextlib.contextmanager
def exclusive(folder, note: str = ""):
    """Holds ``folder`` (created if missing) for this process alone while the block runs.

    The hold is an ``flock`` on ``folder/.lock``, which the kernel releases when the process ends, however it
    ends, so a killed holder never blocks the next. The file names the holder (its pid and ``note``, e.g. the
    command); a folder another process holds raises ``FolderBusy`` at once, naming it. Yields whether this
    call created the folder (and so may remove it if what it was for fails before writing anything).
    """
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise FolderBusy(folder, _holder(path)) from None
        try:  # the file may have been removed (with its folder) by the holder we waited behind: lock the new one
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
        folder.mkdir(parents=True, exist_ok=True)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n{' '.join(note.split())[:200]}\n".encode())
        yield created
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race with the next locker)


def _holder(path: Path) -> str:
    """Returns who holds the lock at ``path``, as its file says: "process 1234 (python -m ...)"."""
    try:
        pid, _, note = path.read_text().partition("\n")
    except OSError:
        return "another process"
    pid, note = pid.strip(), note.strip()
    if not pid.isdigit():
        return "another process"
    return f"process {pid}" + (f" ({note[:120]})" if note else "")
