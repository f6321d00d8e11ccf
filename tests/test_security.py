"""Security of the mount (issue 12): snapshots are read-only and closed, the store is unreachable,
snapshot reads obey the permissions of their turn, the control channel survives garbage."""

import errno
import json
import os
import socket
import subprocess

import pytest

from conftest import TEST_USER, as_user, run


def errno_of(fn, *args) -> int:
    try:
        fn(*args)
    except OSError as e:
        return e.errno
    raise AssertionError(f"{fn.__name__}{args} succeeded")


def test_snapshots_cannot_be_written_renamed_into_or_out_of_or_linked(workspace):
    (workspace.path / "d").mkdir()
    (workspace.path / "d/f").write_text("f\n")
    workspace.mount()
    ws, snap = workspace.path, workspace.snapshots / "turn-0"
    (ws / "live").write_text("live\n")
    refused = (errno.EROFS, errno.EXDEV, errno.EPERM, errno.EACCES)
    assert errno_of(open, snap / "d/f", "w") == errno.EROFS
    assert errno_of(open, snap / "new", "w") in refused
    assert errno_of(os.rename, ws / "live", snap / "live") in refused
    assert errno_of(os.rename, snap / "d/f", ws / "stolen") in refused
    assert errno_of(os.link, ws / "live", snap / "d/linked") in refused
    assert errno_of(os.link, snap / "d/f", ws / "linked") in refused
    assert errno_of(os.mkdir, snap / "newdir") in refused
    assert errno_of(os.unlink, snap / "d/f") in refused
    assert errno_of(os.rename, snap, ws / "turn0") in refused
    assert errno_of(os.chmod, snap / "d/f", 0o777) in refused
    assert errno_of(os.setxattr, snap / "d/f", "user.x", b"1") in refused
    assert errno_of(os.symlink, "/etc/passwd", snap / "ln") in refused
    assert (snap / "d/f").read_text() == "f\n" and (ws / "live").read_text() == "live\n"
    workspace.umount()
    assert sorted(os.listdir(workspace.path)) == [".cowfs", "d", "live"]


def test_the_store_cannot_be_reached_through_the_mount_by_any_name(workspace):
    workspace.mount()
    ws = workspace.path
    assert ".cowfs" not in os.listdir(ws)
    for name in (".cowfs", ".cowfs/catalogue.db", "d/../.cowfs", "./.cowfs", ".cowfs/."):
        assert errno_of(os.stat, ws / name) in (errno.ENOENT, errno.EPERM), name
    assert errno_of(os.mkdir, ws / ".cowfs") == errno.EPERM
    assert errno_of(open, ws / ".cowfs", "w") == errno.EPERM
    assert errno_of(os.symlink, "x", ws / ".snapshots") in (errno.EEXIST, errno.EPERM)
    # Case variants are other names on a case-sensitive backing filesystem, never the store.
    (ws / ".COWFS").write_text("mine\n")
    assert (ws / ".COWFS").read_text() == "mine\n"
    # An opened file's /proc link names it in the mount; a snapshot file's, in the snapshot.
    with open(ws / ".COWFS") as f:
        assert os.readlink(f"/proc/self/fd/{f.fileno()}") == str(ws / ".COWFS")
    workspace.cli("checkpoint")
    with open(workspace.snapshots / "turn-1/.COWFS") as f:
        link = os.readlink(f"/proc/self/fd/{f.fileno()}")
        assert link.startswith(str(workspace.snapshots)), link
        assert errno_of(open, link.replace("turn-1/.COWFS", "../.cowfs/catalogue.db"), "rb") in (
            errno.ENOENT, errno.EPERM)


def test_snapshot_symlinks_are_links_never_followed_by_the_daemon(workspace, tmp_path):
    secret = tmp_path / "outside"
    secret.write_text("outside the workspace\n")
    os.symlink(secret, workspace.path / "escape")
    os.symlink("../../../../../../etc", workspace.path / "up")
    workspace.mount()
    snap = workspace.snapshots / "turn-0"
    assert os.readlink(snap / "escape") == str(secret)
    assert os.lstat(snap / "escape").st_mode & 0o170000 == 0o120000
    assert os.readlink(snap / "up") == "../../../../../../etc"
    # The kernel follows them for a reader, from where the link is, as it would natively:
    # the daemon itself never resolves a snapshot symlink.
    assert (snap / "escape").read_text() == secret.read_text()


@pytest.mark.root_only
def test_snapshot_reads_obey_the_permissions_of_their_turn(workspace, test_users):
    p = workspace.path
    (p / "private").write_text("root only\n")
    os.chmod(p / "private", 0o600)
    (p / "shared").write_text("for all\n")
    os.chmod(p / "shared", 0o644)
    workspace.mount()
    os.chmod(p / "private", 0o644)      # readable now, but not at turn 0
    os.chmod(p / "shared", 0o600)       # the other way round
    workspace.cli("checkpoint")
    snap = workspace.snapshots / "turn-0"
    as_other = as_user(TEST_USER)
    assert run([*as_other, "cat", snap / "private"], check=False).returncode != 0
    assert run([*as_other, "cat", snap / "shared"]).stdout == "for all\n"
    assert run([*as_other, "cat", p / "private"]).stdout == "root only\n"
    assert run([*as_other, "cat", workspace.snapshots / "turn-1/shared"], check=False).returncode != 0


def test_the_control_channel_survives_garbage(workspace):
    workspace.mount()
    address = os.getxattr(workspace.path, "user.cowfs.control")
    for junk in (b"not json\n", b"\xff\xfe\n", b"[1, 2]\n", b'{"op": 5}\n', b'{"op": "nope"}\n',
                 b'{"op": "rollback", "turn": "x"}\n', b'{"op": "restore", "turn": 0, "paths": [7]}\n',
                 b'{"op": "diff", "a": -1}\n', b"{" * 10000 + b"\n", b"", b"x" * (2 << 20)):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(30)
            s.connect(address)
            try:
                s.sendall(junk)
                s.shutdown(socket.SHUT_WR)
                reply = s.recv(1 << 16)
            except (BrokenPipeError, ConnectionResetError):
                continue
            if reply:
                assert json.loads(reply)["ok"] is False, (junk[:40], reply)
    # Still serving, and nothing was changed.
    assert json.loads(workspace.cli("status", "--json").stdout)["open_turn"] == 1
    (workspace.path / "f").write_text("still works\n")
    assert workspace.cli("checkpoint").stdout.strip() == "turn-1"


def test_a_client_cannot_claim_another_process_as_the_writer(workspace):
    from cowfs import control
    (workspace.path / "f").write_text("f0\n")
    workspace.mount()
    (workspace.path / "f").write_text("changed\n")
    mount = control.find_mount(str(workspace.path))
    control.restore(mount, 0, ["f"])    # the honest call names our own thread
    control.request(mount, "restore", turn=0, paths=["f"], tid=1, uid=12345)   # a lie
    [change] = json.loads(workspace.cli("diff", "--json").stdout) or [None]
    assert change is None or change["process"]["pid"] == os.getpid()
    workspace.cli("checkpoint")
    (workspace.path / "g").write_text("g\n")
    workspace.cli("checkpoint")
    control.request(mount, "restore", turn=1, paths=["g"], tid=1, uid=12345)
    [change] = json.loads(workspace.cli("diff", "--json").stdout)
    assert change["kind"] == "D" and change["process"]["pid"] == os.getpid()
    assert change["process"]["uid"] == os.getuid()
