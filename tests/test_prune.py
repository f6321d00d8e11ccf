"""`cowfs prune` and the mount's limits, through real mounts on XFS (reflink) and ext4 (copy).

The oracle for what stays is a manifest of each `.snapshots/turn-N` taken right after its
checkpoint (content, type, mode, link target, mtime): a kept turn must still match it byte for
byte after a prune, a remount, a rollback. A pruned turn must be gone from `.snapshots` and
`cowfs log` and refused by name (exit 2, one line naming the oldest turn kept). Freed space is
measured on the backing filesystem (statvfs) where nothing else writes: the session's XFS image.
"""

import errno
import json
import os
import re
import signal
import subprocess
import time

import pytest

import cowfs
from conftest import run
from test_cli import one_line_error
from test_export import commit_tree, git
from test_recovery import daemon_pid, kill_daemon
from treeview import tree

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (FUSE, loop devices)")

MB = 1 << 20


def checkpoint(ws, manifests: dict, message: str = "") -> int:
    turn = int(ws.cli("checkpoint", "-m", message).stdout.strip().removeprefix("turn-"))
    manifests[turn] = tree(ws.snapshots / f"turn-{turn}", mtimes=True)
    return turn


def sealed_turns(ws) -> list[int]:
    return [t["number"] for t in json.loads(ws.cli("log", "--json").stdout) if t["sealed"]]


def listed_turns(ws) -> list[int]:
    return sorted(int(n[5:]) for n in os.listdir(ws.snapshots) if n.startswith("turn-"))


def free_bytes(path) -> int:
    st = os.statvfs(path)
    return st.f_bfree * st.f_frsize


def store_files(ws) -> dict:
    """{path in the store: size} of pre-images, kept objects and the trash (only while unmounted)."""
    out = {}
    for sub in ("content", "objects", "pruned"):
        top = ws.store / sub
        for root, dirs, files in os.walk(top):
            for name in dirs + files:
                full = os.path.join(root, name)
                out[os.path.relpath(full, ws.store)] = os.lstat(full).st_size
    return out


def history(ws, manifests: dict, turns: int, big: int = 2 * MB) -> None:
    """*turns* turns of ordinary work: a big file rewritten each turn, a tree made and deleted,
    renames, a hard link edited through one name, a symlink, a mode change, and a rollback."""
    p = ws.path
    for i in range(turns):
        (p / "big.bin").write_bytes(os.urandom(big))
        d = p / f"tree{i}"
        d.mkdir()
        for j in range(3):
            (d / f"f{j}").write_bytes(os.urandom(64 << 10))
        if i:
            subprocess.run(["rm", "-rf", str(p / f"tree{i - 1}")], check=True)
        (p / "notes.txt").write_text(f"notes of turn {i}\n")
        if i == 1:
            os.link(p / "notes.txt", p / "notes-link")
            os.symlink("notes.txt", p / "sym")
        if i == 2:
            with open(p / "notes-link", "a") as f:
                f.write("through the link\n")
            os.chmod(p / "notes.txt", 0o600)
            os.rename(p / "tree2", p / "moved")
            (p / "moved").rename(p / "tree2")
        checkpoint(ws, manifests, f"work {i}")
    ws.cli("rollback", "2")                 # a rollback turn in the history
    manifests[sealed_turns(ws)[-1]] = tree(ws.snapshots / "latest", mtimes=True)
    (p / "after-rollback").write_text("x\n")
    checkpoint(ws, manifests, "after the rollback")


def numbered_turns(ws, manifests: dict, count: int) -> None:
    """*count* turns, turn i+1 adding f<i> and rewriting `common`."""
    for i in range(count):
        (ws.path / f"f{i}").write_text(f"file {i}\n")
        (ws.path / "common").write_text(f"common {i}\n")
        checkpoint(ws, manifests)


def assert_kept_exact(ws, manifests: dict, kept: list[int]) -> None:
    assert listed_turns(ws) == kept
    assert sealed_turns(ws) == kept
    for turn in kept:
        assert tree(ws.snapshots / f"turn-{turn}", mtimes=True) == manifests[turn], turn


