"""`cowfs fsck [--repair]`: a store corrupted on purpose is found out in plain words, repaired
without losing anything, and checks clean again; a fresh workload checks clean; a mount after an
unclean stop or an internal fault checks the store before serving (issue 12)."""

import errno
import json
import os
import sqlite3
import sys

import pytest

from conftest import run
from test_recovery import kill_daemon
from treeview import tree


def fsck(ws, *args, check=False):
    return run([*ws.cowfs_cmd, "fsck", ws.path, *args], check=check)


def expect_found(ws, *words) -> str:
    """fsck finds a problem whose line has every one of *words*; --repair mends all; clean again."""
    found = fsck(ws)
    assert found.returncode == 1, found.stdout + found.stderr
    lines = [line for line in found.stdout.splitlines() if line.startswith("problem: ")]
    assert any(all(w in line for w in words) for line in lines), found.stdout
    assert "problem(s) found" in found.stdout.splitlines()[-1] and not found.stderr
    repaired = fsck(ws, "--repair")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert all("; repaired: " in line for line in repaired.stdout.splitlines()
               if line.startswith("problem: ")), repaired.stdout
    again = fsck(ws)
    assert again.returncode == 0 and again.stdout.splitlines()[-1].startswith("clean: "), again.stdout
    return found.stdout


def catalogue(ws) -> sqlite3.Connection:
    return sqlite3.connect(ws.store / "catalogue.db", isolation_level=None)


def two_turns(ws):
    """Turn 1 edits f in place and deletes g (a pre-image and a kept object); returns their inos
    and turn 1's tree."""
    p = ws.path
    (p / "f").write_text("f at turn 0\n")
    (p / "g").write_text("g at turn 0\n")
    (p / "d").mkdir()
    ws.mount()
    f_ino, g_ino = os.stat(p / "f").st_ino, os.stat(p / "g").st_ino
    with open(p / "f", "a") as f:
        f.write("f in turn 1\n")
    os.unlink(p / "g")
    ws.cli("checkpoint")
    (p / "d" / "new").write_text("turn 2\n")
    ws.cli("checkpoint")
    turn1 = tree(ws.snapshots / "turn-1")
    turn0 = tree(ws.snapshots / "turn-0")
    ws.umount()
    return f_ino, g_ino, turn0, turn1


def test_a_fresh_workload_checks_clean(workspace):
    ws, p = workspace, workspace.path
    (p / "src").mkdir()
    for i in range(20):
        (p / "src" / f"m{i}.py").write_text(f"print({i})\n")
    (p / "old").mkdir()
    (p / "old" / "x").write_text("x\n")
    ws.mount()
    os.rename(p / "src", p / "lib")
    with open(p / "lib" / "m1.py", "a") as f:
        f.write("more\n")
    os.link(p / "lib" / "m2.py", p / "hard")
    os.symlink("lib/m3.py", p / "link")
    os.symlink("nowhere", p / "dangling")
    os.chmod(p / "lib" / "m4.py", 0o600)
    run(["rm", "-rf", p / "old"])
    ws.cli("checkpoint")
    (p / "lib" / "m5.py").write_text("replaced\n")
    os.unlink(p / "hard")
    os.mkfifo(p / "fifo")
    ws.cli("checkpoint")
    ws.cli("rollback", "0")
    ws.cli("rollback", "1")
    ws.umount()
    out = fsck(ws)
    assert out.returncode == 0 and out.stdout.startswith("clean: "), out.stdout + out.stderr
    assert len(out.stdout.splitlines()) == 1


def test_a_missing_preimage_is_found_and_then_answers_eio(workspace):
    ws = workspace
    f_ino, _, turn0, _ = two_turns(ws)
    os.unlink(ws.store / "content" / f"1-{f_ino}")
    out = expect_found(ws, "content of f at the start of turn-1", "is missing")
    assert "content/1-" in out
    ws.mount()
    with pytest.raises(OSError) as e:
        (ws.snapshots / "turn-0" / "f").read_bytes()
    assert e.value.errno == errno.EIO
    live = tree(ws.path)
    refused = ws.cli("rollback", "0", check=False)
    assert refused.returncode == 1 and "cannot be restored exactly" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert tree(ws.path) == live                       # nothing was rolled back
    assert (ws.snapshots / "turn-0" / "g").read_text() == "g at turn 0\n"   # the rest still reads


