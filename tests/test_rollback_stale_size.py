"""Issue 8: after a rollback the kernel must not keep a stale size for a file it knows by a name
the rollback did not touch (the next append would overwrite restored data)."""

import os

import pytest


def _checkpoint(ws) -> None:
    ws.cli("checkpoint")


def _backing(ws, rel) -> os.stat_result:
    return os.stat(ws.path / rel)     # unmounted: the backing file itself


def _assert_kernel_matches_backing(ws, rel, expected: bytes) -> None:
    """stat and content through the mount equal the backing file; an append lands at the end."""
    st = os.stat(ws.path / rel)
    assert st.st_size == len(expected)
    with open(ws.path / rel, "rb") as f:
        assert f.read() == expected
    with open(ws.path / rel, "ab") as f:
        f.write(b"APPENDED")
    ws.umount()
    assert _backing(ws, rel).st_size == len(expected) + 8
    with open(ws.path / rel, "rb") as f:
        assert f.read() == expected + b"APPENDED"


@pytest.mark.parametrize("order", ["b a", "a b"])
def test_hard_link_removed_by_a_later_turn(workspace, order):
    ws, p = workspace, workspace.path
    ws.mount()
    first, more = os.urandom(4096), os.urandom(8192)
    (p / "a").write_bytes(first)
    os.link(p / "a", p / "b")
    _checkpoint(ws)                                     # turn-1: a = b, 4 KiB
    with open(p / "a", "ab") as f:
        f.write(more)
    _checkpoint(ws)                                     # turn-2: 12 KiB
    os.unlink(p / "b")
    _checkpoint(ws)                                     # turn-3: only a
    ws.cli("rollback", "1")
    for name in order.split():
        assert os.stat(p / name).st_size == 4096
    ws.cli("rollback", "3")
    _assert_kernel_matches_backing(ws, "a", first + more)


def test_link_in_a_new_directory_then_remount(workspace):
    """The ext4 variant of the issue: the kernel knows the file by a name no row records."""
    ws, p = workspace, workspace.path
    (p / "s").mkdir()
    (p / "s" / "g").write_bytes(b"hello\n")
    ws.mount()
    (p / "a").mkdir()
    os.link(p / "s" / "g", p / "a" / "f")
    with open(p / "a" / "f", "ab") as f:
        f.write(b"more\n")
    ws.umount()
    ws.mount()
    assert os.stat(p / "a" / "f").st_size == 11
    assert os.stat(p / "s" / "g").st_size == 11
    held = os.open(p / "s" / "g", os.O_RDONLY)          # known through an open file too
    try:
        ws.cli("rollback", "0")
        assert os.fstat(held).st_size == 6
        assert os.stat(p / "s" / "g").st_nlink == 1
        assert not (p / "a").exists()
    finally:
        os.close(held)
    _assert_kernel_matches_backing(ws, "s/g", b"hello\n")


def test_read_only_file_known_by_another_name(workspace):
    """The refresh truncates through the mount; a read-only file must not stop it."""
    ws, p = workspace, workspace.path
    ws.mount()
    (p / "a").write_bytes(b"x" * 100)
    os.link(p / "a", p / "b")
    _checkpoint(ws)                                     # turn-1
    with open(p / "a", "ab") as f:
        f.write(b"y" * 100)
    os.chmod(p / "a", 0o444)
    os.unlink(p / "b")
    _checkpoint(ws)                                     # turn-2: 200 bytes, read-only
    ws.cli("rollback", "1")
    os.stat(p / "b")
    os.stat(p / "a")
    ws.cli("rollback", "2")
    st = os.stat(p / "a")
    assert (st.st_size, st.st_mode & 0o777) == (200, 0o444)
    os.chmod(p / "a", 0o644)
    _assert_kernel_matches_backing(ws, "a", b"x" * 100 + b"y" * 100)
