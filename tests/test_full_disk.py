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
