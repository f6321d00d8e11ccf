"""Tests of the test fixtures themselves (no cowfs needed)."""

import json
import os
import subprocess
import sys
import tempfile
import time

import pytest

from conftest import CommandError, Workspace, is_fuse_mounted, mountinfo, run


def fstype(path) -> str:
    return run(["findmnt", "-n", "-o", "FSTYPE", "--target", path]).stdout.strip()


def test_xfs_root_is_a_reflink_xfs(xfs_root):
    assert fstype(xfs_root) == "xfs"
    assert "reflink=1" in run(["xfs_info", xfs_root]).stdout
    src, dst = xfs_root / "reflink-src", xfs_root / "reflink-dst"
    data = os.urandom(1 << 20)
    src.write_bytes(data)
    try:
        run(["cp", "--reflink=always", src, dst])
        assert dst.read_bytes() == data
        # The clone shares its extents with the source.
        assert "shared" in run(["filefrag", "-v", dst]).stdout
    finally:
        src.unlink(missing_ok=True)
        dst.unlink(missing_ok=True)


def test_ext4_root_has_no_reflink(ext4_root):
    src, dst = ext4_root / "reflink-src", ext4_root / "reflink-dst"
    src.write_bytes(os.urandom(1 << 16))
    try:
        cp = run(["cp", "--reflink=always", src, dst], check=False)
        assert cp.returncode != 0, f"reflink worked on {fstype(ext4_root)}: copy fallback untested"
    finally:
        src.unlink(missing_ok=True)
        dst.unlink(missing_ok=True)


_seen_backing = {}


@pytest.mark.parametrize("round_", [1, 2])
def test_backing_is_fresh_empty_and_distinct(backing, round_, request, xfs_root, ext4_root):
    kind = request.node.callspec.params["backing"]
    root = {"xfs": xfs_root, "ext4": ext4_root}[kind]
    assert backing.is_dir() and backing.parent == root
    assert list(backing.iterdir()) == []
    assert (fstype(backing) == "xfs") == (kind == "xfs")
    assert oct(backing.stat().st_mode & 0o777) == oct(0o755)
    for prev in _seen_backing.values():
        assert prev != backing
        assert not prev.exists(), "an earlier test's backing dir was not removed"
    (backing / "marker").write_text(request.node.nodeid)
    _seen_backing[(kind, round_)] = backing


def test_workspace_starts_empty_and_unmounted(workspace, backing):
    assert workspace.path == backing / "ws"
    assert workspace.path.is_dir() and list(workspace.path.iterdir()) == []
    assert workspace.store == workspace.path / ".cowfs"
    assert not workspace.is_mounted()


def test_cli_argv_puts_dash_C_after_the_subcommand(workspace):
    ws = workspace
    ws.cowfs_cmd = [sys.executable, "-c", "import sys, json; print(json.dumps(sys.argv[1:]))"]
    cp = ws.cli("rollback", 3, "--yes")
    assert json.loads(cp.stdout) == ["rollback", "-C", str(ws.path), "3", "--yes"]
    assert json.loads(ws.umount(check=False).stdout) == ["umount", str(ws.path)]


def test_command_error_is_readable(workspace):
    workspace.cowfs_cmd = [sys.executable, "-c", "import sys; sys.exit('boom: ' + sys.argv[1])"]
    with pytest.raises(CommandError) as exc:
        workspace.cli("status")
    msg = str(exc.value)
    assert "exit code 1" in msg and "boom: status" in msg and "-C" in msg
    assert workspace.cli("status", check=False).returncode == 1


def test_mount_that_exits_0_without_mounting_is_an_error(workspace):
    workspace.cowfs_cmd = ["true"]
    with pytest.raises(CommandError, match="no FUSE mount"):
        workspace.mount()


def test_run_does_not_wait_for_a_daemon_holding_its_output():
    t0 = time.monotonic()
    cp = run(["sh", "-c", "sleep 3 & echo started"])
    assert time.monotonic() - t0 < 2
    assert cp.stdout == "started\n"


def test_run_timeout_raises():
    with pytest.raises(CommandError, match="timed out"):
        run(["sleep", "5"], check=False, timeout=0.3)


# A FUSE filesystem that is not cowfs (an empty root directory), to check that
# is_mounted() sees a mount and cleanup() gets rid of it without cowfs' help.
EMPTY_FS = r"""
import errno, stat, sys
import pyfuse3, trio

class Ops(pyfuse3.Operations):
    async def getattr(self, inode, ctx=None):
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOENT)
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        a.st_mode = stat.S_IFDIR | 0o755
        a.st_nlink = 2
        return a
    async def lookup(self, parent, name, ctx=None):
        raise pyfuse3.FUSEError(errno.ENOENT)
    async def opendir(self, inode, ctx):
        return inode
    async def readdir(self, fh, off, token):
        pass

opts = set(pyfuse3.default_options)
opts.add("fsname=cowfs-fixture-test")
pyfuse3.init(Ops(), sys.argv[1], opts)
try:
    trio.run(pyfuse3.main)
finally:
    pyfuse3.close(unmount=False)
"""


def test_cleanup_unmounts_a_foreign_fuse_mount(workspace_factory):
    pytest.importorskip("pyfuse3")
    ws = workspace_factory("name with spaces\nand a newline")
    err = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-c", EMPTY_FS, str(ws.path)],
                            stdin=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 15
        while not ws.is_mounted():
            if proc.poll() is not None:
                err.seek(0)
                pytest.fail(f"test FUSE fs exited {proc.returncode}: {err.read().decode()}")
            assert time.monotonic() < deadline, "test FUSE fs did not mount"
            time.sleep(0.05)
        assert os.listdir(ws.path) == []
        assert any(m.source == "cowfs-fixture-test" for m in mountinfo())
        ws.cleanup()
        assert not ws.is_mounted()
        assert not is_fuse_mounted(ws.path)
        proc.wait(timeout=15)  # the daemon exits once unmounted
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        err.close()
