"""Atomic writes: a write interrupted half-way leaves the old file or directory as it was and no
temporary behind; a finished one replaces it whole."""

import pytest

from nanoseek.io import atomic_dir, atomic_file, atomic_write_bytes, atomic_write_text


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "a.json"
    atomic_write_text(target, "old")  # creates the parent directory
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.json"]


def test_a_write_interrupted_midway_leaves_the_old_file_intact(tmp_path):
    target = tmp_path / "a.bin"
    atomic_write_bytes(target, b"old contents")
    with pytest.raises(KeyboardInterrupt):
        with atomic_file(target) as tmp:
            tmp.write_bytes(b"half of the new")
            assert tmp.parent == tmp_path and tmp != target  # a temporary beside the target
            raise KeyboardInterrupt
    assert target.read_bytes() == b"old contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]


def test_temporary_names_are_unique(tmp_path):
    with atomic_file(tmp_path / "a") as first, atomic_file(tmp_path / "a") as second:
        assert first != second
        first.write_text("1")
        second.write_text("2")
    assert (tmp_path / "a").read_text() == "1"  # the outer write finishes last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_atomic_dir_swaps_a_whole_directory(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_dir(target) as tmp:
        (tmp / "weights").write_text("v1")
        (tmp / "nested").mkdir()
        (tmp / "nested" / "state").write_text("s1")
        assert not target.exists()  # nothing visible until the block ends
    with atomic_dir(target) as tmp:
        (tmp / "weights").write_text("v2")
    assert sorted(p.name for p in target.iterdir()) == ["weights"]  # old contents gone
    assert (target / "weights").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_an_interrupted_directory_write_keeps_the_old_one_and_later_writes_clean_up(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_dir(target) as tmp:
        (tmp / "weights").write_text("v1")
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(target) as tmp:
            (tmp / "weights").write_text("half")
            raise KeyboardInterrupt
    assert (target / "weights").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    (tmp_path / ".ckpt.x1y2.tmp").mkdir()  # what a writer killed mid-way (SIGKILL) leaves
    with atomic_dir(target) as tmp:
        (tmp / "weights").write_text("v2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