def test_orphan_store_files_are_moved_aside(workspace):
    ws = workspace
    two_turns(ws)
    (ws.store / "content" / "7-12345").write_bytes(b"not named by any row")
    (ws.store / "objects" / "i999999999").write_bytes(b"kept by nobody")
    (ws.store / "objects" / "stray").mkdir()
    out = expect_found(ws, "content/7-12345", "no row names")
    assert "objects/i999999999" in out and "objects/stray is not a name cowfs gives" in out
    lost = ws.store / "lost+found"
    assert (lost / "content-7-12345").read_bytes() == b"not named by any row"   # nothing deleted
    assert (lost / "objects-i999999999").read_bytes() == b"kept by nobody"
    assert (lost / "objects-stray").is_dir()


def test_an_object_in_the_store_that_no_row_names_is_an_orphan(workspace):
    """A real orphan: a file in objects/ under the name of its own inode (as a kept object has),
    that no row names. Only the orphan check can flag it (issue 20: the other test's orphans
    are also misnamed)."""
    ws = workspace
    two_turns(ws)
    made = ws.store / "objects" / "new"
    made.write_bytes(b"kept, but by nobody")
    ino = os.stat(made).st_ino
    os.rename(made, ws.store / "objects" / f"i{ino}")
    out = expect_found(ws, f"objects/i{ino}", "no row names (an orphan)")
    assert "is not a name" not in out and "is inode" not in out
    assert (ws.store / "lost+found" / f"objects-i{ino}").read_bytes() == b"kept, but by nobody"


def test_a_deleted_objects_name_is_found_and_then_answers_eio(workspace):
    ws = workspace
    _, g_ino, _, _ = two_turns(ws)
    os.unlink(ws.store / "objects" / f"i{g_ino}")
    expect_found(ws, f"object {g_ino} ('g'", "is gone")
    ws.mount()
    with pytest.raises(OSError) as e:
        (ws.snapshots / "turn-0" / "g").read_bytes()
    assert e.value.errno == errno.EIO
    assert (ws.snapshots / "turn-0" / "f").read_text() == "f at turn 0\n"


def test_a_second_open_turn_is_sealed(workspace):
    ws = workspace
    _, _, _, turn1 = two_turns(ws)
    catalogue(ws).execute("UPDATE turns SET sealed=NULL WHERE turn=1")
    expect_found(ws, "turn-1 is still open", "only the last turn may be open")
    ws.mount()
    assert tree(ws.snapshots / "turn-1") == turn1
    log = json.loads(ws.cli("log", "--json").stdout)
    assert [t["number"] for t in log if t["sealed"] is None] == [log[-1]["number"]]


def test_rows_of_a_lost_turn_record_get_one_again(workspace):
    ws = workspace
    two_turns(ws)
    catalogue(ws).execute("DELETE FROM turns WHERE turn=1")
    expect_found(ws, "rows of turn-1 exist but its turn record is gone")


