"""cowfs without root (issue 11): an ordinary user mounts and uses it; a root mount
serves the user it was made for and nobody else.

cowfs runs as TEST_USER through `runuser` (root only prepared the backing
directory); OTHER_USER is a third party. The whole README workflow runs as
TEST_USER in one shell, so every file operation is unprivileged too.
"""

import os
import signal
import subprocess
import sys
import time

import pytest
from cowfs.catalogue import FORMAT_VERSION
from conftest import OTHER_USER, TEST_USER, Workspace, as_user, chown_tree, run

COWFS = f"{sys.executable} -m cowfs"
# Each test picks who mounts; the "xfs-rootless" backing would only repeat them.
pytestmark = pytest.mark.parametrize("backing", ["xfs", "ext4"], indirect=True)


@pytest.fixture
def user_ws(backing, test_users):
    backing.chmod(0o755)
    ws = Workspace(backing / "proj", user=TEST_USER)
    yield ws
    ws.cleanup()


def sh(user: str, script: str, check=True, timeout=120):
    """Run a bash *script* as *user* (set -e: the first failing command fails it)."""
    return run([*as_user(user), "bash", "-ec", script], check=check, timeout=timeout)


def test_readme_workflow_without_privilege(user_ws):
    """mount, turns, .snapshots, rollback (and of a rollback), export-git, umount, remount,
    with no privilege; a directory renamed after a child was edited, a removed file."""
    ws, p = user_ws, user_ws.path
    ws.path.chmod(0o755)
    (p / "a").write_text("hello\n")
    (p / "d").mkdir()
    (p / "d" / "f").write_text("x\n")
    chown_tree(p, TEST_USER)
    out = sh(TEST_USER, f"""
        C="{COWFS}"; P={p}; cd /
        $C mount $P
        echo turn1 >> $P/a; mkdir $P/e; echo y > $P/e/g
        $C checkpoint -C $P -m one
        echo edit >> $P/d/f; mv $P/d $P/d2; echo again >> $P/d2/f; rm $P/e/g
        $C checkpoint -C $P -m two
        $C log -C $P
        $C export-git -C $P
        $C umount $P
        $C mount $P
        echo "t0:$(cat $P/.snapshots/turn-0/d/f)"
        echo "t1:$(cat $P/.snapshots/turn-1/e/g)"
        $C rollback -C $P 0
        echo "r0:$(ls $P) $(cat $P/a)"
        $C rollback -C $P 2
        echo "r2:$(ls $P) $(cat $P/d2/f | tr '\\n' ' ')"
        $C status -C $P --json
        $C umount $P
        """).stdout
    assert "t0:x\n" in out and "t1:y\n" in out
    assert "r0:a\nd hello\n" in out
    assert "r2:a\nd2\ne x edit again \n" in out
    assert "exported 3 turn(s)" in out
    assert '"from_daemon"' not in out       # no request of the daemon reached its own mount
    assert not ws.is_mounted()


def test_only_the_user_reaches_a_rootless_mount(user_ws):
    """Without --allow-other, not even root passes; OTHER_USER can neither read nor command."""
    ws, p = user_ws, user_ws.path
    (p / "f").write_text("mine\n")
    ws.mount()
    with pytest.raises(PermissionError):
        os.listdir(p)
    other = sh(OTHER_USER, f"ls {p}", check=False)
    assert other.returncode != 0
    cmd = run([*as_user(OTHER_USER), *ws.cowfs_cmd[len(as_user(TEST_USER)):], "log", "-C", p],
              check=False)
    assert cmd.returncode == 1 and cmd.stderr.count("\n") == 1, cmd.stderr
    assert sh(TEST_USER, f"cat {p}/f").stdout == "mine\n"
    ws.umount()