def test_prune_keep_frees_space_and_keeps_the_rest_exact(workspace, request):
    ws, p = workspace, workspace.path
    (p / "start").write_text("turn 0\n")
    ws.mount()
    manifests = {0: tree(ws.snapshots / "turn-0", mtimes=True)}
    history(ws, manifests, 6)
    before = sealed_turns(ws)               # 0..6, the rollback 7, 8
    assert before == list(range(9))
    free = free_bytes(p.parent)

    out = ws.cli("prune", "--keep", "3").stdout
    assert re.match(r"pruned 6 turn\(s\) \(turn-0 \.\. turn-5\); the oldest turn kept is turn-6; "
                    r"freed [\d.]+ (B|KiB|MiB)\n$", out), out
    assert_kept_exact(ws, manifests, [6, 7, 8])
    if "xfs" in request.node.callspec.id:
        # The pre-images of big.bin in layers 2..6 (2 MiB each) went, and the deleted trees;
        # layer 3's shares its extents with the live file (the rollback to turn 2 cloned it).
        assert free_bytes(p.parent) - free >= 7 * MB
    for gone in (0, 3, 5):
        assert not (ws.snapshots / f"turn-{gone}").exists()
        line = one_line_error(ws.cli("rollback", str(gone), check=False), 2)
        assert f"turn {gone} was pruned; the oldest turn kept is turn-6" in line
    log = ws.cli("log").stdout.splitlines()
    assert log[0] == "(turns before turn-6 were pruned)" and log[1].startswith("turn-6 ")

    # Rollback to the oldest kept turn is exact, and so is the rollback of that rollback.
    live = tree(p, mtimes=True)
    ws.cli("rollback", "6")
    assert tree(p, mtimes=True) == manifests[6]
    ws.cli("rollback", str(sealed_turns(ws)[-1] - 1))
    assert tree(p, mtimes=True) == live
    for turn in (6, 7, 8):
        assert tree(ws.snapshots / f"turn-{turn}", mtimes=True) == manifests[turn]
    ws.umount()
    left = store_files(ws)
    assert not any(n.startswith("pruned/") for n in left), left
    assert not any(int(n.split("/")[1].split("-")[0]) <= 6 for n in left if n.startswith("content/"))


def test_pruned_turns_are_refused_everywhere(workspace):
    ws, p = workspace, workspace.path
    ws.mount()
    manifests = {}
    for i in range(4):
        (p / "f").write_text(f"v{i}\n")
        checkpoint(ws, manifests)
    api = cowfs.Workspace(p)
    result = api.prune(keep=2)
    assert (result.removed, result.oldest) == ([0, 1, 2], 3)
    for call in (lambda: api.turn(1), lambda: api.rollback(1), lambda: api.snapshot_path(0),
                 lambda: api.rollback("turn-2")):
        with pytest.raises(cowfs.PrunedTurn) as e:
            call()
        assert e.value.exit_code == 2 and "the oldest turn kept is turn-3" in str(e.value)
    with pytest.raises(cowfs.UnknownTurn) as e:
        api.turn(99)
    assert not isinstance(e.value, cowfs.PrunedTurn)
    assert [t.number for t in api.turns()] == [3, 4, 5]
    assert api.snapshot_path(3).is_dir() and api.status().raw["oldest_turn"] == 3
    # Turn numbers are never reused, and the newest sealed turn is never pruned.
    assert api.prune(keep=1).removed == [3]
    assert api.checkpoint().number == 5 and [t.number for t in api.turns()] == [4, 5, 6]
    (p / "f").write_text("v5\n")
    checkpoint(ws, manifests)
    assert api.prune(older_than=0.001).removed == [4, 5]
    assert [t.number for t in api.turns()] == [6, 7]
    assert tree(ws.snapshots / "turn-6", mtimes=True) == manifests[6]


def test_bad_limits_are_one_line_and_touch_nothing(workspace):
    ws, p = workspace, workspace.path
    ws.mount()
    manifests = {0: tree(ws.snapshots / "turn-0", mtimes=True)}
    (p / "f").write_text("a\n")
    checkpoint(ws, manifests)
    (p / "f").write_text("b\n")
    checkpoint(ws, manifests)
    log = ws.cli("log", "--json").stdout
    for args, words in ((["--keep", "0"], "at least 1"), (["--keep", "x"], "whole number"),
                        (["--keep", "-3"], "whole number"), (["--older-than", "5y"], "not a duration"),
                        (["--older-than", "0d"], "not a duration"), (["--older-than", ""], "not a duration"),
                        (["--max-store", "2X"], "not a size"), (["--max-store", "G"], "not a size"),
                        ([], "needs a limit")):
        line = one_line_error(ws.cli("prune", *args, check=False), 2)
        assert words in line, (args, line)
    assert ws.cli("log", "--json").stdout == log
    assert_kept_exact(ws, manifests, [0, 1, 2])
    other = p.parent / "other"
    other.mkdir()
    for args in (["--keep", "0"], ["--max-store", "lots"], ["--older-than", "1 fortnight"]):
        result = run([*ws.cowfs_cmd, "mount", other, *args], check=False)
        assert "cowfs: error: " in one_line_error(result, 2)
    assert not os.path.exists(other / ".cowfs")


