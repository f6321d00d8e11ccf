"""Issue 8: after a rollback no inode the kernel still knows may keep a size, mtime, mode or link
count that differs from the backing object, whichever names it was looked up through, whichever of
them the rollback removed or added, and whether it is open, mapped or only cached (the next append
would otherwise land at the stale size, over restored data).

Each test compares what the mount shows (stat and content) with the backing file itself, reached
through ``ws.backing`` (a descriptor of the directory underneath the mount, see conftest), with the
kernel's caches warm, again after forcing the kernel to drop them (``drop_caches``), and after a
remount; then appends through the mount and checks the append landed at the end.
"""

import mmap
import os
import stat

import pytest

from conftest import drop_kernel_caches

MARK = b"APPENDED"


def _checkpoint(ws) -> None:
    ws.cli("checkpoint")


def _read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _view(st: os.stat_result) -> dict:
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "nlink": st.st_nlink,
            "mode": oct(st.st_mode), "ino": st.st_ino}


def assert_same_as_backing(ws, rel, expected: bytes, nlink: int, when: str) -> None:
    """The mount's stat and content of *rel* are the backing file's, and the content is *expected*."""
    mounted, backing = ws.path / rel, ws.backing / rel
    want = _view(os.stat(backing))
    assert _view(os.stat(mounted)) == want, f"{rel} ({when}): the mount differs from the backing file"
    assert want["size"] == len(expected) and want["nlink"] == nlink, f"{rel} ({when}): backing {want}"
    assert _read(backing) == expected, f"{rel} ({when}): backing content"
    assert _read(mounted) == expected, f"{rel} ({when}): content through the mount"


def assert_kernel_matches_backing(ws, files: dict, order=None) -> None:
    """*files*: {relative path: (expected content, expected st_nlink)}.

    Warm (as the rollback left the kernel's caches), cold (drop_caches) and after a remount; the
    lookups go in *order* (default: as given). Then an append through each first name must land
    at the end, through the mount and in the backing file.
    """
    order = list(order or files)
    for when in ("warm", "cold"):
        if when == "cold":
            drop_kernel_caches()
        for rel in order:
            assert_same_as_backing(ws, rel, *files[rel], when)
    first_names = {}        # backing inode -> the first name of it in *files*
    for rel in files:
        first_names.setdefault(os.stat(ws.backing / rel).st_ino, rel)
    for rel in first_names.values():
        with open(ws.path / rel, "ab") as f:
            f.write(MARK)
    after = {rel: (content + MARK, nlink) for rel, (content, nlink) in files.items()}
    for rel in order:
        assert_same_as_backing(ws, rel, *after[rel], "after the append")
    ws.umount()
    ws.mount()
    for rel in order:
        assert_same_as_backing(ws, rel, *after[rel], "after a remount")
    ws.umount()


