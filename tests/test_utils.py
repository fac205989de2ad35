"""utils' shared helpers that are not selectors: the atomic file writer and the argument checks."""

import os

import pytest

from utils import atomic_write, check_choice


def test_atomic_write_replaces_the_file_whole_or_not_at_all(tmp_path):
    path = tmp_path / "sub" / "file.txt"
    with atomic_write(path, "w") as file:
        file.write("first")
    assert path.read_text() == "first"
    with pytest.raises(RuntimeError):
        with atomic_write(path, "w") as file:
            file.write("half of the second")
            raise RuntimeError("interrupted")
    assert path.read_text() == "first"  # the old content, untouched
    assert os.listdir(path.parent) == ["file.txt"]  # and no temporary file left behind
    with atomic_write(path) as file:
        file.write(b"\x00binary")
    assert path.read_bytes() == b"\x00binary"
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # the usual permissions


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_check_choice_names_the_argument_and_the_choices():
    assert check_choice("b", ("a", "b"), "mode") == "b"
    with pytest.raises(ValueError, match="unknown mode 'c'; choose one of a, b"):
        check_choice("c", ("a", "b"), "mode")
    with pytest.raises(ValueError, match="unknown mode 'a'"):
        atomic_write("x", "a").__enter__()