def test_dry_run_changes_nothing(workspace):
    ws, p = workspace, workspace.path
    ws.mount()
    manifests = {}
    for i in range(4):
        (p / "big.bin").write_bytes(os.urandom(MB))
        checkpoint(ws, manifests)
    ws.umount()
    files = store_files(ws)
    ws.mount()
    out = ws.cli("prune", "--keep", "1", "--dry-run").stdout
    assert out.startswith("would prune 4 turn(s) (turn-0 .. turn-3); the oldest turn kept would be "
                          "turn-4; they hold about "), out
    assert " MiB" in out
    assert sealed_turns(ws) == [0, 1, 2, 3, 4]
    ws.umount()
    assert store_files(ws) == files


@pytest.mark.root_only     # the target repository is made by root
def test_export_after_prune(workspace, backing):
    ws, p = workspace, workspace.path
    repo = backing / "review.git"
    run(["git", "init", "-q", "--bare", repo])
    ws.mount()
    manifests = {}
    numbered_turns(ws, manifests, 4)
    ws.cli("export-git", "--to", repo, "--branch", "early")          # turns 0..4 ...
    (p / "f0").unlink()
    checkpoint(ws, manifests)
    ws.cli("export-git", "--to", repo, "--branch", "late")           # ... and 0..5
    early = {n: git(repo, "rev-parse", f"early~{n}").strip() for n in range(4)}
    os.rename(p / "f1", p / "g1")
    checkpoint(ws, manifests)
    (p / "common").write_text("common 6\n")
    checkpoint(ws, manifests)
    ws.cli("prune", "--keep", "2")                                   # keeps turns 6 and 7
    for branch in ("early", "late", "fresh"):
        ws.cli("export-git", "--to", repo, "--branch", branch)
        for turn in (6, 7):
            rev = f"{branch}~{7 - turn}"
            files = {k: v[1] for k, v in commit_tree(repo, rev).items()}
            snap = {k: v[1] for k, v in manifests[turn].items() if v[0] == "file"}
            assert files == snap, (branch, turn)
    # What was exported before stays as it was.
    assert {n: git(repo, "rev-parse", f"early~{n + 2}").strip() for n in range(4)} == early
    assert git(repo, "rev-list", "--count", "fresh").strip() == b"2"
    run(["git", "--git-dir", repo, "fsck", "--strict"])


def test_mount_limits_prune_after_each_checkpoint(workspace):
    ws, p = workspace, workspace.path
    ws.mount("--keep", "3", "--max-store", "3M")
    manifests = {}
    for i in range(8):
        (p / "big.bin").write_bytes(os.urandom(MB))
        start = time.monotonic()
        checkpoint(ws, manifests)
        assert time.monotonic() - start < 5
    deadline = time.monotonic() + 20
    while sealed_turns(ws)[0] < 6 and time.monotonic() < deadline:
        time.sleep(0.1)
    kept = sealed_turns(ws)
    assert kept == [6, 7, 8], kept
    assert_kept_exact(ws, manifests, kept)
    status = json.loads(ws.cli("status", "--json").stdout)
    assert status["oldest_turn"] == 6 and status["auto_prune"]["keep"] == 3
    assert status["store_bytes"] <= 4 * MB
    ws.umount()
    ws.mount()                              # without limits: nothing more goes
    (p / "big.bin").write_bytes(os.urandom(MB))
    checkpoint(ws, manifests)
    time.sleep(0.5)
    assert sealed_turns(ws) == [6, 7, 8, 9]


