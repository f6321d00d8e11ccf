"""The Python API (cowfs.Workspace) through a real mount: typed results, typed errors."""

import os

import pytest

import cowfs
from cowfs import errors


def test_outside_a_mount_is_not_mounted(tmp_path):
    with pytest.raises(cowfs.NotMounted) as e:
        cowfs.Workspace(tmp_path)
    assert e.value.exit_code == errors.EXIT_USAGE and "not inside a cowfs mount" in str(e.value)


def test_checkpoint_turns_rollback_and_snapshots(workspace):
    (workspace.path / "keep").write_text("v0\n")
    workspace.mount()
    (workspace.path / "sub").mkdir()
    ws = cowfs.Workspace(workspace.path / "sub")          # any path inside the mount
    assert ws.path == workspace.path
    (workspace.path / "keep").write_text("v1\n")
    (workspace.path / "new").write_text("n\n")

    one = ws.checkpoint("first")
    assert (one.number, one.kind, one.message, one.name) == (1, "turn", "first", "turn-1")
    assert one.sealed is not None and one.sealed >= one.started
    assert (one.changes, one.ignored) == (2, 0)        # keep, new (a directory is no change, as in git)
    assert one.captured >= 3 and one.bytes_captured > 0

    turns = ws.turns()
    assert [t.number for t in turns] == [0, 1, 2]
    assert turns[0].kind == "initial" and turns[-1].sealed is None       # turn 2 is open
    assert ws.turn(1) == turns[1]
    assert (ws.snapshot_path(1) / "keep").read_text() == "v1\n"
    assert not (ws.snapshot_path(0) / "new").exists()

    undo = ws.rollback(0)
    assert (undo.kind, undo.target) == ("rollback", 0) and undo.sealed is not None
    assert (workspace.path / "keep").read_text() == "v0\n"
    assert not (workspace.path / "new").exists()
    ws.rollback(1)                                        # a rollback of a rollback
    assert (workspace.path / "new").read_text() == "n\n"


def test_unknown_turns_are_typed_errors(workspace):
    workspace.mount()
    ws = cowfs.Workspace(workspace.path)
    for call in (lambda: ws.turn(99), lambda: ws.rollback(99), lambda: ws.snapshot_path(99),
                 lambda: ws.rollback("seven"), lambda: ws.rollback(-1)):
        with pytest.raises(cowfs.UnknownTurn) as e:
            call()
        assert e.value.exit_code == errors.EXIT_USAGE
    assert [t.number for t in ws.turns()] == [0, 1]      # nothing was sealed by the failures


def test_status(workspace):
    workspace.mount()
    (workspace.path / "f").write_text("x")
    s = cowfs.Workspace(workspace.path).status()
    assert s.mountpoint == str(workspace.path) and s.open_turn == 1 and s.last_turn == 0
    assert s.capture_mode in ("reflink", "copy") and s.pending_changes >= 1
    assert s.daemon_pid > 0 and os.path.exists(f"/proc/{s.daemon_pid}")


@pytest.mark.root_only      # the API mounts as this (root) process; rootless: tests/test_rootless.py
def test_mount_and_mounted_re_enter_the_working_directory(workspace, monkeypatch):
    p = workspace.path
    (p / "old").write_text("old\n")
    monkeypatch.chdir(p)                                  # a harness started inside its workspace
    with cowfs.mounted(p, message="session start") as ws:
        assert ws.turn(0).message == "session start"
        with open("new", "w") as f:                       # relative: must go through the mount
            f.write("new\n")
        one = ws.checkpoint("wrote new")
        assert (ws.snapshot_path(one) / "new").read_text() == "new\n"
        assert not (ws.snapshot_path(0) / "new").exists()
    assert not workspace.is_mounted() and os.getcwd() == str(p)
    again = cowfs.mount(p)
    try:
        assert [t.message for t in again.turns()][:2] == ["session start", "wrote new"]
        with pytest.raises(cowfs.BadInput):
            cowfs.mount(p)                                # already mounted
    finally:
        os.chdir("/")
        cowfs.umount(p)
    with pytest.raises(cowfs.BadInput):
        cowfs.mount(p / "old")                            # not a directory


@pytest.mark.root_only
def test_mount_options_reach_the_daemon(workspace):
    """cowfs.mount(options=...) is `cowfs mount -o`: a noatime mount moves no atime."""
    (workspace.path / "f").write_text("f\n")
    past = 10**18
    os.utime(workspace.path / "f", ns=(past, past))       # relatime would move atime at a read
    workspace.backing
    with pytest.raises(cowfs.BadInput):
        cowfs.mount(workspace.path, options="noatime,sync")
    cowfs.mount(workspace.path, options="noatime")
    assert workspace.is_mounted()
    (workspace.path / "f").read_text()
    assert os.stat(workspace.path / "f").st_atime_ns == past
    workspace.umount()
    assert os.stat(workspace.path / "f").st_atime_ns == past
