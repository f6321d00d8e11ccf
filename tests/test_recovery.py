"""A daemon killed with SIGKILL: the dead mount is cleared, the next plain mount recovers, no turn
is lost, and only changes made behind cowfs's back count as drift (issue 12)."""

import errno
import json
import os
import random
import signal
import threading
import time

import pytest

from conftest import run
from treeview import tree


def daemon_pid(ws) -> int:
    return json.loads(ws.cli("status", "--json").stdout)["daemon_pid"]


def kill_daemon(ws) -> None:
    """SIGKILL the daemon and wait until the kernel sees its mount dead (its last thread gone)."""
    os.kill(daemon_pid(ws), signal.SIGKILL)
    deadline = time.monotonic() + 10
    while not is_dead(ws.path):
        assert time.monotonic() < deadline, "the mount still answers 10 s after SIGKILL"
        time.sleep(0.01)


def is_dead(path) -> bool:
    try:
        os.getxattr(path, "user.cowfs.control")
    except OSError as e:
        return e.errno == errno.ENOTCONN
    return False


def turns(ws) -> list[dict]:
    return json.loads(ws.cli("log", "--json").stdout)


def test_umount_clears_a_dead_mount_and_mount_recovers_without_force(workspace):
    ws, p = workspace, workspace.path
    (p / "old").write_text("turn 0\n")
    (p / "olddir").mkdir()
    ws.mount()
    (p / "f").write_text("a\n")
    (p / "d").mkdir()
    (p / "d" / "x").write_text("x\n")
    ws.cli("checkpoint", "-m", "one")
    sealed = tree(ws.snapshots / "turn-1")
    # The open turn: changes of every kind, then the daemon dies.
    with open(p / "f", "a") as f:
        f.write("b\n")
    os.rename(p / "d", p / "e")
    (p / "new").mkdir()
    (p / "new" / "y").write_text("y\n")
    os.link(p / "f", p / "h")
    os.unlink(p / "old")
    os.chmod(p / "e" / "x", 0o600)
    os.chown(p / "olddir", -1, -1)                         # a ctime stamp and nothing else
    live = tree(p)
    kill_daemon(ws)
    assert is_dead(p)

    out = ws.umount()
    assert "cleared the dead mount" in out.stdout and not ws.is_mounted()
    mounted = ws.mount()                                   # no --force
    assert "recovered" in mounted.stderr
    assert tree(p) == live                                 # every completed write is there
    assert tree(ws.snapshots / "turn-1") == sealed
    log = turns(ws)
    assert log[2]["sealed"] is None and log[2]["changes"] > 0   # the crashed turn is kept, open
    ws.cli("rollback", "1")                                # seals it first, then goes back
    assert tree(p) == sealed
    assert tree(ws.snapshots / "turn-2") == live           # ... and the crashed turn is a turn
    ws.cli("rollback", "2")
    assert tree(p) == live


def test_mount_over_a_dead_mount_clears_it(workspace):
    ws, p = workspace, workspace.path
    ws.mount()
    (p / "f").write_text("a\n")
    kill_daemon(ws)
    out = ws.mount()
    assert "cleared the dead mount" in out.stderr and "recovered" in out.stderr
    assert (p / "f").read_text() == "a\n"


def test_a_change_behind_cowfs_back_after_a_crash_is_still_drift(workspace):
    ws, p = workspace, workspace.path
    (p / "f").write_text("a\n")
    (p / "g").write_text("g\n")
    ws.mount()
    (p / "f").write_text("through cowfs\n")
    kill_daemon(ws)
    ws.umount()
    time.sleep(0.01)
    (p / "g").write_text("behind its back\n")               # nothing recorded this
    refused = ws.mount(check=False)
    assert refused.returncode == 2 and "'g'" in refused.stderr and "'f'" not in refused.stderr
    assert not ws.is_mounted()
    ws.mount("--force")


def test_a_mode_or_xattr_change_while_unmounted_is_drift(workspace):
    """Drift is judged by ctime, which every change moves: a chmod or a setxattr made while
    unmounted leaves content and mtime alone, and must be reported all the same (issue 20:
    every other drift test changes content)."""
    ws, p = workspace, workspace.path
    (p / "moded").write_text("m\n")
    (p / "tagged").write_text("t\n")
    ws.mount()
    ws.umount()
    for name, change in (("moded", lambda f: os.chmod(f, 0o600)),
                         ("tagged", lambda f: os.setxattr(f, "user.note", b"behind its back"))):
        time.sleep(0.05)                                 # past unmounted_at, at any clock tick
        mtime = os.stat(p / name).st_mtime_ns
        change(p / name)
        assert os.stat(p / name).st_mtime_ns == mtime    # only ctime says so
        refused = ws.mount(check=False)
        assert refused.returncode == 2 and f"'{name}'" in refused.stderr, refused.stderr
        assert not ws.is_mounted()
        ws.mount("--force")
        ws.umount()


