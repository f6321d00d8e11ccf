"""History is durable when the user syncs (issue 20): an fsync, fdatasync or directory fsync
through the mount makes every pre-image recorded so far durable (the content files, the store
directories naming them and the objects kept there, the catalogue's WAL) before the daemon
syncs the backing file or directory. Proved twice: by the order of the daemon's syncs
(strace), and by a power loss (a shutdown of XFS or ext4 that drops whatever its log did not
hold).
"""

import ctypes
import errno
import json
import os
import re
import time
from dataclasses import dataclass

import pytest

from conftest import Workspace, run, traced
from test_full_disk import tiny_xfs  # noqa: F401 (fixtures)
from test_scenarios import tiny_ext4  # noqa: F401


@dataclass
class Sync:
    call: str
    path: str
    start: int      # line of the log where the call began ...
    end: int        # ... and where it returned


_CALL = re.compile(r"^(\d+)\s+(\w+)\((.*)$")
_RESUMED = re.compile(r"^(\d+)\s+<\.\.\. (\w+) resumed>")


def parse(log) -> tuple[list[Sync], dict[str, int]]:
    """The daemon's syncs, in the order strace saw them begin, and the line of each mark
    (a getxattr of a `user.mark-N` name the test made through the mount)."""
    syncs, marks, pending = [], {}, {}
    for i, line in enumerate(log.read_text(errors="replace").splitlines()):
        resumed = _RESUMED.match(line)
        if resumed:
            sync = pending.pop(resumed.group(1), None)
            if sync is not None:
                sync.end = i
            continue
        m = _CALL.match(line)
        if not m:
            continue
        pid, call, rest = m.groups()
        mark = re.search(r'"(user\.mark-\d+)"', rest)
        if mark:
            marks[mark.group(1)] = i
            continue
        if call not in ("fsync", "fdatasync", "syncfs"):
            continue
        path = re.match(r"\d+<(.*?)>", rest)
        sync = Sync(call, path.group(1) if path else rest, i, i)
        syncs.append(sync)
        if "<unfinished ...>" in rest:
            pending[pid] = sync
    return syncs, marks


def mark(path, n: int) -> None:
    """A line in the daemon's trace between two steps of the test."""
    with pytest.raises(OSError) as e:
        os.getxattr(path, f"user.mark-{n}")
    assert e.value.errno == errno.ENODATA


def between(syncs: list[Sync], marks: dict, a: int, b: int) -> list[Sync]:
    return [s for s in syncs if marks[f"user.mark-{a}"] < s.start < marks[f"user.mark-{b}"]]


def one(syncs: list[Sync], predicate) -> Sync:
    found = [s for s in syncs if predicate(s)]
    assert len(found) == 1, found
    return found[0]


def store(sub: str):
    return lambda s: s.path.endswith("/.cowfs/" + sub)


def daemon_pid(ws) -> int:
    return json.loads(ws.cli("status", "--json").stdout)["daemon_pid"]


def test_an_fsync_makes_the_history_durable_first_and_a_repeat_costs_nothing(workspace):
    p = workspace.path
    (p / "f").write_bytes(os.urandom(64 << 10))
    (p / "g").write_bytes(b"g\n")
    (p / "h").write_bytes(b"h\n")
    workspace.mount()
    ino = os.stat(p / "f").st_ino
    log = p.parent / "durability.strace"
    libc = ctypes.CDLL(None, use_errno=True)
    with open(p / "f", "r+b", buffering=0) as f:
        with traced(daemon_pid(workspace), ["-y", "-e", "trace=fsync,fdatasync,syncfs,getxattr",
                                            "-o", log]):
            mark(p, 0)
            f.write(b"first")           # captures f's content: content/<turn>-<ino>
            os.fsync(f.fileno())
            mark(p, 1)
            for _ in range(20):         # same turn, nothing new to record
                f.write(b"again")
                os.fsync(f.fileno())
            mark(p, 2)
            with open(p / "new", "wb", buffering=0) as n:   # born: its entry row only
                n.write(b"new\n")
                os.fdatasync(n.fileno())
            mark(p, 3)
            os.unlink(p / "g")          # g moves into objects/, a row names it there
            root = os.open(p, os.O_RDONLY | os.O_DIRECTORY)
            os.fsync(root)
            os.close(root)
            mark(p, 4)
            f.write(b"synced by syncfs?")
            assert libc.syncfs(f.fileno()) == 0
            mark(p, 5)
            h = os.open(p / "h", os.O_WRONLY | os.O_DSYNC)    # the kernel sends an fsync
            os.write(h, b"H")
            os.close(h)
            mark(p, 6)
    syncs, marks = parse(log)

    first = between(syncs, marks, 0, 1)
    backing = one(first, lambda s: s.call == "fsync" and s.path.endswith("/ws/f"))
    content = one(first, lambda s: re.search(rf"/\.cowfs/content/\d+-{ino}$", s.path))
    assert content.call == "fdatasync"
    for before in (content, one(first, store("content")), one(first, store("catalogue.db-wal"))):
        assert before.end < backing.start, (before, backing, first)

    repeats = between(syncs, marks, 1, 2)
    assert sum(s.path.endswith("/ws/f") for s in repeats) == 20, repeats
    # Nothing of the store; at most the WAL (and objects/) once, if the daemon's heartbeat
    # wrote the turn's counts meanwhile.
    extra = [s for s in repeats if not s.path.endswith("/ws/f")]
    assert len(extra) <= 2 and all(store("objects")(s) or store("catalogue.db-wal")(s)
                                   for s in extra), repeats

    born = between(syncs, marks, 2, 3)
    new = one(born, lambda s: s.call == "fdatasync" and s.path.endswith("/ws/new"))
    assert one(born, store("catalogue.db-wal")).end < new.start, born
    assert not any("/content/" in s.path for s in born), born

    removed = between(syncs, marks, 3, 4)
    root_sync = one(removed, lambda s: s.call == "fsync" and s.path.endswith("/ws"))
    for before in (one(removed, store("objects")), one(removed, store("catalogue.db-wal"))):
        assert before.end < root_sync.start, (before, root_sync, removed)

    # syncfs(2) through a FUSE mount sends the daemon no request (the kernel only sends
    # FUSE_SYNCFS to virtiofs): it writes the dirty pages back, and nothing is synced
    # below, neither the change nor its pre-image (docs/architecture.md, Durability).
    assert between(syncs, marks, 4, 5) == []
    assert b"again" * 20 + b"synced by syncfs?" in (workspace.backing / "f").read_bytes()

    dsync = between(syncs, marks, 5, 6)       # O_DSYNC, O_SYNC, msync: FUSE_FSYNC as above
    h_ino = os.stat(p / "h").st_ino
    h_sync = one(dsync, lambda s: s.call == "fdatasync" and s.path.endswith("/ws/h"))
    for before in (one(dsync, lambda s: re.search(rf"/\.cowfs/content/\d+-{h_ino}$", s.path)),
                   one(dsync, store("catalogue.db-wal"))):
        assert before.end < h_sync.start, (before, h_sync, dsync)


