"""`cowfs export-git`: every exported commit must equal its `.snapshots/turn-N` byte for byte.

Real mounts on XFS (reflink) and ext4 (copy). The oracle is the snapshot
itself (test_model.py checks snapshots against an independent model): the
tree of the commit of turn N, read back with `git ls-tree -r -z` and
`git cat-file`, must hold exactly the files and symlinks of
`.snapshots/turn-N`, with the same names (bytes), modes (100644, 100755,
120000), contents and link targets.
"""

import errno
import itertools
import json
import os
import re
import stat
import subprocess
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import Workspace, run

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (FUSE, loop devices)")

# Random histories per backing: ~2 s each. COWFS_HYPOTHESIS_PROFILE=long runs many more.
HYPOTHESIS_EXAMPLES = int(os.environ.get(
    "COWFS_EXPORT_EXAMPLES", "300" if os.environ.get("COWFS_HYPOTHESIS_PROFILE") == "long" else "12"))


# -- reading both sides --------------------------------------------------------------------------
def git(repo, *args, check=True) -> bytes:
    # cwd "/": a file named like the branch in the cwd would make revisions ambiguous.
    result = subprocess.run(["git", "--git-dir", os.fspath(repo), *args], capture_output=True, cwd="/")
    if check and result.returncode != 0:
        raise AssertionError(f"git {args}: {result.stderr.decode(errors='replace')}")
    return result.stdout


def commit_tree(repo, rev) -> dict:
    """{path (bytes): (mode (bytes), content or link target)} of commit *rev*."""
    entries = []
    for record in git(repo, "ls-tree", "-r", "-z", "--full-tree", rev).split(b"\0"):
        if record:
            meta, path = record.split(b"\t", 1)
            mode, kind, sha = meta.split()
            assert kind == b"blob", record
            entries.append((path, mode, sha))
    blobs = cat_blobs(repo, {sha for _, _, sha in entries})
    return {path: (mode, blobs[sha]) for path, mode, sha in entries}


def cat_blobs(repo, shas) -> dict:
    shas = sorted(shas)
    out = subprocess.run(["git", "--git-dir", os.fspath(repo), "cat-file", "--batch"],
                         input=b"".join(s + b"\n" for s in shas), capture_output=True, check=True).stdout
    blobs, pos = {}, 0
    for sha in shas:
        header_end = out.index(b"\n", pos)
        size = int(out[pos:header_end].split()[2])
        blobs[sha] = out[header_end + 1:header_end + 1 + size]
        pos = header_end + 1 + size + 1
    return blobs


def snapshot_tree(root) -> tuple[dict, int]:
    """What git can hold of the tree at *root*, as commit_tree shows it; and its empty directories."""
    root = os.fsencode(root)
    files, empty = {}, 0
    stack = [b""]
    while stack:
        rel = stack.pop()
        names = os.listdir(os.path.join(root, rel) if rel else root)
        if rel and not names:
            empty += 1
        for name in names:
            path = os.path.join(rel, name) if rel else name
            full = os.path.join(root, path)
            st_ = os.lstat(full)
            if stat.S_ISDIR(st_.st_mode):
                stack.append(path)
            elif stat.S_ISLNK(st_.st_mode):
                files[path] = (b"120000", os.readlink(full))
            elif stat.S_ISREG(st_.st_mode):
                with open(full, "rb") as f:
                    files[path] = (b"100755" if st_.st_mode & 0o111 else b"100644", f.read())
    return files, empty


def commits(repo, branch="cowfs") -> dict:
    """{turn: sha} of every commit on *branch*, from its Cowfs-Turn trailer."""
    out = git(repo, "log", "-z", "--format=%H %(trailers:key=Cowfs-Turn,valueonly,separator=)", branch)
    result = {}
    for record in out.decode().split("\0"):
        if record.strip():
            sha, turn = record.split()
            result[int(turn)] = sha
    return result


def assert_commits_equal_snapshots(ws, repo, branch="cowfs") -> dict:
    exported = commits(repo, branch)
    sealed = sealed_turns(ws)
    assert sorted(exported) == sealed
    for turn, sha in exported.items():
        expected, _ = snapshot_tree(ws.snapshots / f"turn-{turn}")
        actual = commit_tree(repo, sha)
        assert actual.keys() == expected.keys(), f"turn-{turn}: names differ"
        for path in expected:
            assert actual[path] == expected[path], f"turn-{turn}: {path!r} differs"
    return exported