def test_remount_after_prune(workspace):
    ws, p = workspace, workspace.path
    ws.mount()
    manifests = {}
    history(ws, manifests, 3)
    ws.cli("prune", "--keep", "2")
    kept = sealed_turns(ws)
    ws.umount()
    ws.mount()
    assert_kept_exact(ws, manifests, kept)
    assert "was pruned" in one_line_error(ws.cli("rollback", "1", check=False), 2)
    (p / "new").write_text("n\n")
    assert checkpoint(ws, manifests) == kept[-1] + 1     # the turn that was open
    ws.cli("rollback", str(kept[0]))
    assert tree(p, mtimes=True) == manifests[kept[0]]


def test_prune_after_crash_recovery_and_a_crash_after_prune(workspace):
    ws, p = workspace, workspace.path
    ws.mount()
    manifests = {}
    for i in range(4):
        (p / "f").write_text(f"v{i}\n" * 1000)
        checkpoint(ws, manifests)
    (p / "pending").write_text("open turn\n")
    kill_daemon(ws)
    ws.cli("umount")
    ws.mount()                              # recovers the open turn 5
    ws.cli("prune", "--keep", "2")
    assert_kept_exact(ws, manifests, [3, 4])
    assert (p / "pending").read_text() == "open turn\n"
    # Turns of this session whose rows a prune removes: those rows told the recovery that
    # these changes went through the daemon. A crash now must still recover without --force.
    for i in range(5, 9):
        (p / f"g{i}").write_text(f"turn {i}\n")
        checkpoint(ws, manifests)
    ws.cli("prune", "--keep", "2")
    (p / "after").write_text("after the prune\n")
    kill_daemon(ws)
    ws.cli("umount")
    ws.mount()
    assert_kept_exact(ws, manifests, [7, 8])
    assert (p / "after").read_text() == "after the prune\n"
    assert checkpoint(ws, manifests) == 9


def test_prune_interrupted_is_finished_at_the_next_mount(workspace):
    """A prune that died leaves `pruned/`: what a row still needs goes back, the rest goes."""
    ws, p = workspace, workspace.path
    ws.mount()
    manifests = {0: tree(ws.snapshots / "turn-0", mtimes=True)}
    (p / "gone").write_text("deleted in turn 2\n")
    for i in range(3):
        (p / "f").write_text(f"v{i}\n")
        if i == 1:
            (p / "gone").unlink()                        # into objects/, whole
        checkpoint(ws, manifests)
    ws.umount()
    content = sorted(os.listdir(ws.store / "content"))
    kept = os.listdir(ws.store / "objects")
    assert content and len(kept) == 1
    trash = ws.store / "pruned"
    trash.mkdir()
    os.rename(ws.store / "content" / content[0], trash / ("c" + content[0]))  # still needed
    os.rename(ws.store / "objects" / kept[0], trash / kept[0])                # still needed
    (trash / "c1-999").write_text("garbage")
    (trash / "i424242").mkdir()
    (trash / "i424242" / "junk").write_text("garbage")
    ws.mount()
    assert_kept_exact(ws, manifests, [0, 1, 2, 3])
    ws.umount()
    assert os.listdir(trash) == [] and content[0] in os.listdir(ws.store / "content")
    assert os.listdir(ws.store / "objects") == kept


def test_a_directory_a_rollback_left_in_the_store_is_freed_whole(workspace, request):
    ws, p = workspace, workspace.path
    ws.mount()
    manifests = {0: tree(ws.snapshots / "turn-0", mtimes=True)}
    (p / "d" / "sub").mkdir(parents=True)
    for i in range(20):
        (p / "d" / "sub" / f"f{i}").write_bytes(os.urandom(256 << 10))
    (p / "d" / "top").write_text("v1\n")
    checkpoint(ws, manifests)
    (p / "d" / "top").write_text("v2\n")                # a recorded object inside d
    checkpoint(ws, manifests)
    ws.cli("rollback", "0")                              # d goes into the store, whole
    (p / "after").write_text("x\n")
    checkpoint(ws, manifests)
    ws.umount()
    assert len(os.listdir(ws.store / "objects")) == 1
    ws.mount()
    free = free_bytes(p.parent)
    ws.cli("prune", "--keep", "1")
    if "xfs" in request.node.callspec.id:
        assert free_bytes(p.parent) - free >= 20 * (256 << 10)
    assert_kept_exact(ws, manifests, [4])
    ws.cli("rollback", "4")
    assert tree(p, mtimes=True) == manifests[4]
    ws.umount()
    assert os.listdir(ws.store / "objects") == [] and os.listdir(ws.store / "pruned") == []


