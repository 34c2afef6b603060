"""The one confinement module (puller.runtime.confine), by itself: the
kernel's RESOLVE_IN_ROOT and the portable walk agree, and the two defences
found while merging the two walks hold."""

from __future__ import annotations

import errno
import os

import pytest

from puller.runtime import confine


@pytest.fixture
def root(tmp_path):
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "file").write_bytes(b"inside")
    os.symlink("../../../../dir", tmp_path / "dir" / "up")          # climbs past the root: lands on /dir inside it
    fd = os.open(tmp_path, confine.DIR_FLAGS)
    yield fd
    os.close(fd)


@pytest.mark.parametrize("portable", [False, True], ids=["openat2", "portable-walk"])
@pytest.mark.parametrize("name", ["dir/file/", "dir/file/.", "dir/file/./"])
def test_a_file_named_as_a_directory_is_not_opened(root, portable, name):
    """"file/" names a directory: the kernel answers ENOTDIR, and so must the
    walk (it used to open the file)."""
    with pytest.raises(NotADirectoryError):
        os.close(confine.open_in_root(root, name, os.O_RDONLY | os.O_CLOEXEC, portable=portable))


def test_openat2_racing_a_rename_is_retried(root, monkeypatch):
    """openat2 answers EAGAIN when a rename anywhere on the host races a ".."
    of the lookup: that is a retry, never an unpack failure."""
    real, calls = confine._openat2, []

    def flaky(dirfd, path, flags):
        calls.append(path)
        if len(calls) <= 2:
            raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable", path)
        return real(dirfd, path, flags)

    monkeypatch.setattr(confine, "openat2_available", lambda: True)
    monkeypatch.setattr(confine, "_openat2", flaky)
    fd = confine.open_in_root(root, "dir/up/file", os.O_RDONLY | os.O_CLOEXEC)
    try:
        assert os.pread(fd, 100, 0) == b"inside"
    finally:
        os.close(fd)
    assert len(calls) == 3


def test_openat2_racing_forever_falls_back_to_the_walk(root, monkeypatch):
    def always_racing(dirfd, path, flags):
        raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable", path)

    monkeypatch.setattr(confine, "openat2_available", lambda: True)
    monkeypatch.setattr(confine, "_openat2", always_racing)
    fd = confine.open_in_root(root, "dir/up/file", os.O_RDONLY | os.O_CLOEXEC)
    try:
        assert os.pread(fd, 100, 0) == b"inside"     # "up" stopped at the root, never above it
    finally:
        os.close(fd)