def sealed_turns(ws) -> list[int]:
    return [t["number"] for t in json.loads(ws.cli("log", "--json").stdout) if t["sealed"]]


# -- driving cowfs -------------------------------------------------------------------------------
def checkpoint(ws, message="") -> int:
    return int(ws.cli("checkpoint", "-m", message).stdout.strip().removeprefix("turn-"))


def export(ws, *args, check=True):
    return ws.cli("export-git", *args, check=check)


def exported_lines(out: str) -> dict:
    """{turn: (sha7, written, deleted)} from export-git's output."""
    found = {}
    for m in re.finditer(r"^turn-(\d+) -> ([0-9a-f]{7})  \((\d+) written, (\d+) deleted", out, re.M):
        found[int(m[1])] = (m[2], int(m[3]), int(m[4]))
    return found


def write(path, data: bytes, mode="wb") -> None:
    with open(path, mode) as f:
        f.write(data)


@pytest.fixture
def repo(backing):
    """An empty bare repository outside the workspace."""
    path = backing / "out.git"
    run(["git", "init", "--quiet", "--bare", path])
    return path


def daemon_view(ws, path: str) -> Path:
    """*path* inside the backing directory, as the daemon sees it (.cowfs is hidden through the mount)."""
    pid = json.loads(ws.cli("status", "--json").stdout)["daemon_pid"]
    return Path(f"/proc/{pid}/root{ws.path}") / path


# -- histories -------------------------------------------------------------------------------------
def test_history_with_renames_links_modes_deletions_and_rollbacks(workspace, repo):
    ws, p = workspace, workspace.path
    (p / "src").mkdir()
    write(p / "src" / "app.py", b"print('v0')\n")
    write(p / "src" / "util.py", b"def f(): pass\n")
    write(p / "README", b"readme v0\n")
    (p / "keep").mkdir()
    write(p / "keep" / "x", b"x\n")
    ws.mount()
    root = os.fsencode(p)
    # turn 1: a directory renamed after its children were edited, and edited again after
    write(p / "src" / "app.py", b"print('edited before rename')\n")
    os.rename(p / "src", p / "lib")
    write(p / "lib" / "util.py", b"# appended\n", "ab")
    os.symlink("lib/app.py", p / "link")
    os.symlink("does/not/exist", p / "dangling")
    os.chmod(p / "README", 0o755)
    write(os.path.join(root, b"latin1-\xe9\xff"), b"not utf-8\n")
    write(os.path.join(root, b"new\nline \"quoted\" \\"), b"newline\n")
    (p / "empty" / "deeper").mkdir(parents=True)
    os.mkfifo(p / "pipe")
    os.link(p / "keep" / "x", p / "x.link")
    checkpoint(ws, "one")
    # turn 2: hard link edited in place through one name; symlink retargeted; deletions
    write(p / "x.link", b"changed through the link\n", "r+b")
    os.unlink(p / "link")
    os.symlink("README", p / "link")
    os.unlink(p / "dangling")
    os.chmod(p / "README", 0o644)
    os.chmod(p / "lib" / "util.py", 0o700)
    os.rmdir(p / "empty" / "deeper")
    checkpoint(ws, "two\n\nwith a body")
    # turn 3: file renamed over another, file replaced by a directory, directory moved down
    os.rename(p / "lib" / "util.py", p / "lib" / "app.py")
    os.unlink(p / "README")
    (p / "README").mkdir()
    write(p / "README" / "inside", b"inside\n")
    os.rename(p / "lib", p / "keep" / "lib")
    write(p / "keep" / "lib" / "app.py", b"edited after the move\n", "ab")
    checkpoint(ws)
    ws.cli("rollback", "1")
    write(p / "after-rollback", b"new\n")
    ws.cli("rollback", "0")

    out = export(ws, "--to", repo).stdout
    exported = assert_commits_equal_snapshots(ws, repo)
    turns = sealed_turns(ws)
    assert sorted(exported_lines(out)) == turns
    assert "empty directories" in out and "FIFO" in out
    # Rollback turns are ordinary commits whose tree is the target's.
    log = {t["number"]: t for t in json.loads(ws.cli("log", "--json").stdout)}
    for turn, t in log.items():
        if t["kind"] == "rollback":
            assert git(repo, "rev-parse", f"{exported[turn]}^{{tree}}") == \
                git(repo, "rev-parse", f"{exported[t['target']]}^{{tree}}")
    # Message, trailer, identity and dates.
    for turn, sha in exported.items():
        body = git(repo, "show", "-s", "--format=%an <%ae>|%cn <%ce>|%at|%ct|%B", sha).decode()
        who, committer, at, ct, message = body.split("|", 4)
        assert who == committer == "cowfs <cowfs@localhost>"
        assert at == ct == str(int(log[turn]["sealed"]))
        expected = log[turn]["message"] or f"turn {turn}"
        assert message.rstrip("\n") == f"{expected}\n\nCowfs-Turn: {turn}"
    # Parents follow the turns.
    assert git(repo, "rev-list", "--first-parent", "--reverse", "cowfs").decode().split() == \
        [exported[t] for t in turns]


