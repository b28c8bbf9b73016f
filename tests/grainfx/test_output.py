"""grainfx.output: an output folder is written all at once, the previous one or the new one."""

from __future__ import annotations

import os
import stat

import pytest

from grainfx import output


def write_files(names: dict[str, str]):
    def write(folder):
        for name, text in names.items():
            (folder / name).write_text(text)

    return write


def test_a_new_folder_is_written_with_the_users_permissions(tmp_path):
    out = output.write_folder(tmp_path / "out", write_files({"a.txt": "new"}))
    assert (out / "a.txt").read_text() == "new"
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((out / "a.txt").stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_previous_folder_is_replaced_whole(tmp_path):
    out = tmp_path / "out"
    output.write_folder(out, write_files({"old.txt": "old", "kept.txt": "old"}))
    output.write_folder(out, write_files({"kept.txt": "new"}))
    assert sorted(p.name for p in out.iterdir()) == ["kept.txt"]
    assert (out / "kept.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_failed_write_leaves_the_previous_folder_and_no_temporary_one(tmp_path):
    out = tmp_path / "out"
    output.write_folder(out, write_files({"a.txt": "old"}))

    def fail(folder):
        (folder / "a.txt").write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        output.write_folder(out, fail)
    assert (out / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_the_temporary_folder_of_a_killed_write_goes_at_the_next_one(tmp_path):
    stale = tmp_path / ".out.abcd1234"  # what a kill -9 before the swap leaves
    stale.mkdir()
    (stale / "a.txt").write_text("half")
    unrelated = tmp_path / ".out.notes"
    unrelated.write_text("the user's")
    output.write_folder(tmp_path / "out", write_files({"a.txt": "new"}))
    assert not stale.exists() and unrelated.read_text() == "the user's"


def test_one_process_at_a_time_holds_the_lock_of_a_folder(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    with output.locked(out) as lock:
        assert lock == tmp_path / "a" / "b" / ".out.lock"
        assert lock.read_text() == f"{os.getpid()}\n"
        for spelling in (out, tmp_path / "a" / "c" / ".." / "b" / "out"):
            with pytest.raises(output.FolderLocked) as refused, output.locked(spelling):
                pass
            assert refused.value.pid == os.getpid()
        assert lock.read_text() == f"{os.getpid()}\n"
        output.write_folder(out, write_files({"a.txt": "new"}))
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]
    with output.locked(tmp_path / "x" / "y"):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"], "its folders go"


def test_the_lock_a_killed_process_left_is_taken_over(tmp_path):
    (tmp_path / ".out.lock").write_text("999999999\n")  # no lock held on it any more
    with output.locked(tmp_path / "out") as lock:
        assert lock.read_text() == f"{os.getpid()}\n"
    assert list(tmp_path.iterdir()) == []