def _append(path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def _linked(ws, size: int) -> bytes:
    """Mount; turn-1: a and b are one file of *size* random bytes, returned."""
    ws.mount()
    first = os.urandom(size)
    (ws.path / "a").write_bytes(first)
    os.link(ws.path / "a", ws.path / "b")
    _checkpoint(ws)
    return first


def _linked_then_grown(ws) -> tuple[bytes, bytes]:
    """turn-1: a and b are one 4 KiB file; turn-2: 8 KiB more. Returns both parts."""
    first, more = _linked(ws, 4096), os.urandom(8192)
    _append(ws.path / "a", more)
    _checkpoint(ws)
    return first, more


@pytest.mark.parametrize("order", ["b a", "a b"])
def test_hard_link_removed_by_a_later_turn(workspace, order):
    ws, p = workspace, workspace.path
    first, more = _linked_then_grown(ws)                # turn-1: a = b, 4 KiB; turn-2: 12 KiB
    os.unlink(p / "b")
    _checkpoint(ws)                                     # turn-3: only a
    ws.cli("rollback", "1")
    for name in order.split():
        assert os.stat(p / name).st_size == 4096
    whole = first + more
    ws.cli("rollback", "3")
    assert not (p / "b").exists()
    assert_kernel_matches_backing(ws, {"a": (whole, 1)})


@pytest.mark.parametrize("order", ["b a", "a b"])
def test_hard_link_added_by_the_rollback(workspace, order):
    """The rollback brings a removed name back: the file's link count and size, as the kernel
    knows it through the name that stayed, must follow."""
    ws, p = workspace, workspace.path
    first = _linked(ws, 5000)                           # turn-1: a = b
    os.unlink(p / "b")
    _append(p / "a", os.urandom(3000))
    _checkpoint(ws)                                     # turn-2: a alone, 8000 bytes
    assert os.stat(p / "a").st_nlink == 1
    ws.cli("rollback", "1")
    assert_kernel_matches_backing(ws, {"a": (first, 2), "b": (first, 2)}, order.split())


def test_hard_link_removed_by_the_rollback(workspace):
    ws, p = workspace, workspace.path
    first = os.urandom(3000)
    (p / "a").write_bytes(first)
    ws.mount()                                          # turn-0: a alone
    os.link(p / "a", p / "b")
    _append(p / "b", os.urandom(9000))
    assert os.stat(p / "b").st_nlink == 2
    ws.cli("rollback", "0")
    assert not (p / "b").exists()
    assert_kernel_matches_backing(ws, {"a": (first, 1)})


@pytest.mark.parametrize("how", ["read", "write"])
def test_file_mmapped_across_the_rollback(workspace, how):
    """A shared mapping of a file the rollback restores in place shows the restored pages, and
    the kernel's size of it is the restored one (the mapping keeps the inode known)."""
    ws, p = workspace, workspace.path
    first = _linked(ws, 8192)                           # turn-1: a = b
    with open(p / "a", "r+b") as f:
        f.write(b"X" * 4096)                            # in place: the same inode, new pages
        f.write(os.urandom(8192))                       # and longer
    os.unlink(p / "b")
    _checkpoint(ws)                                     # turn-2
    fd = os.open(p / "a", os.O_RDWR if how == "write" else os.O_RDONLY)
    try:
        m = mmap.mmap(fd, 8192, mmap.MAP_SHARED,
                      mmap.PROT_READ | (mmap.PROT_WRITE if how == "write" else 0))
        try:
            assert m[:4096] == b"X" * 4096
            ws.cli("rollback", "1")
            assert m[:] == first, "the mapping shows pages from before the rollback"
            assert os.fstat(fd).st_size == 8192
            if how == "write":
                m[0:4] = b"MMAP"
                m.flush()
                first = b"MMAP" + first[4:]
        finally:
            m.close()
    finally:
        os.close(fd)
    assert_kernel_matches_backing(ws, {"a": (first, 2), "b": (first, 2)}, ["b", "a"])


def test_file_open_across_the_rollback_reads_and_appends_restored_state(workspace):
    ws, p = workspace, workspace.path
    first = _linked(ws, 4096)                           # turn-1: a = b
    _append(p / "b", os.urandom(6000))
    os.unlink(p / "b")
    _checkpoint(ws)                                     # turn-2: a alone, 10096 bytes
    fd = os.open(p / "a", os.O_RDWR | os.O_APPEND)
    try:
        ws.cli("rollback", "1")
        assert os.fstat(fd).st_size == 4096
        assert os.pread(fd, 20000, 0) == first
        os.write(fd, b"held")                           # O_APPEND: at the restored end
        first += b"held"
    finally:
        os.close(fd)
    assert_kernel_matches_backing(ws, {"a": (first, 2), "b": (first, 2)})


def test_same_size_change_read_through_a_descriptor_held_across_the_rollback(workspace):
    """The rollback drops the pages the kernel cached of a file it restores in place, not only
    its size and mtime: a change of the same size (no size refresh can hide a skipped page
    invalidation), read through a descriptor opened and read before the rollback (issue 20)."""
    ws, p = workspace, workspace.path
    first = os.urandom(8192)
    (p / "f").write_bytes(first)
    ws.mount()
    second = os.urandom(8192)
    with open(p / "f", "r+b") as f:
        f.write(second)                                 # in place: the same inode, same size
    _checkpoint(ws)                                     # turn-1
    fd = os.open(p / "f", os.O_RDONLY)
    try:
        assert os.pread(fd, 8192, 0) == second          # the kernel holds turn-1's pages
        ws.cli("rollback", "0")
        assert os.pread(fd, 8192, 0) == first, "pages from before the rollback"
    finally:
        os.close(fd)
    assert _read(p / "f") == first == _read(ws.backing / "f")


@pytest.mark.parametrize("order", ["b a c", "c a", "a c b"])
def test_rename_instead_of_unlink(workspace, order):
    """The later turn renames the second name away instead of removing it."""
    ws, p = workspace, workspace.path
    first, more = _linked_then_grown(ws)                # turn-1: a = b, 4 KiB; turn-2: 12 KiB
    os.rename(p / "b", p / "c")
    _checkpoint(ws)                                     # turn-3: a = c
    ws.cli("rollback", "1")
    for name in order.split():
        if name != "c":
            assert os.stat(p / name).st_size == 4096
    assert not (p / "c").exists()
    ws.cli("rollback", "3")
    whole = first + more
    assert_kernel_matches_backing(ws, {"a": (whole, 2), "c": (whole, 2)}, ["c", "a"])


def test_renamed_over_another_file(workspace):
    ws, p = workspace, workspace.path
    ws.mount()
    first, other = os.urandom(4096), os.urandom(100)
    (p / "a").write_bytes(first)
    os.link(p / "a", p / "b")
    (p / "o").write_bytes(other)
    _checkpoint(ws)                                     # turn-1
    _append(p / "b", os.urandom(7000))
    os.rename(p / "b", p / "o")                         # o is now the big file
    _checkpoint(ws)                                     # turn-2
    os.stat(p / "o")
    os.stat(p / "a")
    ws.cli("rollback", "1")
    assert_kernel_matches_backing(ws, {"o": (other, 1), "b": (first, 2), "a": (first, 2)})


@pytest.mark.parametrize("order", ["l3 l2 l1 a", "a l1 l2 l3"])
def test_several_links(workspace, order):
    ws, p = workspace, workspace.path
    ws.mount()
    first = os.urandom(4096)
    (p / "a").write_bytes(first)
    (p / "d").mkdir()
    for name in ("l1", "d/l2", "d/l3"):
        os.link(p / "a", p / name)
    _checkpoint(ws)                                     # turn-1: four names
    _append(p / "d" / "l3", os.urandom(5000))
    os.unlink(p / "l1")
    _checkpoint(ws)                                     # turn-2: three names, 9096 bytes
    os.unlink(p / "d" / "l2")
    os.chmod(p / "a", 0o600)
    _checkpoint(ws)                                     # turn-3: two names, mode 600
    whole = _read(p / "a")
    rel = {"a": "a", "l1": "l1", "l2": "d/l2", "l3": "d/l3"}
    ws.cli("rollback", "1")
    for name in order.split():
        st = os.stat(p / rel[name])
        assert (st.st_size, st.st_nlink, stat.S_IMODE(st.st_mode)) == (4096, 4, 0o644)
    ws.cli("rollback", "3")
    assert stat.S_IMODE(os.stat(p / "a").st_mode) == 0o600
    assert_kernel_matches_backing(ws, {"a": (whole, 2), "d/l3": (whole, 2)},
                                  [rel[n] for n in order.split() if n in ("a", "l3")])


@pytest.mark.parametrize("order", ["d/f g", "g d/f"])
def test_directory_renamed_on_the_path(workspace, order):
    """The file's directory is renamed in the later turn: the names the kernel knew it by before
    the rollback are not where the rollback finds it."""
    ws, p = workspace, workspace.path
    ws.mount()
    first, more = os.urandom(4096), os.urandom(4096 * 3)
    (p / "d").mkdir()
    (p / "d" / "f").write_bytes(first)
    os.link(p / "d" / "f", p / "g")
    _checkpoint(ws)                                     # turn-1: d/f = g
    _append(p / "g", more)
    os.unlink(p / "g")
    _checkpoint(ws)                                     # turn-2: d/f alone
    os.rename(p / "d", p / "e")
    _checkpoint(ws)                                     # turn-3: e/f
    ws.cli("rollback", "1")
    for rel in order.split():
        assert os.stat(p / rel).st_size == 4096
    ws.cli("rollback", "3")
    assert not (p / "d").exists() and not (p / "g").exists()
    assert_kernel_matches_backing(ws, {"e/f": (first + more, 1)})


def test_link_in_a_new_directory_then_remount(workspace):
    """The ext4 variant of the issue: the kernel knows the file by a name no row records."""
    ws, p = workspace, workspace.path
    (p / "s").mkdir()
    (p / "s" / "g").write_bytes(b"hello\n")
    ws.mount()
    (p / "a").mkdir()
    os.link(p / "s" / "g", p / "a" / "f")
    _append(p / "a" / "f", b"more\n")
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
    assert_kernel_matches_backing(ws, {"s/g": (b"hello\n", 1)})


def test_read_only_file_known_by_another_name(workspace):
    """The refresh truncates through the mount; a read-only file must not stop it."""
    ws, p = workspace, workspace.path
    ws.mount()
    (p / "a").write_bytes(b"x" * 100)
    os.link(p / "a", p / "b")
    _checkpoint(ws)                                     # turn-1
    _append(p / "a", b"y" * 100)
    os.chmod(p / "a", 0o444)
    os.unlink(p / "b")
    _checkpoint(ws)                                     # turn-2: 200 bytes, read-only
    ws.cli("rollback", "1")
    os.stat(p / "b")
    os.stat(p / "a")
    ws.cli("rollback", "2")
    st = os.stat(p / "a")
    assert (st.st_size, st.st_mode & 0o777) == (200, 0o444)
    assert_same_as_backing(ws, "a", b"x" * 100 + b"y" * 100, 1, "read-only")
    os.chmod(p / "a", 0o644)
    assert_kernel_matches_backing(ws, {"a": (b"x" * 100 + b"y" * 100, 1)})
