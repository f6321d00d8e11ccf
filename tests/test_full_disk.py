"""A full disk on XFS (reflink) never loses a turn or kills the daemon (issue 12).

The ext4 (copy fallback) cases are in test_scenarios.py: a capture that cannot fit fails the
open, a write that does not fit fails at close/fsync.
"""

import errno
import json
import os
import subprocess

import pytest

from conftest import Workspace


@pytest.fixture
def tiny_xfs(tmp_path_factory):
    """A 300 MiB XFS image with reflink, loop-mounted: small enough to fill."""
    base = tmp_path_factory.mktemp("tinyxfs")
    img, mnt = base / "img", base / "mnt"
    mnt.mkdir()
    subprocess.run(["truncate", "-s", "300M", img], check=True)
    subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", img], check=True)
    subprocess.run(["mount", "-o", "loop", img, mnt], check=True)
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", mnt], check=False).returncode:
            subprocess.run(["umount", "-l", mnt], check=False)


def fill(path) -> None:
    with open(path, "wb", buffering=0) as f:
        for chunk in (1 << 20, 4096):
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError as e:
                assert e.errno == errno.ENOSPC


def test_a_full_xfs_refuses_changes_cleanly_and_work_goes_on_after_space_is_freed(tiny_xfs):
    ws = Workspace(tiny_xfs / "ws")
    big = os.urandom(50 << 20)
    (ws.path / "big").write_bytes(big)
    (ws.path / "small").write_bytes(b"small\n")
    try:
        ws.mount()
        fill(tiny_xfs / "filler")
        failures = []
        for attempt in (lambda: open(ws.path / "big", "r+b").write(b"changed"),
                        lambda: (ws.path / "new").write_bytes(os.urandom(1 << 20)),
                        lambda: (ws.path / "small").write_bytes(b"x" * (1 << 20))):
            try:
                attempt()
            except OSError as e:
                failures.append(e.errno)
        assert failures and set(failures) == {errno.ENOSPC}, failures
        assert ws.cli("checkpoint").returncode == 0          # sealing works on a full disk
        snap = ws.snapshots / "turn-1"
        # No silent gap: whatever the failed writes left is what turn-1 shows, and turn-0 is intact.
        assert (ws.snapshots / "turn-0/big").read_bytes() == big
        assert (snap / "big").read_bytes() == (ws.path / "big").read_bytes()
        os.unlink(tiny_xfs / "filler")
        with open(ws.path / "big", "r+b") as f:
            f.write(b"changed")
        (ws.path / "new").write_bytes(b"new\n")
        assert ws.cli("checkpoint").stdout.strip() == "turn-2"
        assert (ws.snapshots / "turn-2/big").read_bytes() == b"changed" + big[7:]
        assert (ws.snapshots / "turn-0/big").read_bytes() == big
        ws.cli("rollback", "0")
        assert (ws.path / "big").read_bytes() == big and not (ws.path / "new").exists()
        assert json.loads(ws.cli("status", "--json").stdout)["daemon_pid"] > 0
    finally:
        problems = ws.cleanup()
        assert not problems, problems