@pytest.fixture(params=["xfs", "ext4"])
def small_fs(request):
    """A small loop-mounted filesystem of this test's own (a power loss shuts it down):
    (image, mount point)."""
    mnt = request.getfixturevalue("tiny_xfs" if request.param == "xfs" else "tiny_ext4")
    return mnt.parent / "img", mnt


def power_loss(ws: Workspace, img, mnt) -> None:
    """What a power cut does to the filesystem below the mount: what its log (journal) does not
    hold is lost. `xfs_io -x -c shutdown` (no -f: the log is not flushed; XFS and ext4 both take
    it), the way xfstests simulate it; then the daemon is killed and the filesystem mounted again
    (log recovery)."""
    pid = daemon_pid(ws)
    run(["xfs_io", "-x", "-c", "shutdown", mnt])
    os.kill(pid, 9)
    run(["fusermount3", "-u", "-z", ws.path], check=False)
    ws._close_backing()
    for _ in range(100):
        if run(["umount", mnt], check=False).returncode == 0:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the shut down filesystem stays busy")
    run(["mount", "-o", "loop", img, mnt])


@pytest.mark.root_only
def test_what_an_fsync_made_durable_keeps_its_history_after_a_power_loss(small_fs):
    """A file edited in place in turn 2 and fsynced, then the power goes: after recovery the
    file holds the edit (the user's fsync), and turn 1's snapshot still shows it as it was
    (its pre-image and the row naming it reached the disk first). So does a file made in
    turn 2 and fsynced: it is in no earlier snapshot; and a file removed in turn 2 and its
    directory fsynced: it is in turn 1's."""
    img, mnt = small_fs
    ws = Workspace(mnt / "ws")
    old = os.urandom(256 << 10)
    (ws.path / "f").write_bytes(old)
    (ws.path / "gone").write_bytes(b"removed in turn 2\n")
    run(["sync", "-f", mnt])
    ws.mount()
    try:
        (ws.path / "turn1").write_bytes(b"1\n")
        ws.cli("checkpoint", "-m", "one")
        with open(ws.path / "f", "r+b", buffering=0) as f:
            f.write(b"EDITED")
            os.fsync(f.fileno())
        with open(ws.path / "born", "wb", buffering=0) as b:
            b.write(b"born in turn 2\n")
            os.fsync(b.fileno())
        os.unlink(ws.path / "gone")
        root = os.open(ws.path, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(root)
        os.close(root)
        power_loss(ws, img, mnt)
    finally:
        ws.cleanup()
    assert (ws.path / "f").read_bytes() == b"EDITED" + old[6:]     # the user's fsync held
    assert (ws.path / "born").read_bytes() == b"born in turn 2\n"
    assert not (ws.path / "gone").exists()
    ws.mount()     # turn 2 went through the daemon that died: no drift
    try:
        assert (ws.snapshots / "turn-1" / "f").read_bytes() == old
        assert not (ws.snapshots / "turn-1" / "born").exists()
        assert (ws.snapshots / "turn-1" / "gone").read_bytes() == b"removed in turn 2\n"
        assert (ws.snapshots / "turn-0" / "f").read_bytes() == old
    finally:
        ws.umount(check=False)
        ws.cleanup()