def test_batch_export_after_later_renames_deletions_and_rollbacks(workspace, repo):
    """Turns exported long after they were sealed: the layers after them moved things on."""
    ws, p = workspace, workspace.path
    write(p / "a", b"first\n")
    (p / "d" / "e").mkdir(parents=True)
    write(p / "d" / "e" / "f", b"f\n")
    write(p / "moved", b"moved\n")
    ws.mount()
    # turn 1: a file truncated through one of two hard links, which a rollback later undoes
    # while removing the other name; children of a directory deleted in a later turn
    os.link(p / "a", p / "b")
    write(p / "a", b"")
    write(p / "d" / "e" / "f", b"edited\n", "ab")
    write(p / "d" / "e" / "g", b"g\n")
    write(p / "moved", b"edited before the move\n", "ab")
    checkpoint(ws)
    ws.cli("rollback", "0")
    # later turns: a rename, a deletion of the whole directory, the restored file unlinked
    os.rename(p / "moved", p / "renamed")
    subprocess.run(["rm", "-rf", p / "d"], check=True)
    checkpoint(ws)
    os.unlink(p / "a")
    checkpoint(ws)
    export(ws, "--to", repo)
    assert_commits_equal_snapshots(ws, repo)


def test_dot_git_directories_are_left_out(workspace, repo):
    ws, p = workspace, workspace.path
    run(["git", "init", "--quiet", p])
    write(p / "tracked", b"t\n")
    ws.mount()
    write(p / "tracked", b"t2\n")
    run(["git", "-C", p, "add", "tracked"])
    checkpoint(ws)
    out = export(ws, "--to", repo).stdout
    assert ".git" in out
    for turn, sha in commits(repo).items():
        tree = commit_tree(repo, sha)
        assert not any(path.split(b"/")[0] == b".git" for path in tree)
        expected, _ = snapshot_tree(ws.snapshots / f"turn-{turn}")
        assert tree == {k: v for k, v in expected.items() if not k.startswith(b".git/")}


# -- incremental, targets, refusals ------------------------------------------------------------------
def test_incremental_export_only_exports_new_turns(workspace, repo):
    ws, p = workspace, workspace.path
    write(p / "a", b"a\n")
    ws.mount()
    write(p / "b", b"b\n")
    checkpoint(ws)
    first = exported_lines(export(ws, "--to", repo).stdout)
    assert sorted(first) == [0, 1]
    before = commits(repo)
    again = export(ws, "--to", repo).stdout
    assert exported_lines(again) == {} and "nothing to export" in again
    write(p / "a", b"a2\n", "ab")
    os.unlink(p / "b")
    checkpoint(ws)
    write(p / "c", b"c\n")
    checkpoint(ws)
    second = exported_lines(export(ws, "--to", repo).stdout)
    assert sorted(second) == [2, 3]
    assert second[2][1:] == (1, 1) and second[3][1:] == (1, 0)
    after = assert_commits_equal_snapshots(ws, repo)
    assert {t: after[t] for t in before} == before
    # Commits are deterministic: a branch deleted by someone is made again, identical.
    git(repo, "branch", "-D", "cowfs")
    export(ws, "--to", repo)
    assert commits(repo) == after