@pytest.mark.parametrize("backing", ["xfs"], indirect=True)
def test_a_truncated_catalogue(workspace):
    ws = workspace
    two_turns(ws)
    db = ws.store / "catalogue.db"
    os.truncate(db, db.stat().st_size // 2)
    refused = ws.mount(check=False)
    assert refused.returncode == 2 and not ws.is_mounted()
    assert refused.stderr.count("\n") == 1 and "cowfs fsck --repair" in refused.stderr
    assert "Traceback" not in refused.stderr
    expect_found(ws, "the catalogue catalogue.db is damaged")
    assert (ws.store / "lost+found" / "damaged-catalogue.db").stat().st_size > 0   # kept
    ws.mount()
    assert (ws.path / "f").read_text() == "f at turn 0\nf in turn 1\n"     # the tree is untouched


def test_an_emptied_catalogue_does_not_start_a_new_history_silently(workspace):
    ws = workspace
    two_turns(ws)
    for name in ("catalogue.db", "catalogue.db-wal", "catalogue.db-shm"):
        if (ws.store / name).exists():
            os.truncate(ws.store / name, 0)
    refused = ws.mount(check=False)
    assert refused.returncode == 2 and "catalogue is missing or empty" in refused.stderr
    expect_found(ws, "the catalogue is missing or empty", "the history that named them is lost")
    ws.mount()                                             # a new history: turn 0 is the tree now
    assert tree(ws.snapshots / "turn-0") == tree(ws.path)


def test_fsck_refuses_a_mounted_workspace_and_bad_paths(workspace, tmp_path):
    ws = workspace
    ws.mount()
    out = fsck(ws)
    assert out.returncode == 2 and "is already mounted" in out.stderr and "umount" in out.stderr
    assert out.stderr.count("\n") == 1
    plain = tmp_path / "plain"
    plain.mkdir()
    out = run([*ws.cowfs_cmd, "fsck", plain], check=False)
    assert out.returncode == 2 and "has no cowfs store" in out.stderr
    out = run([*ws.cowfs_cmd, "fsck", tmp_path / "missing"], check=False)
    assert out.returncode == 2 and "is not a directory" in out.stderr
    assert "exit codes" in run([*ws.cowfs_cmd, "fsck", "--help"]).stdout


def test_a_mount_after_a_crash_checks_the_open_turn(workspace):
    """The quick form: a pre-image of the turn the dead daemon left open is gone."""
    ws, p = workspace, workspace.path
    (p / "f").write_text("before\n")
    ws.mount()
    ino = os.stat(p / "f").st_ino
    with open(p / "f", "a") as f:
        f.write("after\n")
    turn = json.loads(ws.cli("status", "--json").stdout)["open_turn"]
    kill_daemon(ws)
    ws.umount()                                            # clears the dead mount
    os.unlink(ws.store / "content" / f"{turn}-{ino}")
    refused = ws.mount(check=False)
    assert refused.returncode == 2 and "after the unclean stop" in refused.stderr
    assert f"content/{turn}-{ino}" in refused.stderr and "cowfs fsck --repair" in refused.stderr
    assert fsck(ws, "--repair").returncode == 0
    assert "recovered" in ws.mount().stderr
    assert (p / "f").read_text() == "before\nafter\n"


@pytest.mark.parametrize("backing", ["xfs"], indirect=True)
def test_a_fault_while_serving_makes_the_next_mount_check(workspace):
    """A pre-image the store should keep vanishes while mounted: the snapshot answers EIO and
    marks the store; the next mount runs the whole check and refuses until a repair."""
    ws = workspace
    f_ino, _, _, _ = two_turns(ws)
    ws.mount()
    pid = json.loads(ws.cli("status", "--json").stdout)["daemon_pid"]
    # The daemon's own mount namespace shows the backing directory, store included.
    os.unlink(f"/proc/{pid}/root{ws.path}/.cowfs/content/1-{f_ino}")
    with pytest.raises(OSError) as e:
        (ws.snapshots / "turn-0" / "f").read_bytes()
    assert e.value.errno == errno.EIO
    ws.umount()
    assert "is gone from the store" in (ws.store / "needs-check").read_text()
    refused = ws.mount(check=False)
    assert refused.returncode == 2 and "noted a fault" in refused.stderr and "is missing" in refused.stderr
    repaired = fsck(ws, "--repair")
    assert repaired.returncode == 0 and "the mark is removed" in repaired.stdout
    assert not (ws.store / "needs-check").exists()
    ws.mount()


def test_the_api_returns_a_typed_report(workspace):
    ws = workspace
    two_turns(ws)
    code = ("import cowfs.api, sys; r = cowfs.api.fsck(sys.argv[1]); "
            "print(r.clean, len(r.problems), r.counts['turns'])")
    out = run([sys.executable, "-c", code, ws.path])
    assert out.stdout.split() == ["True", "0", "4"]
