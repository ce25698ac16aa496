"""The one atomic directory writer (``mmzoo.files.atomic_directory``) and its crash windows: a
failure inside the block, a process killed at each step, other writers' temporaries (stale or
live), concurrent first-wins builders; and the one-file writer the checkpoint tracker uses.

Checkpoints, conversion, HF export and the preprocessing cache all write through it; their own
tests show each of them is atomic end to end.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mmzoo.errors import MmzooError
from mmzoo.files import STALE_AFTER_S, atomic_directory, atomic_file, clean_stale_temporaries


def fill(directory: Path, text: str) -> None:
    """Two files, one in a subdirectory, both holding ``text``."""
    (directory / "a.txt").write_text(text)
    (directory / "sub").mkdir()
    (directory / "sub" / "b.txt").write_text(text)


def tree(directory: Path) -> dict[str, str]:
    """Every file under ``directory`` (relative name -> text)."""
    return {str(p.relative_to(directory)): p.read_text() for p in sorted(directory.rglob("*")) if p.is_file()}


def written(text: str) -> dict[str, str]:
    return {"a.txt": text, "sub/b.txt": text}


def names(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


def dead_pid() -> int:
    """The id of a process that has ended (not yet reused: ids are handed out in rising order)."""
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    assert ended.wait() == 0
    return ended.pid


@pytest.fixture
def existing(tmp_path: Path) -> Path:
    """``tmp_path/out`` holding the old copy, plus a file the new copy lacks."""
    out = tmp_path / "out"
    out.mkdir()
    fill(out, "old")
    (out / "only-old.txt").write_text("old")
    return out


OLD = {**written("old"), "only-old.txt": "old"}


def test_a_new_directory_appears_whole_under_its_name(tmp_path):
    out = tmp_path / "deeper" / "out"
    old_umask = os.umask(0o022)
    try:
        with atomic_directory(out) as tmp:
            assert tmp.parent == out.parent and tmp.name.startswith(f".out.tmp-{os.getpid()}-")
            assert names(tmp) == [] and not out.exists()
            fill(tmp, "new")
    finally:
        os.umask(old_umask)
    assert tree(out) == written("new") and names(out.parent) == ["out"]
    assert [oct(p.stat().st_mode & 0o777) for p in (out, out / "sub")] == ["0o755", "0o755"]  # as mkdir


def test_everything_is_fsynced_before_the_rename_and_the_parent_after(tmp_path, monkeypatch):
    out = tmp_path / "out"
    synced: list[tuple[str, bool]] = []  # (path fsynced, whether out existed then)
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), out.exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    with atomic_directory(out) as tmp:
        fill(tmp, "new")
    staged = {str(tmp / name) for name in ("a.txt", "sub", "sub/b.txt")} | {str(tmp)}
    assert staged <= {path for path, published in synced if not published}
    assert synced[-1] == (str(tmp_path), True)  # the rename itself, once it is done


@pytest.mark.parametrize("replace", [False, True, "first-wins"])
@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_a_failure_inside_the_block_changes_nothing(replace, error, tmp_path, existing):
    target = existing if replace else tmp_path / "new"
    with pytest.raises(error):
        with atomic_directory(target, replace=replace) as tmp:
            fill(tmp, "new")
            raise error("injected")
    assert names(tmp_path) == ["out"]  # no temporary left, and "new" never appeared
    assert tree(existing) == OLD


def test_an_existing_directory_is_not_replaced_unless_asked(tmp_path, existing):
    with pytest.raises(MmzooError, match=f"^{existing}: already exists; choose a new directory"):
        with atomic_directory(existing) as tmp:
            fill(tmp, "new")
    assert tree(existing) == OLD and names(tmp_path) == ["out"]


def test_replace_swaps_the_new_copy_in_whole(tmp_path, existing):
    with atomic_directory(existing, replace=True) as tmp:
        fill(tmp, "new")
    assert tree(existing) == written("new")  # the old copy's extra file is gone with it
    assert names(tmp_path) == ["out"]


def test_a_failed_swap_puts_the_old_copy_back(tmp_path, existing, monkeypatch):
    rename = os.rename

    def fail_into_place(src, dst):  # the new copy's rename, after the old one moved aside
        if Path(dst) == existing and ".tmp-old-" not in Path(src).name:
            raise OSError("injected")
        rename(src, dst)

    monkeypatch.setattr(os, "rename", fail_into_place)
    with pytest.raises(OSError, match="injected"):
        with atomic_directory(existing, replace=True) as tmp:
            fill(tmp, "new")
    monkeypatch.undo()
    assert tree(existing) == OLD and names(tmp_path) == ["out"]


def test_first_wins_keeps_an_existing_directory(tmp_path, existing):
    with atomic_directory(existing, replace="first-wins") as tmp:
        fill(tmp, "new")
    assert tree(existing) == OLD and names(tmp_path) == ["out"]


def test_concurrent_first_wins_builders_all_succeed_and_one_copy_stays(tmp_path):
    out = tmp_path / "out"
    staged = threading.Barrier(3)  # every builder has staged before any renames
    errors: list[BaseException] = []

    def build(text: str) -> None:
        try:
            with atomic_directory(out, replace="first-wins") as tmp:
                fill(tmp, text)
                staged.wait(timeout=30)
        except BaseException as exc:  # reported below: a thread's exception would be lost
            errors.append(exc)

    threads = [threading.Thread(target=build, args=(f"builder {i}",)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert tree(out) in [written(f"builder {i}") for i in range(3)]  # one builder's copy, whole
    assert names(tmp_path) == ["out"]  # the others' copies are discarded


# --- a writer killed (SIGKILL) at each step -------------------------------------------------------

KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
from mmzoo.files import atomic_directory

out, window = Path(sys.argv[1]), sys.argv[2]
rename = os.rename

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def rename_or_die(src, dst):
    if window == "before rename":
        die()
    rename(src, dst)
    if window == "between renames" and ".tmp-old-" in Path(dst).name:
        die()
    if window == "before the old copy is deleted" and Path(dst) == out:
        die()

os.rename = rename_or_die
with atomic_directory(out, replace=True) as tmp:
    (tmp / "a.txt").write_text("new")
    (tmp / "sub").mkdir()
    (tmp / "sub" / "b.txt").write_text("new")
    if window == "staging":
        die()
"""