def test_to_an_existing_repository_touches_nothing_else(workspace, backing):
    ws, p = workspace, workspace.path
    other = backing / "other"
    run(["git", "init", "--quiet", "-b", "main", other])
    write(other / "mine", b"mine\n")
    run(["git", "-C", other, "add", "mine"])
    run(["git", "-C", other, "-c", "user.name=u", "-c", "user.email=u@x", "commit", "-qm", "mine"])
    run(["git", "-C", other, "branch", "feature"])
    refs_before = run(["git", "-C", other, "for-each-ref"]).stdout
    head_before = (other / ".git" / "HEAD").read_bytes()
    write(p / "f", b"f\n")
    ws.mount()
    write(p / "f", b"f2\n")
    checkpoint(ws)
    export(ws, "--to", other)
    refs_after = run(["git", "-C", other, "for-each-ref"]).stdout.splitlines()
    assert [r for r in refs_after if not r.endswith("refs/heads/cowfs")] == refs_before.splitlines()
    assert (other / ".git" / "HEAD").read_bytes() == head_before
    assert run(["git", "-C", other, "status", "--porcelain"]).stdout == ""
    assert_commits_equal_snapshots(ws, other / ".git")
    # The checked-out branch is refused: its worktree would look changed.
    r = export(ws, "--to", other, "--branch", "main", check=False)
    assert r.returncode == 2 and "checked out" in r.stderr and len(r.stderr.splitlines()) == 1


def test_to_a_repository_on_another_filesystem_owned_by_a_user(workspace, backing):
    """The daemon lives in a mount namespace of its own: a repository on a filesystem mounted
    after it started is reached where the user named it, and written as its owner."""
    ws, p = workspace, workspace.path
    ws.mount()
    write(p / "f", b"f\n")
    checkpoint(ws)
    elsewhere = backing / "elsewhere"
    elsewhere.mkdir()
    run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0755,uid=1234,gid=1234", "tmpfs", elsewhere])
    try:
        run(["setpriv", "--reuid=1234", "--regid=1234", "--clear-groups", "env", "HOME=/tmp",
             "git", "init", "--quiet", "--bare", elsewhere / "user.git"])
        export(ws, "--to", elsewhere / "user.git")
        assert_commits_equal_snapshots(ws, elsewhere / "user.git")
        for path in [elsewhere / "user.git" / "refs" / "heads" / "cowfs",
                     *(elsewhere / "user.git" / "objects").rglob("*")]:
            st_ = path.stat()
            assert (st_.st_uid, st_.st_gid) == (1234, 1234), path
            assert not st_.st_mode & 0o002, path
    finally:
        run(["umount", elsewhere])


def test_bad_targets_exit_2_with_one_line(workspace, backing):
    ws, p = workspace, workspace.path
    run(["git", "init", "--quiet", "--bare", p / "inner.git"])
    (backing / "plain").mkdir()
    run(["git", "init", "--quiet", "--bare", backing / "ok.git"])
    ws.mount()
    cases = [(["--to", backing / "missing"], "not a git repository"),
             (["--to", backing / "plain"], "not a git repository"),
             (["--to", p / "inner.git"], "inside the cowfs workspace"),
             (["--to", p], "inside the cowfs workspace"),
             (["--to", backing / "ok.git", "--branch", "bad..name"], "not a valid branch name"),
             (["--branch=-x"], "not a valid branch name")]
    for args, message in cases:
        r = export(ws, *args, check=False)
        assert r.returncode == 2, (args, r.stderr)
        assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
    assert git(backing / "ok.git", "for-each-ref") == b""


def test_a_branch_moved_by_someone_else_is_not_rewritten(workspace, repo):
    ws, p = workspace, workspace.path
    ws.mount()
    write(p / "a", b"a\n")
    checkpoint(ws)
    export(ws, "--to", repo)
    tree = git(repo, "rev-parse", "cowfs^{tree}").decode().strip()
    foreign = git(repo, "-c", "user.name=u", "-c", "user.email=u@x", "commit-tree", tree,
                  "-p", "cowfs", "-m", "someone else").decode().strip()
    git(repo, "update-ref", "refs/heads/cowfs", foreign)
    write(p / "b", b"b\n")
    checkpoint(ws)
    r = export(ws, "--to", repo, check=False)
    assert r.returncode == 1 and "refusing" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert git(repo, "rev-parse", "cowfs").decode().strip() == foreign