@pytest.mark.parametrize("how", ["--owner", "SUDO_UID"])
def test_root_mount_serves_its_owner_only(backing, test_users, how):
    """`sudo cowfs mount`: the owner runs every command (umount too); a third user is refused
    with one line and exit 1, root is served."""
    ws = Workspace(backing / "proj")
    p = ws.path
    p.chmod(0o777)
    (p / "f").write_text("x\n")
    import pwd
    uid = pwd.getpwnam(TEST_USER).pw_uid
    try:
        if how == "--owner":
            ws.mount("--owner", TEST_USER)
        else:
            ws.mount(env={"SUDO_UID": str(uid)})
        out = sh(TEST_USER, f"""
            C="{COWFS}"; P={p}; cd /
            echo new > $P/g; stat -c %U $P/g
            $C checkpoint -C $P -m by-owner
            $C log -C $P | head -2 | tail -1
            """).stdout
        assert out.startswith(f"{TEST_USER}\nturn-1\nturn-1")
        denied = sh(OTHER_USER, f'{COWFS} checkpoint -C {p}', check=False)
        assert (denied.returncode, denied.stderr) == (1, "cowfs: error: permission denied\n")
        assert "turn-1" in ws.cli("log").stdout          # root is served
        sh(TEST_USER, f"{COWFS} umount {p}")
        assert not ws.is_mounted()
    finally:
        ws.cleanup()


def test_daemon_never_reaches_its_own_mount(user_ws):
    """strace the rootless daemon through checkpoints, rollbacks, exports and browsing:
    no path it opens, stats or binds names its own mount (it would wait for itself)."""
    ws, p = user_ws, user_ws.path
    (p / "d").mkdir()
    (p / "d" / "f").write_text("x\n")
    ws.mount()
    pid = int(run(["pgrep", "-u", TEST_USER, "-f", f"cowfs mount {p} "]).stdout.split()[0])
    log = p.parent / "strace.log"
    tracer = subprocess.Popen(["strace", "-f", "-qq", "-e", "trace=%file,%desc,%network",
                               "-o", log, "-p", str(pid)], stderr=subprocess.DEVNULL)
    try:
        time.sleep(1)           # attached
        sh(TEST_USER, f"""
            C="{COWFS}"; P={p}; cd /
            echo y >> $P/d/f; mv $P/d $P/e; rm $P/e/f
            $C checkpoint -C $P; cat $P/.snapshots/turn-0/d/f > /dev/null
            $C export-git -C $P; $C rollback -C $P 0; $C rollback -C $P 1
            $C status -C $P > /dev/null; $C checkpoint -C $P
            """)
    finally:
        tracer.send_signal(signal.SIGINT)
        tracer.wait(timeout=30)
    ws.umount()
    calls = log.read_text(errors="replace").splitlines()
    assert len(calls) > 50, "strace saw nothing"
    inside = [c for c in calls if f'"{p}/' in c or f'"{p}"' in c]
    assert inside == []


def test_a_format_1_store_is_read_without_its_file_handles(workspace):
    """Stores made when objects were reached by file handle (format 1, root only) mount
    again: their rows are found by inode number, the handles are no longer read."""
    import sqlite3
    ws, p = workspace, workspace.path
    (p / "d").mkdir()
    (p / "d" / "f").write_text("v0\n")
    ws.mount()
    (p / "d" / "f").write_text("v1\n")
    os.rename(p / "d", p / "e")
    ws.cli("checkpoint")
    ws.umount()
    db = sqlite3.connect(ws.store / "catalogue.db")
    with db:
        db.execute("UPDATE meta SET value='1' WHERE key='format'")
        db.execute("UPDATE objects SET handle=x'0102030405060708'")     # a stale handle
    db.close()
    ws.mount()
    assert (ws.snapshots / "turn-0" / "d" / "f").read_text() == "v0\n"
    assert (p / "e" / "f").read_text() == "v1\n"
    ws.umount()
    db = sqlite3.connect(ws.store / "catalogue.db")
    assert db.execute("SELECT value FROM meta WHERE key='format'").fetchone() == (FORMAT_VERSION,)
    db.close()
