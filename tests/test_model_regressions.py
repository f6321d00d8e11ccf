"""Minimal reproductions of bugs found by the model-based test (test_model.py).

Each test is the smallest operation sequence that showed the bug, on both
backing filesystems. A test still marked xfail(strict=True) documents a bug
that was open when it was written; remove the mark once it is fixed.
"""

import os

import pytest


def test_open_with_o_nofollow_of_a_regular_file(workspace):
    """open(O_NOFOLLOW) of a regular file through the mount must work (find, rsync, tar use it).

    Found by test_model: the first read of a file with O_NOFOLLOW gave ELOOP,
    because the daemon passed the kernel's O_NOFOLLOW on to its open of
    /proc/self/fd/N, which is a (magic) symlink.
    """
    ws = workspace
    ws.mount()
    (ws.path / "f").write_bytes(b"hello")
    fd = os.open(ws.path / "f", os.O_RDONLY | os.O_NOFOLLOW)
    try:
        assert os.read(fd, 100) == b"hello"
    finally:
        os.close(fd)
    fd = os.open(ws.path / "f", os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
    try:
        os.write(fd, b"!")
    finally:
        os.close(fd)
    assert (ws.path / "f").read_bytes() == b"hello!"
    ws.umount()