# -- cost --------------------------------------------------------------------------------------------
def count_blobs(repo) -> int:
    out = git(repo, "cat-file", "--batch-all-objects", "--batch-check=%(objecttype)")
    return out.split().count(b"blob")


@pytest.mark.parametrize("backing", ["xfs"], indirect=True)
def test_a_turn_costs_what_changed_in_it(workspace, repo):
    ws, p = workspace, workspace.path
    for d in range(20):
        (p / f"d{d}").mkdir()
        for f in range(100):
            write(p / f"d{d}" / f"f{f}", b"file %d/%d\n" % (d, f))
    ws.mount()
    first = exported_lines(export(ws, "--to", repo).stdout)
    assert first[0][1] == 2000 and count_blobs(repo) == 2000
    write(p / "d3" / "f7", b"changed\n", "ab")
    write(p / "d11" / "f0", b"rewritten\n")
    os.chmod(p / "d19" / "f99", 0o755)
    write(p / "d19" / "f99", b"and changed\n", "ab")
    checkpoint(ws)
    second = exported_lines(export(ws, "--to", repo).stdout)
    assert second[1][1:] == (3, 0), "the export of turn 1 wrote more than its 3 changed files"
    assert count_blobs(repo) == 2003
    assert_commits_equal_snapshots(ws, repo)


# -- the mirror after each checkpoint --------------------------------------------------------------
def mirror_turn(ws):
    mirror = json.loads(ws.cli("status", "--json").stdout)["git_mirror"]
    assert mirror is None or "error" not in mirror, mirror
    return mirror and mirror["turn"]


@pytest.mark.parametrize("backing", ["xfs"], indirect=True)
def test_export_on_checkpoint_keeps_a_mirror_without_making_checkpoints_wait(workspace):
    ws, p = workspace, workspace.path
    ws.mount("--export-git-on-checkpoint")
    # Enough random data that its export (deflating it, mostly) takes a second or more.
    for i in range(3):
        write(p / f"big{i}", os.urandom(12 << 20))
    write(p / "small", b"small\n")
    started = time.monotonic()
    turn = checkpoint(ws, "big")
    took = time.monotonic() - started
    exporting = mirror_turn(ws) != turn
    deadline = time.monotonic() + 120
    while mirror_turn(ws) != turn:
        assert time.monotonic() < deadline, "the mirror never caught up"
        time.sleep(0.2)
    exported_after = time.monotonic() - started
    assert exporting, "the checkpoint returned only once its export was done"
    assert took < exported_after / 3, (took, exported_after)
    write(p / "small", b"more\n", "ab")
    os.unlink(p / "big0")
    turn = checkpoint(ws)
    while mirror_turn(ws) != turn:
        assert time.monotonic() < deadline, "the mirror never caught up"
        time.sleep(0.05)
    assert_commits_equal_snapshots(ws, daemon_view(ws, ".cowfs/git"))
    # The same repository is `export-git`'s default: nothing is left to do.
    assert "nothing to export" in export(ws).stdout
    ws.umount()
    # After unmounting, the repository is a plain directory of the workspace's store.
    assert commits(p / ".cowfs" / "git")[turn]