@pytest.mark.parametrize("backing", ["xfs"], indirect=True)
def test_random_kills_during_a_workload(workspace):
    """Kill the daemon at a random moment of a workload, recover, check every turn, many rounds."""
    rounds = int(os.environ.get("COWFS_CRASH_ROUNDS", "3"))
    ws, p = workspace, workspace.path
    rng = random.Random(int(os.environ.get("COWFS_CRASH_SEED", str(random.randrange(1 << 30)))))
    manifests: dict[int, dict] = {}
    ws.mount()
    manifests[0] = tree(ws.snapshots / "turn-0")
    for round_no in range(rounds):
        killer = threading.Timer(rng.uniform(0.05, 0.6), lambda: kill_daemon_quietly(ws))
        killer.start()
        completed = _workload(ws, p, rng, manifests)
        killer.join()
        ws.umount()                                       # clears the dead mount
        ws.mount()                                        # recovers, no --force
        for turn, manifest in manifests.items():
            assert tree(ws.snapshots / f"turn-{turn}") == manifest, (round_no, turn)
        now = tree(p)
        for path, value in completed.items():             # every write that returned is there
            assert now.get(path) == value, (round_no, path)
        last = max(manifests)
        ws.cli("rollback", str(last))
        assert tree(p) == manifests[last]
        for t in turns(ws):
            if t["sealed"] is not None and t["number"] not in manifests:
                manifests[t["number"]] = tree(ws.snapshots / f"turn-{t['number']}")


def kill_daemon_quietly(ws) -> None:
    try:
        kill_daemon(ws)
    except Exception:
        pass


def _workload(ws, p, rng, manifests) -> dict:
    """Random changes and checkpoints until the mount dies; returns {path: tree value} of the files
    whose last write returned (the one in flight at the kill may or may not have happened)."""
    completed: dict = {}
    names = [f"f{i}" for i in range(8)]
    try:
        while True:
            name = other = rng.choice(names)
            op = rng.random()
            if op < 0.5:
                data = os.urandom(rng.randrange(1, 20000))
                with open(p / name, "wb") as f:
                    f.write(data)
                completed[name.encode()] = ("file", data, 0o644)
            elif op < 0.65 and (p / name).exists():
                os.unlink(p / name)
                completed.pop(name.encode(), None)
            elif op < 0.8 and (p / name).exists():
                other = rng.choice(names)
                os.rename(p / name, p / other)
                if name != other:
                    completed[other.encode()] = completed.pop(name.encode(), None)
            else:
                turn = int(ws.cli("checkpoint").stdout.strip().removeprefix("turn-"))
                manifests[turn] = tree(ws.snapshots / f"turn-{turn}")
    except Exception:
        # The op in flight when the daemon died: its paths may hold either state.
        for n in (name, other):
            completed.pop(n.encode(), None)
        return {k: v for k, v in completed.items() if v is not None}


def test_umount_of_a_busy_mount_names_the_holders_and_lazy_detaches(workspace):
    import subprocess
    ws, p = workspace, workspace.path
    ws.mount()
    (p / "f").write_text("a\n")
    as_owner = ["runuser", "-u", ws.user, "--"] if ws.user else []    # a user sees only their own
    shell = subprocess.Popen([*as_owner, "sh", "-c", "echo more >> f; read line; echo late > g"],
                             cwd=p, stdin=subprocess.PIPE)
    try:
        time.sleep(0.3)
        busy = ws.umount(check=False)
        assert busy.returncode == 1 and len(busy.stderr.strip().splitlines()) == 1
        assert f"(sh) has its working directory at {p}" in busy.stderr
        assert "--lazy" in busy.stderr and ws.is_mounted()
        lazy = ws.cli("umount", "--lazy")
        assert "detached" in lazy.stdout and not ws.is_mounted()
        shell.communicate(b"go\n", timeout=30)             # still served after the detach
        assert shell.returncode == 0
    finally:
        shell.kill()
    deadline = time.monotonic() + 10
    while not (p / ".cowfs" / "lock").exists() or _daemon_alive(p):
        assert time.monotonic() < deadline, "the daemon did not stop after its last user left"
        time.sleep(0.05)
    assert (p / "g").read_text() == "late\n"                # the backing tree, unmounted
    ws.mount()
    log = turns(ws)
    assert log[-2]["message"] == "unmount" and log[-2]["sealed"] is not None
    assert (ws.snapshots / f"turn-{log[-2]['number']}" / "g").read_text() == "late\n"