def test_a_pruned_snapshot_in_use_is_refused_not_replaced(workspace):
    ws, p = workspace, workspace.path
    (p / "f").write_text("turn 0\n")
    ws.mount()
    manifests = {}
    (p / "f").write_text("turn 1\n")
    checkpoint(ws, manifests)
    (p / "f").write_text("turn 2\n")
    checkpoint(ws, manifests)
    old = ws.snapshots / "turn-1"
    assert (old / "f").read_text() == "turn 1\n"         # the kernel caches it now
    fd = os.open(old / "f", os.O_RDONLY)
    holder = subprocess.Popen(["sleep", "60"], cwd=old)
    try:
        ws.cli("prune", "--keep", "1")
        assert not old.exists()
        with pytest.raises(OSError) as e:
            os.listdir(f"/proc/{holder.pid}/cwd")
        assert e.value.errno in (errno.ESTALE, errno.ENOENT)
        try:
            data = os.pread(fd, 100, 0)
        except OSError as e:
            assert e.errno == errno.ESTALE
        else:
            assert data == b"turn 1\n"         # from the page cache: right, never the live file
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        os.close(fd)
    assert_kept_exact(ws, manifests, [2])


def test_max_store_frees_oldest_first(workspace):
    ws, p = workspace, workspace.path
    ws.mount()
    manifests = {}
    for i in range(6):
        (p / f"file{i}").write_bytes(os.urandom(MB))
        if i:
            os.unlink(p / f"file{i - 1}")                # into the store, whole
        checkpoint(ws, manifests)
    result = cowfs.Workspace(p).prune(max_store="2.5M")
    assert result.removed == [0, 1, 2, 3] and result.store_bytes <= 2.5 * MB, result
    assert_kept_exact(ws, manifests, [4, 5, 6])
    assert cowfs.Workspace(p).prune(max_store="100G").removed == []


# -- without a mount: the limits and the plan ---------------------------------------------------
@pytest.mark.parametrize("text, seconds", [("30m", 1800), ("12h", 43200), ("7d", 604800),
                                           ("2w", 1209600), ("90s", 90), ("1.5h", 5400)])
def test_durations(text, seconds):
    from cowfs.retention import parse_duration
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text, size", [("500M", 500 * MB), ("2G", 2 << 30), ("1.5GiB", 3 << 29),
                                        ("4096", 4096), ("64k", 64 << 10), ("10MB", 10 * MB)])
def test_sizes(text, size):
    from cowfs.retention import parse_size
    assert parse_size(text) == size


def test_plan_keeps_the_newest_sealed_turn_and_takes_the_strictest_limit():
    from cowfs.catalogue import Turn
    from cowfs.retention import Limits, Usage, boundary
    now = 1_000_000.0
    turns = [Turn(n, now - 1000 + n * 100, now - 1000 + n * 100, "", "turn", None, 0, 0)
             for n in range(3, 10)] + [Turn(10, now, None, "", "turn", None, 0, 0)]   # 10 is open
    assert boundary(turns, Limits(keep=3), now, None) == 7
    assert boundary(turns, Limits(keep=100), now, None) == 3
    assert boundary(turns, Limits(older_than=250), now, None) == 8     # sealed at now-200 and later
    assert boundary(turns, Limits(older_than=1), now, None) == 9       # never the newest sealed
    usage = Usage([(4, 10), (5, 10), (7, 10), (9, 10), (1 << 62, 10)])
    assert boundary(turns, Limits(max_store=30), now, usage) == 5
    assert boundary(turns, Limits(max_store=5), now, usage) == 9       # cannot fit: as far as allowed
    assert boundary(turns, Limits(keep=6, max_store=30), now, usage) == 5
    assert boundary(turns, Limits(keep=2, max_store=30), now, usage) == 8