# -- exporting while the workspace goes on -----------------------------------------------------------
def test_export_while_the_exported_files_are_being_changed(workspace, repo):
    """A file whose turn-N content is still the live one is changed while it is exported:
    the export must still give turn N's content (from the pre-image recorded before the change)."""
    ws, p = workspace, workspace.path
    ws.mount()
    # Big files are cloned (or copied) before they are read, small ones read into memory.
    for i in range(8):
        write(p / f"f{i}", bytes([65 + i]) * (4 << 20))
        write(p / f"s{i}", bytes([97 + i]) * (64 << 10))
    checkpoint(ws)
    exporter = subprocess.Popen([*ws.cowfs_cmd, "export-git", "-C", ws.path, "--to", repo],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for round_ in range(20):
        for i in range(8):
            for name in (f"f{i}", f"s{i}"):
                with open(p / name, "r+b") as f:
                    f.seek(round_ * 3000)
                    f.write(b"changed")
        if round_ % 5 == 4:
            checkpoint(ws)
    out, err = exporter.communicate(timeout=120)
    assert exporter.returncode == 0, err
    export(ws, "--to", repo)
    assert_commits_equal_snapshots(ws, repo)


# -- random histories --------------------------------------------------------------------------------
NAMES = [b"a", b"b", b"sp ace", b"new\nline", b"\xff\xfe", b"x.sh"]
CONTENTS = st.binary(max_size=40)


def _listing(root: bytes):
    """(directories, non-directories) below *root*, as paths relative to it."""
    dirs, others = [b""], []
    stack = [b""]
    while stack:
        rel = stack.pop()
        for name in sorted(os.listdir(os.path.join(root, rel) if rel else root)):
            path = os.path.join(rel, name) if rel else name
            if stat.S_ISDIR(os.lstat(os.path.join(root, path)).st_mode):
                dirs.append(path)
                stack.append(path)
            else:
                others.append(path)
    return dirs, others


# What the tree may answer to a random operation: a name taken or missing, a directory where a
# file is wanted or the other way round, a directory moved into itself, a symlink loop. Any other
# errno (EIO from the daemon, ENOSPC, EROFS, EBADF...) fails the test.
TREE_SAYS_NO = {errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR, errno.EINVAL,
                errno.ENOENT, errno.ELOOP}


def _step(data, ws, root: bytes) -> None:
    """One random operation through the mount; an error the tree may give is no failure."""
    dirs, others = _listing(root)
    op = data.draw(st.sampled_from(["write", "write", "append", "chmod", "mkdir", "symlink",
                                    "rename", "rename_dir", "unlink", "rmtree", "link",
                                    "checkpoint", "checkpoint", "rollback"]))
    full = lambda rel: os.path.join(root, rel)  # noqa: E731
    new = lambda: os.path.join(data.draw(st.sampled_from(dirs)), data.draw(st.sampled_from(NAMES)))  # noqa: E731
    try:
        if op == "write":
            write(full(new()), data.draw(CONTENTS))
        elif op == "append" and others:
            write(full(data.draw(st.sampled_from(others))), data.draw(CONTENTS), "ab")
        elif op == "chmod" and others:
            path = full(data.draw(st.sampled_from(others)))
            if not os.path.islink(path):
                os.chmod(path, data.draw(st.sampled_from([0o644, 0o755, 0o600, 0o700])))
        elif op == "mkdir":
            os.mkdir(full(new()))
        elif op == "symlink":
            os.symlink(data.draw(st.sampled_from([b"a", b"../b", b"nowhere", b"\xff"])), full(new()))
        elif op == "rename" and others:
            os.rename(full(data.draw(st.sampled_from(others))), full(new()))
        elif op == "rename_dir" and len(dirs) > 1:
            os.rename(full(data.draw(st.sampled_from(dirs[1:]))), full(new()))
        elif op == "unlink" and others:
            os.unlink(full(data.draw(st.sampled_from(others))))
        elif op == "rmtree" and len(dirs) > 1:
            subprocess.run(["rm", "-rf", "--", full(data.draw(st.sampled_from(dirs[1:])))], check=True)
        elif op == "link" and others:
            os.link(full(data.draw(st.sampled_from(others))), full(new()), follow_symlinks=False)
        elif op == "checkpoint":
            checkpoint(ws)
        elif op == "rollback":
            ws.cli("rollback", str(data.draw(st.sampled_from(sealed_turns(ws)))))
    except OSError as e:
        if e.errno not in TREE_SAYS_NO:
            raise


def test_random_histories(backing):
    """Random histories exported and compared with their snapshots; failing examples are kept in
    tests/hypothesis-db (committed) and replayed first by every run (see conftest)."""
    counter = itertools.count()

    @settings(max_examples=HYPOTHESIS_EXAMPLES, deadline=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(data=st.data())
    def example(data):
        ws = Workspace(backing / f"h{next(counter)}")
        repo = backing / f"h{next(counter)}.git"
        run(["git", "init", "--quiet", "--bare", repo])
        write(ws.path / "a", b"first\n")
        ws.mount()
        try:
            root = os.fsencode(ws.path)
            for _ in range(data.draw(st.integers(5, 25))):
                _step(data, ws, root)
                if data.draw(st.integers(0, 9)) == 0:
                    export(ws, "--to", repo)       # incremental exports along the way
            checkpoint(ws)
            export(ws, "--to", repo)
            assert_commits_equal_snapshots(ws, repo)
        finally:
            problems = ws.cleanup()
            assert not problems, problems

    example()
