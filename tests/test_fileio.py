"""Crash-safe writes: a folder swapped in whole (renameat2 or step-aside), and what a killed process leaves
behind removed or, for a folder caught between the two renames, put back."""
import os
import subprocess
import sys

import pytest

from edge_kd import fileio


def _tree(path):
    return {p.relative_to(path).as_posix(): p.read_text() for p in sorted(path.rglob("*")) if p.is_file()}


def _build(dest, files):
    work = fileio.staging_dir(dest)
    assert work.parent == dest.parent and work.name.startswith(f".{dest.name}.partial-{os.getpid()}-")
    for name, text in files.items():
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_text(text)
    return work


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "step-aside"])
def test_swap_replaces_a_folder_whole_and_leaves_nothing_beside_it(tmp_path, monkeypatch, exchange):
    real = fileio._exchange
    calls = []
    monkeypatch.setattr(fileio, "_exchange", lambda a, b: calls.append(1) or (real(a, b) if exchange else False))
    dest = tmp_path / "stage"
    fileio.swap_dir(_build(dest, {"a.txt": "1", "sub/b.txt": "2"}), dest)
    assert calls == []  # nothing to exchange with yet
    fileio.swap_dir(_build(dest, {"c.txt": "3"}), dest)
    assert _tree(dest) == {"c.txt": "3"} and calls == [1]
    assert [p.name for p in tmp_path.iterdir()] == ["stage"]


def test_a_failed_step_aside_puts_the_old_folder_back(tmp_path, monkeypatch):
    monkeypatch.setattr(fileio, "_exchange", lambda a, b: False)
    dest = tmp_path / "stage"
    fileio.swap_dir(_build(dest, {"old.txt": "kept"}), dest)
    work = _build(dest, {"new.txt": "lost"})
    real_replace = os.replace

    def fail_second(src, dst):
        if os.fspath(src) == os.fspath(work):
            raise OSError("disk gone")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_second)
    with pytest.raises(OSError, match="disk gone"):
        fileio.swap_dir(work, dest)
    assert _tree(dest) == {"old.txt": "kept"}


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftovers_of_a_killed_process_are_removed_or_put_back(tmp_path):
    dead, alive = _dead_pid(), os.getppid()
    (tmp_path / f".distill.partial-{dead}-abc").mkdir()                   # killed while building: removed
    (tmp_path / f".prune.partial-{alive}-abc").mkdir()                    # another run, still going: kept
    (tmp_path / f".bundle.old-{dead}-xyz").mkdir()                        # killed between the renames:
    (tmp_path / f".bundle.old-{dead}-xyz" / "manifest.json").write_text("{}")   # the last whole bundle
    (tmp_path / "qat").mkdir()
    (tmp_path / f".qat.old-{dead}-xyz").mkdir()                           # its folder is there: removed
    (tmp_path / ".hidden").mkdir()                                        # not ours: left alone
    cleaned = fileio.clean_leftovers(tmp_path)
    assert len(cleaned) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden", f".prune.partial-{alive}-abc", "bundle", "qat"]
    assert _tree(tmp_path / "bundle") == {"manifest.json": "{}"}


# -- one writer per folder -------------------------------------------------------------------------------------
def test_a_second_process_is_refused_a_held_folder_and_a_killed_holder_blocks_no_one(tmp_path):
    from tests.holder import hold

    folder = tmp_path / "run"
    holder = hold(folder)
    try:
        with pytest.raises(fileio.FolderBusy) as busy:
            with fileio.exclusive(folder, "second"):
                pass
        assert f"process {holder.pid} (python -m pipelines.compress --run-name r)" == busy.value.holder
        with fileio.exclusive(tmp_path / "other", "another folder"):  # other folders are not held
            pass
    finally:
        holder.kill()
        holder.wait()
    with fileio.exclusive(folder, "after"):  # the kernel released the killed holder's lock
        assert (folder / fileio.LOCK_NAME).read_text().startswith(f"{os.getpid()}\n")