def _daemon_alive(p) -> bool:
    import fcntl
    with open(p / ".cowfs" / "lock", "rb") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def _many_changes(ws, p, count: int) -> tuple[int, dict]:
    """Turn K with *count* files, then a turn that edits, renames and deletes them: a rollback to K
    has much to do. Returns K and its tree."""
    (p / "d").mkdir()
    for i in range(count):
        (p / "d" / f"f{i}").write_text(f"turn K {i}\n")
    k = int(ws.cli("checkpoint").stdout.strip().removeprefix("turn-"))
    for i in range(count):
        name = p / "d" / f"f{i}"
        if i % 3 == 0:
            name.write_text(f"edited {i}\n")
        elif i % 3 == 1:
            os.rename(name, p / "d" / f"g{i}")
        else:
            os.unlink(name)
    (p / "new").mkdir()
    (p / "new" / "x").write_text("x\n")
    ws.cli("checkpoint")
    return k, tree(ws.snapshots / f"turn-{k}")


def _kill_during(ws, argv, delay: float) -> None:
    import subprocess
    command = subprocess.Popen([*ws.cowfs_cmd, *argv], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    time.sleep(delay)
    kill_daemon_quietly(ws)
    command.wait(timeout=60)


@pytest.mark.parametrize("backing", ["xfs"], indirect=True)
def test_kill_during_a_rollback(workspace):
    """After a daemon killed in the middle of a rollback and a plain mount, the live tree is the
    state before the rollback or a state from which the same rollback completes exactly."""
    ws, p = workspace, workspace.path
    ws.mount()
    k, turn_k = _many_changes(ws, p, 1500)
    before = tree(p)
    for delay in (0.05, 0.3):
        _kill_during(ws, ["rollback", "-C", p, str(k)], delay)
        ws.umount()
        assert "recovered" in ws.mount().stderr
        now = tree(p)
        print(f"killed {delay} s into the rollback: the tree is "
              + ("as before" if now == before else "part way"))
        ws.cli("rollback", str(k))
        assert tree(p) == turn_k
        assert tree(ws.snapshots / f"turn-{k}") == turn_k
        ws.cli("rollback", str(k + 1))          # the state before, again, for the next round
        assert tree(p) == before
    ws.umount()
    assert run([*ws.cowfs_cmd, "fsck", p], check=False).returncode == 0


@pytest.mark.parametrize("backing", ["xfs"], indirect=True)
def test_kill_during_an_export(workspace):
    """An export killed half way leaves the live tree as it was; the next export completes, with
    one commit per sealed turn."""
    import subprocess
    ws, p = workspace, workspace.path
    ws.mount()
    _many_changes(ws, p, 1500)
    for i in range(5):
        (p / f"t{i}").write_text(f"{i}\n")
        ws.cli("checkpoint")
    before = tree(p)
    sealed = [t["number"] for t in turns(ws) if t["sealed"] is not None]
    _kill_during(ws, ["export-git", "-C", p], 0.3)
    ws.umount()
    ws.mount()
    assert tree(p) == before
    out = ws.cli("export-git").stdout
    # Finishing it, or finding it finished (a fast machine exports before the kill lands).
    assert f"tip turn-{sealed[-1]} " in out or f"is at turn-{sealed[-1]} " in out, out
    ws.umount()
    log = subprocess.run(["git", "-C", p / ".cowfs" / "git", "log", "--format=%(trailers:key=Cowfs-Turn,valueonly)",
                          "cowfs"], capture_output=True, text=True, check=True).stdout.split()
    assert sorted(map(int, log)) == sealed
    assert run([*ws.cowfs_cmd, "fsck", p], check=False).returncode == 0


def test_files_in_a_directory_made_earlier_in_the_session_are_not_drift(workspace):
    """They were new in their turn, so no row recorded them: the recovery took them for changes
    behind cowfs's back (only a directory of the open turn was allowed for)."""
    ws, p = workspace, workspace.path
    ws.mount()
    (p / "new").mkdir()
    (p / "new" / "x").write_text("x\n")
    ws.cli("checkpoint")
    (p / "f").write_text("f\n")
    kill_daemon(ws)
    ws.umount()
    assert "recovered" in ws.mount().stderr                 # no --force