def _random_step(rng, p) -> None:
    """One change of ordinary work, chosen by *rng*, on the tree under *p*."""
    files = sorted(x for x in p.rglob("*") if x.is_file() and not x.is_symlink())
    dirs = [p] + sorted(x for x in p.rglob("*") if x.is_dir() and not x.is_symlink())
    where = rng.choice(dirs)
    kind = rng.choice(["new", "new", "edit", "append", "unlink", "rename", "mkdir", "rmtree",
                       "link", "chmod", "symlink"])
    name = where / f"n{rng.randrange(1000)}"
    if kind == "new" and not name.exists():
        name.write_bytes(os.urandom(rng.choice([10, 5000, 300_000])))
    elif kind == "mkdir" and not name.exists():
        name.mkdir()
    elif kind == "symlink" and not name.exists():
        os.symlink(f"target{rng.randrange(3)}", name)
    elif not files:
        return
    elif kind == "edit":
        rng.choice(files).write_bytes(os.urandom(rng.choice([10, 5000])))
    elif kind == "append":
        with open(rng.choice(files), "ab") as f:
            f.write(b"more\n")
    elif kind == "unlink":
        rng.choice(files).unlink()
    elif kind == "rename" and not name.exists():
        os.rename(rng.choice(files + dirs[1:]), name)     # into itself: EINVAL
    elif kind == "rmtree" and len(dirs) > 1:
        subprocess.run(["rm", "-rf", str(rng.choice(dirs[1:]))], check=True)
    elif kind == "link" and not name.exists():
        os.link(rng.choice(files), name)
    elif kind == "chmod":
        os.chmod(rng.choice(files), rng.choice([0o600, 0o644, 0o755]))


SEEDS = [int(s) for s in os.environ.get("COWFS_PRUNE_SEEDS", "1,2,3").split(",")]


@pytest.mark.parametrize("seed", SEEDS)
def test_random_histories_with_prunes(workspace, seed):
    """Random work, checkpoints, rollbacks and prunes: every kept snapshot stays its manifest,
    and a rollback to any kept turn makes the live tree exactly that."""
    import random
    rng = random.Random(seed)
    ws, p = workspace, workspace.path
    ws.mount()
    manifests = {0: tree(ws.snapshots / "turn-0", mtimes=True)}
    for step in range(40):
        for _ in range(rng.randrange(1, 6)):
            try:
                _random_step(rng, p)
            except OSError as e:
                assert e.errno in (errno.EINVAL, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR,
                                   errno.EEXIST, errno.ENOENT), e
        checkpoint(ws, manifests)
        kept = sealed_turns(ws)
        if rng.random() < 0.2:
            target = rng.choice(kept)
            ws.cli("rollback", str(target))
            assert tree(p, mtimes=True) == manifests[target], (seed, step, target)
            manifests[sealed_turns(ws)[-1]] = tree(ws.snapshots / "latest", mtimes=True)
        if rng.random() < 0.25:
            ws.cli("prune", "--keep", str(rng.randrange(1, 6)))
            kept = sealed_turns(ws)
            for turn in kept:
                assert tree(ws.snapshots / f"turn-{turn}", mtimes=True) == manifests[turn], \
                    (seed, step, turn)
    if rng.random() < 0.5:
        ws.umount()
        ws.mount()
    kept = sealed_turns(ws)
    assert_kept_exact(ws, manifests, kept)
    ws.cli("rollback", str(kept[0]))
    assert tree(p, mtimes=True) == manifests[kept[0]]


def test_diff_restore_and_log_after_prune(workspace):
    """Pruned turns are refused by diff and restore too; what is kept still diffs, restores and
    lists its changes; the attribution rows of the pruned turns go with them."""
    import sqlite3
    ws, p = workspace, workspace.path
    ws.mount()
    manifests = {}
    numbered_turns(ws, manifests, 5)
    ws.cli("prune", "--keep", "2")                           # keeps turns 4 and 5
    for args in (["diff", "2"], ["diff", "1", "4"], ["diff", "4", "3"], ["restore", "3", "common"]):
        line = one_line_error(ws.cli(*args, check=False), 2)
        assert "was pruned; the oldest turn kept is turn-4" in line, (args, line)
    out = ws.cli("diff", "4", "5").stdout
    assert "-common 3" in out and "+common 4" in out and "+file 4" in out
    ws.cli("restore", "4", "common")
    assert (p / "common").read_text() == "common 3\n"        # turn 4's
    log = ws.cli("log", "-v").stdout
    assert log.startswith("(turns before turn-4 were pruned)\n") and "f4" in log
    ws.umount()
    db = sqlite3.connect(ws.store / "catalogue.db")
    for table in ("entries", "attrs", "entry_writers", "object_writers", "processes"):
        assert db.execute(f"SELECT count(*) FROM {table} WHERE turn<=4").fetchone() == (0,), table
    db.close()