# (the window, what is left in place, the temporaries left beside it: staged or old copies)
WINDOWS = [
    ("staging", OLD, ["staged"]),
    ("before rename", OLD, ["staged"]),
    ("between renames", None, ["old", "staged"]),
    ("before the old copy is deleted", written("new"), ["old"]),
]


@pytest.mark.parametrize(("window", "in_place", "left"), WINDOWS, ids=[w[0] for w in WINDOWS])
def test_a_writer_killed_at_each_step_leaves_a_whole_copy_after_clean_up(
    window, in_place, left, tmp_path, existing
):
    writer = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(existing), window], timeout=120)
    assert writer.returncode == -signal.SIGKILL
    assert (tree(existing) if existing.exists() else None) == in_place
    temporaries = [n for n in names(tmp_path) if n != "out"]
    assert all(n.startswith(".out.tmp-") for n in temporaries)
    assert sorted("old" if n.startswith(".out.tmp-old-") else "staged" for n in temporaries) == left
    clean_stale_temporaries(tmp_path, "out")  # what the next write of "out" (or a tracker read) runs
    assert names(tmp_path) == ["out"]
    assert tree(existing) == (OLD if in_place is None else in_place)  # a copy moved aside is put back


# --- other writers' temporaries -----------------------------------------------------------------

LIVE_WRITER = """
import sys
from pathlib import Path
from mmzoo.files import atomic_directory

with atomic_directory(Path(sys.argv[1]), replace=True) as tmp:
    (tmp / "a.txt").write_text("slow")
    print(tmp.name, flush=True)
    sys.stdin.readline()  # hold the temporary until told to finish
"""


def test_a_live_writers_temporary_is_left_alone(tmp_path):
    out = tmp_path / "out"
    writer = subprocess.Popen(
        [sys.executable, "-c", LIVE_WRITER, str(out)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        temporary = tmp_path / writer.stdout.readline().strip()
        assert temporary.is_dir()
        with atomic_directory(out, replace=True) as tmp:  # another writer of the same name meanwhile
            fill(tmp, "fast")
        assert temporary.is_dir() and tree(out) == written("fast")
    finally:
        writer.communicate("go\n", timeout=120)
    assert writer.returncode == 0
    assert tree(out) == {"a.txt": "slow"} and names(tmp_path) == ["out"]  # the later rename won


def test_a_write_removes_dead_writers_temporaries_of_its_own_name_only(tmp_path):
    pid, host = dead_pid(), socket.gethostname()
    mine = tmp_path / f".run[1].tmp-{pid}-0123abcd@{host}"  # glob characters in the name are literal
    other = tmp_path / f".other.tmp-{pid}-0123abcd@{host}"
    for path in (mine, other):
        path.mkdir()
    with atomic_directory(tmp_path / "run[1]") as tmp:
        fill(tmp, "new")
    assert names(tmp_path) == [other.name, "run[1]"]


def test_temporaries_whose_writer_cannot_be_asked_expire(tmp_path):
    fresh = tmp_path / ".iter_0000001.tmp-123-0123abcd@another-host"  # a live save on another host
    old = tmp_path / ".iter_0000002.tmp-456-0123abcd@another-host"
    unnamed = tmp_path / ".iter_0000003.tmp-0123abcd"  # no writer in the name
    gone = tmp_path / f".iter_0000004.tmp-{dead_pid()}-0123abcd@{socket.gethostname()}"  # this host
    file = tmp_path / f".tracker.txt.tmp-{dead_pid()}-0123abcd@{socket.gethostname()}"
    for path in (fresh, old, unnamed, gone):
        path.mkdir()
    file.write_text("1")
    long_ago = time.time() - STALE_AFTER_S - 60
    for path in (old, unnamed):
        os.utime(path, (long_ago, long_ago))
    clean_stale_temporaries(tmp_path)
    assert names(tmp_path) == [fresh.name]


# --- one file -----------------------------------------------------------------------------------


def test_atomic_file_replaces_the_content_whole_or_changes_nothing(tmp_path):
    path = tmp_path / "tracker.txt"
    for text in ("1", "2"):
        with atomic_file(path) as f:
            f.write(text)
    assert names(tmp_path) == ["tracker.txt"] and path.read_text() == "2"
    with pytest.raises(KeyboardInterrupt):
        with atomic_file(path) as f:
            f.write("3")
            raise KeyboardInterrupt
    assert names(tmp_path) == ["tracker.txt"] and path.read_text() == "2"