def test_a_write_back_that_failed_for_space_leaves_the_size_that_was_written(tiny_xfs):
    """The page cache accepts more than the disk holds; the write-back fails with ENOSPC
    (reported at close). The kernel had grown its size of the file with every cached write:
    afterwards the mount must show what the backing file holds, not the size attempted."""
    ws = Workspace(tiny_xfs / "ws")
    (ws.path / "keep").write_bytes(b"keep\n")
    backing = ws.backing
    try:
        ws.mount()
        free = os.statvfs(tiny_xfs).f_bavail * os.statvfs(tiny_xfs).f_frsize
        attempted = free + (64 << 20)
        with pytest.raises(OSError) as failed:
            with open(ws.path / "fill", "wb") as f:
                for _ in range(attempted >> 20):
                    f.write(b"\1" * (1 << 20))
        assert failed.value.errno == errno.ENOSPC
        real = os.stat(backing / "fill").st_size
        assert real < attempted
        assert os.stat(ws.path / "fill").st_size == real
        with open(ws.path / "fill", "r+b") as f:        # room again; an append lands at the end
            f.truncate(real // 2)
        with open(ws.path / "fill", "ab") as f:
            f.write(b"end")
        assert os.stat(backing / "fill").st_size == os.stat(ws.path / "fill").st_size == real // 2 + 3
        with open(ws.path / "fill", "rb") as f:
            f.seek(-3, os.SEEK_END)
            assert f.read() == b"end"
        assert ws.cli("checkpoint").returncode == 0
    finally:
        problems = ws.cleanup()
        assert not problems, problems


def test_a_catalogue_that_cannot_grow_refuses_the_change_with_enospc(tiny_xfs):
    """Every first change of a thing in a turn adds rows to the catalogue; on a full disk
    SQLite cannot grow its log: the change fails with ENOSPC (not EIO), changes nothing, and
    history goes on once there is room."""
    ws = Workspace(tiny_xfs / "ws")
    names = [f"f{i:04}" for i in range(3000)]
    for name in names:
        (ws.path / name).write_bytes(b"x")
        os.chmod(ws.path / name, 0o644)
    try:
        ws.mount()
        fill(tiny_xfs / "filler")
        done, refused = [], []
        for name in names:
            try:
                os.chmod(ws.path / name, 0o600)
                done.append(name)
            except OSError as e:
                refused.append((name, e.errno))
        assert refused, "the catalogue never ran out of room: the test proves nothing"
        assert {err for _, err in refused} == {errno.ENOSPC}, refused[:5]
        assert all(os.stat(ws.path / name).st_mode & 0o777 == 0o644 for name, _ in refused)
        os.unlink(tiny_xfs / "filler")
        for name, _ in refused[:10]:
            os.chmod(ws.path / name, 0o600)
        assert ws.cli("checkpoint").stdout.strip() == "turn-1"
        for name in names[:50] + [n for n, _ in refused[:10]]:
            assert os.stat(ws.snapshots / "turn-0" / name).st_mode & 0o777 == 0o644
        changed = set(done) | {n for n, _ in refused[:10]}
        for name in names:
            want = 0o600 if name in changed else 0o644
            assert os.stat(ws.snapshots / "turn-1" / name).st_mode & 0o777 == want, name
        assert json.loads(ws.cli("status", "--json").stdout)["daemon_pid"] > 0
        ws.umount()
        assert not (ws.store / "needs-check").exists()
        assert subprocess.run([*ws.cowfs_cmd, "fsck", ws.path], capture_output=True).returncode == 0
    finally:
        problems = ws.cleanup()
        assert not problems, problems


def test_a_writer_that_never_closes_gets_enospc_as_natively(tiny_xfs):
    """`dd` to a full disk stops with "No space left on device" natively. Through the writeback
    cache its write()s only fill the page cache and the write-back fails out of its sight: once
    one has failed, its next write() is refused with ENOSPC, so it stops too, having written
    about what fits rather than running on."""
    free = os.statvfs(tiny_xfs).f_bavail * os.statvfs(tiny_xfs).f_frsize
    native = subprocess.run(["dd", "if=/dev/zero", "bs=1M", f"of={tiny_xfs / 'native'}"],
                            capture_output=True, text=True, timeout=120)
    assert native.returncode != 0 and "error writing" in native.stderr, native.stderr
    os.unlink(tiny_xfs / "native")
    ws = Workspace(tiny_xfs / "ws")
    (ws.path / "keep").write_bytes(b"keep\n")
    try:
        ws.mount()
        written, chunk = 0, b"\0" * (1 << 20)
        # A bound on what it may attempt, so that a writer that is never stopped fails the test
        # instead of filling the page cache for minutes: 10 times what fits.
        with pytest.raises(OSError) as failed:
            with open(ws.path / "big", "wb", buffering=0) as f:
                while written < 10 * free:
                    written += f.write(chunk)
        assert failed.value.errno == errno.ENOSPC
        # A write() failed, near the full disk (what the page cache took ahead of the failed
        # write-back on top), not the close after the bound.
        assert written < 3 * free, (written, free)
        assert ws.cli("checkpoint").returncode == 0
        assert (ws.path / "keep").read_bytes() == b"keep\n"
        assert os.stat(ws.path / "big").st_size == os.stat(ws.backing / "big").st_size
    finally:
        problems = ws.cleanup()
        assert not problems, problems
