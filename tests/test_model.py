"""The oracle (brief section 4): a model-based stateful test of cowfs.

Random sequences of file operations run through a real cowfs mount (real
syscalls from this process, plus shell commands: `cat >`, `cat >>`, `rm`,
`rm -rf`, `mv -T`): writes, appends, pwrite, truncate and ftruncate, writes
through a shared mapping, mkdir, mkfifo, symlinks, hard links, chmod, chown,
utime, xattrs, unlink, rmdir, rm -rf, rename (plain, RENAME_EXCHANGE,
RENAME_NOREPLACE), a file replaced by a directory and back, trees deep and
wide enough for the order of lookups to matter (more than five names a
directory, depth more than three), a write to a file another process has
unlinked, a snapshot file held open while the live file changes; interleaved
with checkpoints (with a file open for writing across one), rollbacks (to any
sealed turn, to turn 0, undoing the last rollback, with a descriptor held
across it that is read and written afterwards) and remounts. An independent
in-memory model (tests/model.py) says what the live tree and every sealed
turn must contain.

After every step, the live tree and every `.snapshots/turn-N` are compared
with the model, and the live tree with the backing directory itself too
(reached underneath the mount: `Workspace.backing`): the names at each level,
type, content and size, permission bits, owner, symlink target, `user.*`
xattrs, hard-link identity (two names of one object show one inode number in
the live tree, different objects different ones everywhere), st_nlink (predicted by the model: names of
a file, 2 + subdirectories of a directory, 1 in a snapshot), and mtimes
(predicted: a change's mtime must fall inside the window of the step that
made it, and is pinned once seen; from then on it must not move until the
object changes, a sealed turn's never, and a rollback must restore them).
Also: `.snapshots` is not listed in the root, the open turn has no snapshot,
`latest` names the last sealed turn, every turn number printed by checkpoint
/ rollback / umount is the model's, `status` and `log` agree with it after
each mount, and writes into a snapshot fail with EROFS.

After every rollback, the kernel's view (issue 8): every name is looked up in
a random (drawn) order, with the caches the rollback left and again after
`drop_caches` forced the kernel to forget them, and each object's stat and
content through the mount are compared with the model and with the backing
file; then appends through the mount must land at the end.

Each hypothesis example mounts a fresh workspace of its own below the
`backing` directory of the wrapper test (hypothesis cannot use per-example
fixtures), so the test runs on XFS (reflink) and on ext4 (copy).

Replaying failures: hypothesis keeps every failing example it finds in
tests/hypothesis-db (committed; conftest.EXAMPLE_DATABASE) and replays those
first on every run, CI's clean clones included, before it tries new random
ones. Commit what a failing run adds there with the fix. A failure seen only
in CI is brought in by running once locally with the `@reproduce_failure`
blob it printed (apply it to CowfsMachine) or its `--hypothesis-seed`. The
database is keyed by the machine class's source: editing the class retires
its old entries. A failure that does not replay (timing-dependent) shows as
FlakyFailure: it is a failure all the same.

Knobs: COWFS_HYPOTHESIS_EXAMPLES / COWFS_HYPOTHESIS_PROFILE (conftest), and
COWFS_MODEL_STEPS (stateful_step_count, default 30). With -s the wrapper
prints what was exercised (examples, steps, checkpoints, rollbacks, ...).

Minimal reproductions of the bugs this test found: test_model_regressions.py.
"""

from __future__ import annotations

import collections
import errno
import ctypes
import itertools
import json
import mmap
import os
import shutil
import stat
import time
from pathlib import Path

import pytest
from hypothesis import note, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import model as M
from conftest import CommandError, Workspace, drop_kernel_caches, is_fuse_mounted, run
from model import show

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (FUSE, loop devices)")

STEPS = int(os.environ.get("COWFS_MODEL_STEPS", "30"))
# Every cowfs command here acts on a tiny tree: a command that takes this long
# is hung (the daemon deadlocked), not slow.
CLI_TIMEOUT = 30

UMASK = os.umask(0o022)
os.umask(UMASK)

SNAPDIR = b".snapshots"

# -- strategies ----------------------------------------------------------------------------
CONTENT = st.one_of(
    st.binary(max_size=48),
    st.builds(lambda chunk, n: chunk * n, st.binary(min_size=1, max_size=16), st.integers(1, 1500)),
)
SOME_BYTES = st.binary(min_size=1, max_size=32)
OFFSETS = st.one_of(st.integers(0, 80), st.sampled_from([4095, 4096, 4097, 65535, 65536, 100_003]))
SIZES = st.one_of(st.integers(0, 80), st.sampled_from([4096, 70_000]))
CREATE_MODES = st.sampled_from([0o644, 0o600, 0o755])
FILE_MODES = st.sampled_from([0o644, 0o600, 0o755, 0o700, 0o444, 0o4755, 0o000, 0o777])
DIR_MODES = st.sampled_from([0o755, 0o700, 0o555, 0o777, 0o1777, 0o000])
MTIMES = st.builds(lambda s, ns: s * 10**9 + ns, st.integers(0, 2**31 - 1), st.integers(0, 10**9 - 1))
XATTR_NAMES = st.sampled_from([b"user.a", b"user.b", b"user.s p"])
XATTR_VALUES = st.binary(max_size=24)
SYMLINK_TARGETS = st.sampled_from([b"a", b"../b", b"s p/n\nl", b"nowhere", b"\xff\xfe",
                                   b"/nonexistent/abs", b".", b"a/b/../../a"])
MESSAGES = st.sampled_from(["", "turn", "with space", "naïve ✓", "two\nlines"])
OWNERS = st.sampled_from([0, 1234, 65534])
# The deepest path the test makes; the tree rule's spine of directories and its names (more
# than five a directory, "-" sorting first and "~" last).
MAX_DEPTH = 6
TREE_DEPTH = 4
TREE_NAMES = [b"-", b"0", b"A", b"a", b"b", b"m", b"n\nl", b"z", b"~"]

RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]


def renameat2(src: bytes, dst: bytes, flags: int) -> None:
    """renameat2(2) (Python has no binding for it), on absolute paths."""
    if _libc.renameat2(-100, src, -100, dst, flags) != 0:     # AT_FDCWD
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), src, None, dst)


# -- comparing a real tree with a model tree ----------------------------------------------------
def kind_of(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISFIFO(mode):
        return "fifo"
    return f"mode {mode:o}"


def read_all(path: bytes) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        chunks = []
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    finally:
        os.close(fd)


def user_xattrs(path: bytes) -> dict[bytes, bytes]:
    names = [n for n in os.listxattr(path, follow_symlinks=False) if n.startswith("user.")]
    return {os.fsencode(n): os.getxattr(path, n, follow_symlinks=False) for n in names}


def content_diff(got: bytes, want: bytes) -> str:
    first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    return (f"size {len(got)} (want {len(want)}), first difference at {first}: "
            f"got {got[first:first + 12]!r} want {want[first:first + 12]!r}")


def check_mtime(node, seen: int, now: int) -> str | None:
    """Compare an mtime seen with the model's prediction; pin it if it was a window."""
    want = node.mtime
    if isinstance(want, M.Window):
        if not want.admits(seen, now):
            return f"mtime_ns {seen} is outside {want} (older: stale)"
        node.mtime = seen
    elif want is None:
        node.mtime = seen
    elif seen != want:
        return f"mtime_ns {seen}, want {want}"
    return None


def compare_object(real: bytes, node, where: str, *, nlink: int, now: int
                   ) -> tuple[os.stat_result | None, list[str]]:
    """(lstat of *real*, every way it differs from model object *node*): type, mode, owner,
    mtime, st_nlink, size and content, symlink target, user xattrs. The stat is None when
    nothing more can be compared (no such object, or not of the model's type)."""
    try:
        st_ = os.lstat(real)
    except OSError as e:
        return None, [f"{where}: lstat failed: {e}"]
    kind = kind_of(st_.st_mode)
    if kind != node.kind:
        return None, [f"{where}: is a {kind}, want a {node.kind}"]
    problems = []
    if stat.S_IMODE(st_.st_mode) != node.mode:
        problems.append(f"{where}: mode {stat.S_IMODE(st_.st_mode):o}, want {node.mode:o}")
    if (st_.st_uid, st_.st_gid) != (node.uid, node.gid):
        problems.append(f"{where}: owner {st_.st_uid}:{st_.st_gid}, want {node.uid}:{node.gid}")
    wrong_mtime = check_mtime(node, st_.st_mtime_ns, now)
    if wrong_mtime:
        problems.append(f"{where}: {wrong_mtime}")
    if st_.st_nlink != nlink:
        problems.append(f"{where}: st_nlink {st_.st_nlink}, want {nlink}")
    try:
        if kind == "file":
            if st_.st_size != len(node.content):
                problems.append(f"{where}: st_size {st_.st_size}, want {len(node.content)}")
            data = read_all(real)
            if data != node.content:
                problems.append(f"{where}: content differs: {content_diff(data, node.content)}")
        elif kind == "symlink":
            target = os.readlink(real)
            if target != node.target:
                problems.append(f"{where}: symlink target {target!r}, want {node.target!r}")
        if kind != "symlink":
            xattrs = user_xattrs(real)
            if xattrs != node.xattrs:
                problems.append(f"{where}: user xattrs {xattrs}, want {node.xattrs}")
    except OSError as e:
        problems.append(f"{where}: {e!r}")
    return st_, problems


def compare_tree(top: bytes, tree: M.Dir, label: str, *, live: bool, hidden=()) -> list[str]:
    """Every way the real tree at *top* differs from the model tree (empty: equal).

    st_nlink as the model counts it, in the live tree and in snapshots alike. *live*: the
    names of one object show one inode number (in a snapshot, only: different objects never
    share one). *hidden*:
    names of the root not to list (the store, in the backing directory). Mtimes as in
    check_mtime: a window is pinned by the first look inside it.
    """
    problems: list[str] = []
    counts = M.Model().link_count(tree)
    ino_of: dict[int, int] = {}      # id(model object) -> st_ino seen
    obj_of: dict[int, int] = {}      # st_ino -> id(model object)
    now = time.time_ns()

    def visit(rel: tuple, node) -> None:
        real = top + b"".join(b"/" + n for n in rel)
        where = f"{label}:{show(rel)}"
        st_, found = compare_object(real, node, where, nlink=counts[id(node)], now=now)
        problems.extend(found)
        if st_ is None:
            return
        ino = st_.st_ino
        # In a snapshot an object's (virtual) inode number lives as long as the kernel knows it:
        # two names of one file may show two numbers if the kernel forgot it between the two
        # lookups (docs/architecture.md, Known limits). Different objects never share one.
        if live and ino_of.setdefault(id(node), ino) != ino:
            problems.append(f"{where}: hard link split: inode {ino}, "
                            f"another name of it has {ino_of[id(node)]}")
        if obj_of.setdefault(ino, id(node)) != id(node):
            problems.append(f"{where}: inode {ino} is shared with a different object")
        if node.kind == "dir":
            try:
                names = set(os.listdir(real)) - (set(hidden) if not rel else set())
            except OSError as e:
                problems.append(f"{where}: {e!r}")
                return
            want = set(node.entries)
            if names != want:
                problems.append(f"{where}: names differ: extra {sorted(names - want)}, "
                                f"missing {sorted(want - names)}")
            for name in sorted(names & want):
                visit(rel + (name,), node.entries[name])

    visit((), tree)
    return problems


# -- the state machine ---------------------------------------------------------------------
class CowfsMachine(RuleBasedStateMachine):
    """One hypothesis example: a fresh workspace, mounted, driven, compared, unmounted."""

    base: Path | None = None                 # set by the wrapper test
    teardown_problems: list[str] = []
    stats: collections.Counter = collections.Counter()
    _serial = itertools.count()

    def __init__(self):
        super().__init__()
        if self.base is None:
            raise RuntimeError("CowfsMachine runs through test_model(), which sets its base dir")
        self.ws = Workspace(self.base / f"ex{next(self._serial)}")
        self.root = os.fsencode(self.ws.path)
        # The backing directory itself (underneath the mount, for the whole example): what
        # the mount shows is compared with it as well as with the model.
        self.backing = os.fsencode(self.ws.backing) + b"/."
        self.fstype = run(["stat", "-f", "-c", "%T", self.base]).stdout.strip()
        root_st = os.stat(self.root)
        self.model = M.Model(root_mode=stat.S_IMODE(root_st.st_mode), root_mtime=root_st.st_mtime_ns)
        self.mounted = False
        self.daemon_pid = None
        self.made_tree = False
        self.stats["examples"] += 1

    def teardown(self):
        problems = []
        if is_fuse_mounted(self.ws.path):
            try:
                self.ws.umount(timeout=CLI_TIMEOUT)
            except CommandError as e:
                problems.append(f"{e}\n{self.hung()}")
        problems += self.ws.cleanup()
        if problems:
            self.teardown_problems.append(f"{self.ws.path}: " + "; ".join(problems))
        if not is_fuse_mounted(self.ws.path):
            shutil.rmtree(self.ws.path, ignore_errors=True)
        if problems:
            # A failure of its own (hypothesis shrinks it), e.g. `cowfs umount` hanging.
            raise AssertionError("unmounting at the end of the example failed: " + "; ".join(problems))

    # -- helpers -------------------------------------------------------------------------
    def diagnose(self) -> str:
        """What the daemon is doing (kernel stacks, end of its log): for hangs."""
        pid = self.daemon_pid
        if pid is None or not os.path.exists(f"/proc/{pid}"):
            return f"[daemon {pid} is gone]"
        out = [f"[daemon {pid}]"]
        for task in sorted(os.listdir(f"/proc/{pid}/task")):
            try:
                with open(f"/proc/{pid}/task/{task}/stat") as f:
                    state = f.read().rsplit(") ", 1)[1].split()[0]
                with open(f"/proc/{pid}/task/{task}/stack") as f:
                    stack = f.read().strip().replace("\n", " | ")
            except OSError as e:
                state, stack = "?", str(e)
            out.append(f"  thread {task} state {state}: {stack}")
        log = f"/proc/{pid}/root" + os.fspath(self.ws.store / "daemon.log")
        try:   # the daemon hides its own mount from itself: /proc/PID/root sees the store
            with open(log, errors="replace") as f:
                out.append("  daemon.log tail:\n    " + "\n    ".join(f.read().splitlines()[-15:]))
        except OSError as e:
            out.append(f"  no daemon.log: {e}")
        return "\n".join(out)

    def mount(self) -> None:
        self.ws.mount(timeout=CLI_TIMEOUT)
        self.mounted = True
        status = json.loads(self.cli("status", "--json"))
        self.daemon_pid = status["daemon_pid"]
        if self.model.open_turn is not None:
            assert status["open_turn"] == self.model.open_turn, status

    def real(self, path: tuple) -> bytes:
        return b"/".join((self.root, *path))

    def in_backing(self, path: tuple) -> bytes:
        return b"/".join((self.backing, *path))

    def sh(self, script: bytes, *paths: tuple, input: bytes | None = None):
        return run([b"sh", b"-c", script, b"sh", *(self.real(p) for p in paths)], input=input)

    def draw_path(self, data, candidates: list, label: str) -> tuple:
        return data.draw(st.sampled_from(candidates), label=label)

    def files(self):
        return self.model.paths({"file"})

    def nondirs(self):
        return self.model.paths({"file", "symlink", "fifo"})

    def subdirs(self):
        return self.model.paths({"dir"})

    def attr_targets(self, kinds=("file", "dir", "fifo")):
        return self.model.paths(kinds, min_depth=0)

    def cli(self, *args):
        try:
            return self.ws.cli(*args, timeout=CLI_TIMEOUT).stdout
        except CommandError as e:
            if e.timeout is None:
                raise
            raise AssertionError(f"{e}\n{self.hung()}") from None

    def hung(self) -> str:
        """Describe a hung daemon, then kill it: a deadlocked daemon never exits on its own."""
        diagnosis = self.diagnose()
        if self.daemon_pid is not None:
            try:
                os.kill(self.daemon_pid, 9)
            except ProcessLookupError:
                pass
        return diagnosis

    # -- the operations (usable before the first mount, too) --------------------------------
    def op_write(self, data, via=None):
        path = self.draw_path(data, self.model.absent() + self.files(), "path")
        content = data.draw(CONTENT, label="content")
        via = via or data.draw(st.sampled_from(["os", "shell"]), label="via")
        note(f"write {show(path)} ({len(content)} bytes, O_TRUNC) via {via}")
        if via == "os":
            mode = data.draw(CREATE_MODES, label="mode")
            fd = os.open(self.real(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
            try:
                write_all(fd, content)
            finally:
                os.close(fd)
            self.model.write(path, content, mode & ~UMASK)
        else:
            self.sh(b'cat > "$1"', path, input=content)
            self.model.write(path, content, 0o666 & ~UMASK)

    def op_append(self, data):
        path = self.draw_path(data, self.model.absent() + self.files(), "path")
        content = data.draw(SOME_BYTES, label="content")
        via = data.draw(st.sampled_from(["os", "shell"]), label="via")
        note(f"append {len(content)} bytes to {show(path)} via {via}")
        if via == "os":
            fd = os.open(self.real(path), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                write_all(fd, content)
            finally:
                os.close(fd)
            self.model.append(path, content, 0o644 & ~UMASK)
        else:
            self.sh(b'cat >> "$1"', path, input=content)
            self.model.append(path, content, 0o666 & ~UMASK)

    def op_pwrite(self, data, path=None):
        path = path or self.draw_path(data, self.files(), "path")
        offset = data.draw(OFFSETS, label="offset")
        content = data.draw(SOME_BYTES, label="content")
        note(f"pwrite {len(content)} bytes at {offset} into {show(path)}")
        fd = os.open(self.real(path), os.O_WRONLY)
        try:
            assert os.pwrite(fd, content, offset) == len(content)
        finally:
            os.close(fd)
        self.model.pwrite(path, offset, content)

    def op_truncate(self, data, path=None):
        path = path or self.draw_path(data, self.files(), "path")
        size = data.draw(SIZES, label="size")
        via = data.draw(st.sampled_from(["truncate", "ftruncate"]), label="via")
        note(f"{via} {show(path)} to {size}")
        if via == "truncate":
            os.truncate(self.real(path), size)
        else:
            fd = os.open(self.real(path), os.O_WRONLY)
            try:
                os.ftruncate(fd, size)
            finally:
                os.close(fd)
        # truncate(2) to the same size leaves mtime through cowfs on every backing filesystem
        # (the kernel asks for none and keeps its own: a limit in the README), as XFS does.
        self.model.truncate(path, size, same_size_stamps=via == "ftruncate")

    def op_mmap_write(self, data):
        path = self.draw_path(data, [p for p in self.files() if self.model.get(p).content], "path")
        size = len(self.model.get(path).content)
        offset = data.draw(st.integers(0, size - 1), label="offset")
        content = data.draw(SOME_BYTES, label="content")[:size - offset]
        note(f"write {len(content)} bytes at {offset} into {show(path)} through a shared mapping")
        fd = os.open(self.real(path), os.O_RDWR)
        try:
            with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as m:
                m[offset:offset + len(content)] = content
                m.flush()
        finally:
            os.close(fd)
        self.model.pwrite(path, offset, content)

    def op_chown(self, data):
        path = self.draw_path(data, self.model.paths(min_depth=0), "path")
        uid, gid = data.draw(OWNERS, label="uid"), data.draw(OWNERS, label="gid")
        note(f"chown -h {uid}:{gid} {show(path)}")
        os.chown(self.real(path), uid, gid, follow_symlinks=False)
        self.model.chown(path, uid, gid)

    def op_tree(self, data):
        """A directory deep and wide enough for the order of lookups to matter: a spine of
        TREE_DEPTH directories, each with 6 or 7 entries (files, hard links to files made
        before in it, symlinks)."""
        top = self.draw_path(data, self.model.absent(max_depth=MAX_DEPTH - TREE_DEPTH), "tree at")
        note(f"make a tree at {show(top)}")
        self.made_tree = True      # one an example: every step compares it in every turn
        made, here = [], top
        for level in range(TREE_DEPTH):
            os.mkdir(self.real(here))
            self.model.mkdir(here, 0o777 & ~UMASK)
            names = data.draw(st.lists(st.sampled_from(TREE_NAMES), min_size=6, max_size=7, unique=True),
                              label="names")
            # names[0] is the next directory down, except at the bottom
            for name in names[1:] if level < TREE_DEPTH - 1 else names:
                path = here + (name,)
                kind = data.draw(st.sampled_from(["file", "file", "link", "symlink"]), label=show(path))
                if kind == "link" and made:
                    src = data.draw(st.sampled_from(made), label="link to")
                    os.link(self.real(src), self.real(path))
                    self.model.link(src, path)
                elif kind == "symlink":
                    os.symlink(b"../" + name, self.real(path))
                    self.model.symlink(b"../" + name, path)
                else:
                    content = data.draw(CONTENT, label="content")
                    with open(self.real(path), "xb") as f:
                        f.write(content)
                    self.model.write(path, content, 0o666 & ~UMASK)
                    made.append(path)
            here = here + (names[0],)

    def op_mkdir(self, data):
        path = self.draw_path(data, self.model.absent(), "path")
        mode = data.draw(st.sampled_from([0o755, 0o700, 0o777]), label="mode")
        note(f"mkdir {show(path)} {mode:o}")
        os.mkdir(self.real(path), mode)
        self.model.mkdir(path, mode & ~UMASK)

    def op_mkfifo(self, data):
        path = self.draw_path(data, self.model.absent(), "path")
        note(f"mkfifo {show(path)}")
        os.mkfifo(self.real(path), 0o644)
        self.model.mkfifo(path, 0o644 & ~UMASK)

    def op_symlink(self, data):
        path = self.draw_path(data, self.model.absent(), "path")
        target = data.draw(SYMLINK_TARGETS, label="target")
        note(f"symlink {show(path)} -> {target!r}")
        os.symlink(target, self.real(path))
        self.model.symlink(target, path)

    def op_link(self, data):
        src = self.draw_path(data, self.nondirs(), "src")
        dst = self.draw_path(data, self.model.absent(), "dst")
        note(f"link {show(src)} {show(dst)}")
        os.link(self.real(src), self.real(dst), follow_symlinks=False)
        self.model.link(src, dst)

    def op_chmod(self, data):
        path = self.draw_path(data, self.attr_targets(), "path")
        node = self.model.get(path)
        mode = data.draw(DIR_MODES if node.kind == "dir" else FILE_MODES, label="mode")
        note(f"chmod {mode:o} {show(path)}")
        os.chmod(self.real(path), mode)
        self.model.chmod(path, mode)

    def op_utime(self, data):
        path = self.draw_path(data, self.attr_targets(), "path")
        mtime = data.draw(MTIMES, label="mtime_ns")
        note(f"utime {show(path)} mtime_ns={mtime}")
        os.utime(self.real(path), ns=(mtime, mtime), follow_symlinks=False)
        self.model.utime(path, mtime)

    def op_setxattr(self, data):
        path = self.draw_path(data, self.attr_targets(("file", "dir")), "path")
        name = data.draw(XATTR_NAMES, label="name")
        value = data.draw(XATTR_VALUES, label="value")
        note(f"setxattr {show(path)} {name!r}={value!r}")
        os.setxattr(self.real(path), name, value, follow_symlinks=False)
        self.model.setxattr(path, name, value)

    # -- rules: file operations ----------------------------------------------------------
    @initialize(data=st.data())
    def populate_and_mount(self, data):
        """Turn 0: a small tree made before the first mount, then mount."""
        ops = {"write": self.op_write, "mkdir": self.op_mkdir, "symlink": self.op_symlink,
               "link": self.op_link, "chmod": self.op_chmod, "utime": self.op_utime,
               "setxattr": self.op_setxattr, "mkfifo": self.op_mkfifo, "chown": self.op_chown,
               "tree": self.op_tree}
        for name in data.draw(st.lists(st.sampled_from(sorted(ops)), max_size=6), label="initial ops"):
            needs_absent = name in ("mkdir", "symlink", "mkfifo", "link")
            if (needs_absent and not self.model.absent()) or (name == "link" and not self.nondirs()) \
                    or (name == "write" and not (self.model.absent() or self.files())) \
                    or (name == "tree" and (self.made_tree or not self.model.absent(max_depth=MAX_DEPTH - TREE_DEPTH))):
                continue
            ops[name](data)
        note("mount")
        # Creating the store (.cowfs) in the root changes the root's mtime.
        self.model.root.mtime = M.Window(time.time_ns())
        self.mount()
        self.model.first_mount()

    @precondition(lambda self: self.model.absent() or self.files())
    @rule(data=st.data())
    def write(self, data):
        self.op_write(data)

    @precondition(lambda self: self.model.absent() or self.files())
    @rule(data=st.data())
    def append(self, data):
        self.op_append(data)

    @precondition(lambda self: self.files())
    @rule(data=st.data())
    def pwrite(self, data):
        self.op_pwrite(data)

    @precondition(lambda self: self.files())
    @rule(data=st.data())
    def truncate(self, data):
        self.op_truncate(data)

    @precondition(lambda self: any(self.model.get(p).content for p in self.files()))
    @rule(data=st.data())
    def mmap_write(self, data):
        self.op_mmap_write(data)

    @rule(data=st.data())
    def chown(self, data):
        self.op_chown(data)

    @precondition(lambda self: not self.made_tree and self.model.absent(max_depth=MAX_DEPTH - TREE_DEPTH))
    @rule(data=st.data())
    def tree(self, data):
        self.op_tree(data)

    def _exchange_pairs(self) -> list:
        pairs = []
        for a, b in itertools.combinations(self.model.paths(), 2):
            na, nb = self.model.get(a), self.model.get(b)
            if na is nb or b[:len(a)] == a:     # one object, or b inside a (sorted: never a in b)
                continue
            if len(a) + self.model.height(nb) > MAX_DEPTH or len(b) + self.model.height(na) > MAX_DEPTH:
                continue
            pairs.append((a, b))
        return pairs

    @precondition(lambda self: len(self.model.paths()) > 1)
    @rule(data=st.data())
    def rename_exchange(self, data):
        """renameat2(RENAME_EXCHANGE) of any two entries (files, directories, one of each)."""
        pairs = self._exchange_pairs()
        if not pairs:
            return
        a, b = data.draw(st.sampled_from(pairs), label="exchange")
        note(f"renameat2 {show(a)} <-> {show(b)} RENAME_EXCHANGE")
        renameat2(self.real(a), self.real(b), RENAME_EXCHANGE)
        self.model.exchange(a, b, dotdot_stamps_mtime=self.fstype == "xfs")

    @precondition(lambda self: self.model.paths())
    @rule(data=st.data())
    def rename_noreplace(self, data):
        """renameat2(RENAME_NOREPLACE): EEXIST (and no change) over an existing name."""
        src = self.draw_path(data, self.model.paths(), "src")
        node = self.model.get(src)
        dsts = [p for p in self.model.absent(max_depth=MAX_DEPTH - self.model.height(node))
                if p[:len(src)] != src] + [p for p in self.model.paths() if p != src]
        dst = self.draw_path(data, dsts, "dst")
        note(f"renameat2 {show(src)} -> {show(dst)} RENAME_NOREPLACE")
        if self.model.get(dst) is not None:
            with pytest.raises(OSError) as e:
                renameat2(self.real(src), self.real(dst), RENAME_NOREPLACE)
            assert e.value.errno == errno.EEXIST, e.value
        else:
            renameat2(self.real(src), self.real(dst), RENAME_NOREPLACE)
            self.model.rename(src, dst)

    @precondition(lambda self: self.model.absent())
    @rule(data=st.data())
    def mkdir(self, data):
        self.op_mkdir(data)

    @precondition(lambda self: self.model.absent())
    @rule(data=st.data())
    def mkfifo(self, data):
        self.op_mkfifo(data)

    @precondition(lambda self: self.model.absent())
    @rule(data=st.data())
    def symlink(self, data):
        self.op_symlink(data)

    @precondition(lambda self: self.model.absent() and self.nondirs())
    @rule(data=st.data())
    def link(self, data):
        self.op_link(data)

    @rule(data=st.data())
    def chmod(self, data):
        self.op_chmod(data)

    @rule(data=st.data())
    def utime(self, data):
        self.op_utime(data)

    @rule(data=st.data())
    def setxattr(self, data):
        self.op_setxattr(data)

    @precondition(lambda self: any(n.xattrs for _, n in self.model.walk()))
    @rule(data=st.data())
    def removexattr(self, data):
        pairs = sorted((p, name) for p, n in self.model.walk() for name in n.xattrs)
        path, name = data.draw(st.sampled_from(pairs), label="path, name")
        note(f"removexattr {show(path)} {name!r}")
        os.removexattr(self.real(path), name, follow_symlinks=False)
        self.model.removexattr(path, name)

    @precondition(lambda self: self.nondirs())
    @rule(data=st.data())
    def unlink(self, data):
        path = self.draw_path(data, self.nondirs(), "path")
        via = data.draw(st.sampled_from(["os", "shell"]), label="via")
        note(f"unlink {show(path)} via {via}")
        if via == "os":
            os.unlink(self.real(path))
        else:
            self.sh(b'rm -- "$1"', path)
        self.model.remove(path)

    @precondition(lambda self: self.subdirs())
    @rule(data=st.data())
    def rm_rf(self, data):
        path = self.draw_path(data, self.subdirs(), "path")
        note(f"rm -rf {show(path)}")
        self.sh(b'rm -rf -- "$1"', path)
        self.model.remove(path)

    @precondition(lambda self: self.subdirs())
    @rule(data=st.data())
    def rmdir(self, data):
        """rmdir: works on an empty directory, ENOTEMPTY (and no change) otherwise."""
        path = self.draw_path(data, self.subdirs(), "path")
        note(f"rmdir {show(path)}")
        if self.model.get(path).entries:
            with pytest.raises(OSError) as e:
                os.rmdir(self.real(path))
            assert e.value.errno in (errno.ENOTEMPTY, errno.EEXIST), e.value
        else:
            os.rmdir(self.real(path))
            self.model.remove(path)

    @precondition(lambda self: self.nondirs())
    @rule(data=st.data())
    def rename_nondir(self, data):
        """A file, symlink or FIFO renamed to a new name or over another non-directory."""
        src = self.draw_path(data, self.nondirs(), "src")
        dst = self.draw_path(data, [p for p in self.model.absent() + self.nondirs() if p != src], "dst")
        same = self.model.get(dst) is self.model.get(src)
        # mv refuses "the same file" (two links of one object, or a symlink to its destination).
        mv_ok = not same and self.model.get(src).kind != "symlink"
        via = data.draw(st.sampled_from(["os", "mv"]), label="via") if mv_ok else "os"
        note(f"rename {show(src)} -> {show(dst)} via {via}" + (" (same object: no-op)" if same else ""))
        if via == "os":
            os.rename(self.real(src), self.real(dst))
        else:
            self.sh(b'mv -T -- "$1" "$2"', src, dst)
        self.model.rename(src, dst)

    def _dir_rename_targets(self, src: tuple) -> list:
        node = self.model.get(src)
        out = []
        for p in self.model.absent(max_depth=MAX_DEPTH) + self.model.paths({"dir"}):
            if p == src or p[:len(src)] == src:
                continue
            victim = self.model.get(p)
            if victim is not None and victim.entries:
                continue
            if len(p) + self.model.height(node) > MAX_DEPTH:
                continue
            out.append(p)
        return out

    @precondition(lambda self: self.subdirs())
    @rule(data=st.data())
    def rename_dir(self, data):
        """A directory renamed to a new name or over an empty directory."""
        src = self.draw_path(data, self.subdirs(), "src")
        targets = self._dir_rename_targets(src)
        if not targets:
            return
        dst = self.draw_path(data, targets, "dst")
        via = data.draw(st.sampled_from(["os", "mv"]), label="via")
        note(f"rename directory {show(src)} -> {show(dst)} via {via}")
        if via == "os":
            os.rename(self.real(src), self.real(dst))
        else:
            self.sh(b'mv -T -- "$1" "$2"', src, dst)
        self.model.rename(src, dst)

    @rule(data=st.data())
    def rename_invalid(self, data):
        """Renames that must fail and change nothing."""
        cases = []
        for src in self.model.paths():
            node = self.model.get(src)
            for dst in self.model.paths():
                victim = self.model.get(dst)
                if dst == src or victim is node:
                    continue
                if isinstance(node, M.Dir):
                    if dst[:len(src)] == src:
                        cases.append((src, dst, {errno.EINVAL}))
                    elif isinstance(victim, M.Dir) and victim.entries:
                        cases.append((src, dst, {errno.ENOTEMPTY, errno.EEXIST}))
                    elif not isinstance(victim, M.Dir):
                        cases.append((src, dst, {errno.ENOTDIR}))
                elif isinstance(victim, M.Dir):
                    # Over an ancestor of itself: ENOTEMPTY (the kernel checks that first).
                    ancestor = src[:len(dst)] == dst
                    cases.append((src, dst, {errno.ENOTEMPTY} if ancestor else {errno.EISDIR}))
        if not cases:
            return
        src, dst, errnos = data.draw(st.sampled_from(cases), label="src, dst, errnos")
        note(f"rename {show(src)} -> {show(dst)} (must fail: {sorted(errnos)})")
        with pytest.raises(OSError) as e:
            os.rename(self.real(src), self.real(dst))
        assert e.value.errno in errnos, e.value

    @precondition(lambda self: self.nondirs())
    @rule(data=st.data())
    def replace_nondir_by_dir(self, data):
        path = self.draw_path(data, self.nondirs(), "path")
        note(f"rm {show(path)} && mkdir {show(path)}")
        self.sh(b'rm -- "$1" && mkdir -- "$1"', path)
        self.model.remove(path)
        self.model.mkdir(path, 0o777 & ~UMASK)

    @precondition(lambda self: self.subdirs())
    @rule(data=st.data())
    def replace_dir_by_file(self, data):
        path = self.draw_path(data, self.subdirs(), "path")
        content = data.draw(CONTENT, label="content")
        note(f"rm -rf {show(path)} && cat > {show(path)} ({len(content)} bytes)")
        self.sh(b'rm -rf -- "$1" && cat > "$1"', path, input=content)
        self.model.remove(path)
        self.model.write(path, content, 0o666 & ~UMASK)

    # -- rules: turns --------------------------------------------------------------------
    def checkpoint_now(self, message: str) -> None:
        self.stats["checkpoints"] += 1
        # Learn the mtimes the turn is sealed with (a rule may have changed
        # things since the last invariant check).
        problems = compare_tree(self.root, self.model.root, "live before checkpoint", live=True)
        assert not problems, "\n".join(problems)
        out = self.cli("checkpoint", "-m", message)
        want = self.model.checkpoint()
        note(f"checkpoint -> {out.strip()}")
        assert out.strip() == f"turn-{want}", f"checkpoint printed {out!r}, want turn-{want}"

    @rule(message=MESSAGES)
    def checkpoint(self, message):
        self.checkpoint_now(message)

    @rule()
    def checkpoint_again(self):
        """A second checkpoint rule, so that turns are sealed often (and empty turns happen)."""
        self.checkpoint_now("again")

    def rollback_now(self, target: int, data, held=None) -> None:
        """Roll back, then check the kernel's view (check_kernel_view); *held*, if given, is
        called in between: what a descriptor held across the rollback sees."""
        self.stats["rollbacks"] += 1
        out = self.cli("rollback", str(target))
        pending, recorded = self.model.rollback(target)
        note(f"rollback {target} -> {out.strip()!r}")
        want = ([f"sealed pending changes as turn-{pending}"] if pending is not None else [])
        want.append(f"rolled back to turn-{target} (recorded as turn-{recorded})")
        assert out.splitlines() == want, f"rollback printed {out!r}, want {want}"
        if held is not None:
            held()
        started = time.monotonic()
        self.check_kernel_view(data)
        self.stats["kernel view checks"] += 1
        self.stats["seconds in kernel view checks"] += round(time.monotonic() - started, 3)

    def check_kernel_view(self, data) -> None:
        """After a rollback: every name looked up in a random order, with the kernel's caches as
        the rollback left them and again after making it drop them, shows what the model and
        the backing file say (type, size, mtime, st_nlink, mode, owner, content); then appends
        through the mount land at the end of the files."""
        paths = self.model.paths()
        for when in ("warm", "cold"):
            if when == "cold":
                drop_kernel_caches()
            order = data.draw(st.permutations(paths), label=f"lookup order ({when})")
            counts, now, problems = self.model.link_count(), time.time_ns(), []
            for path in order:
                node = self.model.get(path)
                for label, real in ((when, self.real(path)), ("backing", self.in_backing(path))):
                    problems += compare_object(real, node, f"{label} {show(path)}",
                                               nlink=counts[id(node)], now=now)[1]
            assert not problems, f"after the rollback ({when} cache):\n" + "\n".join(problems[:40])
        files = self.files()
        if not files:
            return
        for path in data.draw(st.lists(st.sampled_from(files), min_size=1, max_size=3, unique=True),
                              label="append after the rollback"):
            mark = b"<appended to %s>" % b"/".join(path)
            note(f"append {mark!r} through the mount")
            fd = os.open(self.real(path), os.O_WRONLY | os.O_APPEND)
            try:
                write_all(fd, mark)
            finally:
                os.close(fd)
            self.model.append(path, mark, 0)
            want = self.model.get(path).content
            for label, real in (("mount", self.real(path)), ("backing", self.in_backing(path))):
                got = read_all(real)
                assert got == want, f"append to {show(path)} ({label}): {content_diff(got, want)}"

    @rule(data=st.data())
    def rollback(self, data):
        self.rollback_now(data.draw(st.sampled_from(sorted(self.model.turns)), label="turn"), data)

    @precondition(lambda self: 0 in self.model.turns)      # not pruned
    @rule(data=st.data())
    def rollback_to_zero(self, data):
        self.rollback_now(0, data)

    @precondition(lambda self: len(self.model.turns) > 1)
    @rule(data=st.data())
    def prune(self, data):
        """`cowfs prune --keep N`: the oldest turns go (from .snapshots, log and the model), the
        kept ones stay exact (the invariants compare them), and a pruned turn is refused."""
        self.stats["prunes"] += 1
        sealed = sorted(self.model.turns)
        keep = data.draw(st.integers(1, len(sealed) - 1), label="keep")
        out = self.cli("prune", "--keep", str(keep))
        gone, oldest = sealed[:-keep], sealed[-keep]
        note(f"prune --keep {keep} -> {out.strip()!r}")
        assert f"the oldest turn kept is turn-{oldest}" in out, out
        for n in gone:
            del self.model.turns[n]
        if self.model.last_rollback is not None and self.model.last_rollback[0] in gone:
            self.model.last_rollback = None
        refused = self.ws.cli("rollback", str(gone[-1]), check=False, timeout=CLI_TIMEOUT)
        assert refused.returncode == 2 and f"turn-{oldest}" in refused.stderr, refused.stderr

    @precondition(lambda self: self.model.last_rollback is not None)
    @rule(data=st.data())
    def undo_last_rollback(self, data):
        """Roll back to the turn sealed just before the last rollback: a rollback of a rollback."""
        self.rollback_now(self.model.last_rollback[0], data)

    @precondition(lambda self: self.files() or self.model.absent())
    @rule(data=st.data())
    def write_across_checkpoint(self, data):
        """A file open for writing across a checkpoint: later writes belong to the next turn."""
        path = self.draw_path(data, self.model.absent() + self.files(), "path")
        first = (data.draw(OFFSETS, label="offset 1"), data.draw(SOME_BYTES, label="data 1"))
        second = (data.draw(OFFSETS, label="offset 2"), data.draw(SOME_BYTES, label="data 2"))
        note(f"open {show(path)} for writing, pwrite {first}, checkpoint, pwrite {second}, close")
        if self.model.get(path) is None:
            self.model.write(path, b"", 0o644 & ~UMASK)
        fd = os.open(self.real(path), os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.pwrite(fd, first[1], first[0])
            self.model.pwrite(path, *first)
            self.checkpoint_now("open file")
            os.pwrite(fd, second[1], second[0])
            self.model.pwrite(path, *second)
        finally:
            os.close(fd)

    @precondition(lambda self: self.files())
    @rule(data=st.data())
    def rollback_with_open_file(self, data):
        """A rollback while a file is held open by someone, who reads and writes through that
        descriptor afterwards: it is the object it was (a rollback puts turn K's objects
        back), restored if that object is in turn K, else as it was and out of the tree."""
        path = self.draw_path(data, self.files(), "held open")
        how = data.draw(st.sampled_from(["O_RDONLY", "O_RDWR"]), label="open flags")
        target = data.draw(st.sampled_from(sorted(self.model.turns)), label="turn")
        write = (data.draw(OFFSETS, label="offset"), data.draw(SOME_BYTES, label="data")) \
            if how == "O_RDWR" else None
        held = self.model.get(path)
        outside = M.File(content=held.content)      # what it holds if the rollback removes it
        note(f"hold {show(path)} open {how} during the rollback, then pread" +
             (f" and pwrite {write}" if write else ""))

        def through_the_descriptor():
            live = self.model.find(held.oid)
            want = live.content if live is not None else outside.content
            got = os.pread(fd, len(want) + 100, 0)
            assert got == want, f"read through the held descriptor: {content_diff(got, want)}"
            assert os.fstat(fd).st_size == len(want)
            if write is None:
                return
            assert os.pwrite(fd, write[1], write[0]) == len(write[1])
            if live is not None:
                self.model.pwrite(self.model.names_of(held.oid)[0], *write)
            else:
                # Out of the tree, but a write through the mount all the same: the daemon cannot
                # tell it from one to a file in the tree, and counts it in the open turn.
                self.model.dirty = True
                c = outside.content.ljust(write[0], b"\0")
                outside.content = c[:write[0]] + write[1] + c[write[0] + len(write[1]):]
            got = os.pread(fd, len(want) + 200_000, 0)
            want = live.content if live is not None else outside.content
            assert got == want, f"read back through the held descriptor: {content_diff(got, want)}"

        fd = os.open(self.real(path), getattr(os, how))
        try:
            self.rollback_now(target, data, held=through_the_descriptor)
        finally:
            os.close(fd)

    def _holdable_dirs(self) -> list:
        return [p for p in self.subdirs()
                if len(p) < MAX_DEPTH and self.model.get(p).mode & 0o300 == 0o300]

    @precondition(lambda self: self._holdable_dirs())
    @rule(data=st.data())
    def rollback_with_directory_held(self, data):
        """A process inside a directory across a rollback (an open descriptor of it: what a
        working directory is to the kernel) makes a file there afterwards: the file lands in
        the live tree if the directory is still in it, and fails with ENOENT, as natively, if
        the rollback removed it (it lives on in the store: a file made there would vanish)."""
        path = self.draw_path(data, self._holdable_dirs(), "held")
        target = data.draw(st.sampled_from(sorted(self.model.turns)), label="turn")
        content = data.draw(SOME_BYTES, label="content")
        held = self.model.get(path)
        note(f"hold directory {show(path)} open during the rollback, then create a file in it")

        def make_a_file_there():
            live = self.model.find(held.oid)
            name = next(n for n in (b"made%d" % i for i in range(100))
                        if live is None or n not in live.entries)
            try:
                made = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=fd)
            except OSError as e:
                assert live is None and e.errno == errno.ENOENT, \
                    f"create in the held directory ({'in' if live else 'out of'} the tree): {e}"
                self.stats["creates refused in a held directory a rollback removed"] += 1
                return
            try:
                assert live is not None, "a file was made in a directory the rollback removed"
                write_all(made, content)
            finally:
                os.close(made)
            self.model.write(self.model.names_of(held.oid)[0] + (name,), content, 0o644 & ~UMASK)

        fd = os.open(self.real(path), os.O_RDONLY | os.O_DIRECTORY)
        try:
            self.rollback_now(target, data, held=make_a_file_there)
        finally:
            os.close(fd)

    def _removed_by_a_restore(self) -> list:
        """(turn, directory): a live directory that a restore to that sealed turn removes (it
        did not exist then, its parent did)."""
        return [(n, p) for p in self._holdable_dirs() for n, tree in sorted(self.model.turns.items())
                if self.model.get(p, tree) is None and isinstance(self.model.get(p[:-1], tree), M.Dir)]

    @precondition(lambda self: self._removed_by_a_restore())
    @rule(data=st.data())
    def restore_with_directory_held(self, data):
        """`cowfs restore TURN DIR` removes a directory that did not exist at TURN while a process
        holds it or a directory below it: a file made there afterwards fails with ENOENT, as in
        a directory removed natively, instead of vanishing into the store."""
        turn, path = data.draw(st.sampled_from(self._removed_by_a_restore()), label="turn, directory")
        inner = self.draw_path(data, [p for p in self._holdable_dirs() if p[:len(path)] == path],
                               "held")
        note(f"hold directory {show(inner)} open, restore {show(path)} to turn-{turn} (removes it)")
        fd = os.open(self.real(inner), os.O_RDONLY | os.O_DIRECTORY)
        try:
            self.cli("restore", str(turn), "--", os.fsdecode(b"/".join(path)))
            self.model.remove(path)
            for attempt in (lambda: os.open(b"made", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd),
                            lambda: os.mkdir(b"made", dir_fd=fd)):
                with pytest.raises(OSError) as e:
                    attempt()
                assert e.value.errno == errno.ENOENT, e.value
            # getdents answers ENOENT, which glibc reads as the end, as for a removed directory.
            assert os.listdir(fd) == []
            self.stats["creates refused in a held directory a restore removed"] += 1
        finally:
            os.close(fd)

    @precondition(lambda self: self.files())
    @rule(data=st.data())
    def write_to_a_file_another_process_unlinked(self, data):
        """This process holds a file open; another one removes the name; the writes that follow
        show through the file's other names if it has any, and never in a snapshot."""
        path = self.draw_path(data, self.files(), "path")
        offset, content = data.draw(OFFSETS, label="offset"), data.draw(SOME_BYTES, label="data")
        node = self.model.get(path)
        note(f"open {show(path)} O_RDWR, rm it from a shell, pwrite {len(content)} bytes at {offset}")
        fd = os.open(self.real(path), os.O_RDWR)
        try:
            self.sh(b'rm -- "$1"', path)
            self.model.remove(path)
            assert os.pwrite(fd, content, offset) == len(content)
            names = self.model.names_of(node.oid)
            if names:
                self.model.pwrite(names[0], offset, content)
                want = node.content
            else:
                c = node.content.ljust(offset, b"\0")
                want = c[:offset] + content + c[offset + len(content):]
            assert os.fstat(fd).st_nlink == len(names)
            got = os.pread(fd, len(want) + 200_000, 0)
            assert got == want, f"read back through the descriptor: {content_diff(got, want)}"
        finally:
            os.close(fd)

    def _held_snapshot_candidates(self):
        return [(n, p) for n, tree in sorted(self.model.turns.items())
                for p in self.model.paths({"file"}, tree=tree)
                if isinstance(self.model.get(p), M.File)]

    @precondition(lambda self: self._held_snapshot_candidates())
    @rule(data=st.data())
    def snapshot_file_held_open_while_the_live_file_changes(self, data):
        """A file of .snapshots/turn-N open (perhaps partly read) while the live file at its
        path is rewritten, written in place, truncated, appended to or removed: it goes on
        reading turn N's content."""
        turn, path = data.draw(st.sampled_from(self._held_snapshot_candidates()), label="turn, path")
        want = self.model.get(path, self.model.turns[turn]).content
        first = data.draw(st.sampled_from([0, 1, 4096, len(want)]), label="read first")
        change = data.draw(st.sampled_from(["write", "pwrite", "truncate", "append", "unlink"]),
                           label="change")
        note(f"hold .snapshots/turn-{turn}/{show(path)} open, read {first}, {change} the live file")
        fd = os.open(self.root + b"/" + SNAPDIR + b"/turn-%d/" % turn + b"/".join(path), os.O_RDONLY)
        try:
            head = os.pread(fd, first, 0)
            if change == "write":
                content = data.draw(CONTENT, label="content")
                self.sh(b'cat > "$1"', path, input=content)
                self.model.write(path, content, 0)
            elif change == "pwrite":
                self.op_pwrite(data, path)
            elif change == "truncate":
                self.op_truncate(data, path)
            elif change == "append":
                self.sh(b'cat >> "$1"', path, input=b"appended")
                self.model.append(path, b"appended", 0)
            else:
                self.sh(b'rm -- "$1"', path)
                self.model.remove(path)
            got = head + os.pread(fd, len(want) + 200_000, len(head))
            assert got == want, f"the held snapshot file: {content_diff(got, want)}"
            assert os.fstat(fd).st_size == len(want)
        finally:
            os.close(fd)

    @rule()
    def remount(self):
        try:
            out = self.ws.umount(timeout=CLI_TIMEOUT).stdout.splitlines()
        except CommandError as e:
            raise AssertionError(f"{e}\n{self.hung()}") from None
        self.mounted = False
        self.stats["remounts"] += 1
        sealed = self.model.umount()
        note(f"umount -> {out}")
        want = [f"sealed turn-{sealed}"] if sealed is not None else []
        assert out[:-1] == want, f"umount printed {out}, want {want} first"
        self.mount()
        note("mount")
        turns = json.loads(self.cli("log", "--json"))
        sealed_turns = [t["number"] for t in turns if t["sealed"] is not None]
        open_turns = [t["number"] for t in turns if t["sealed"] is None]
        assert sealed_turns == sorted(self.model.turns), f"log: {turns}"
        assert open_turns in ([], [self.model.open_turn]), f"log: {turns}"

    # -- rules: the snapshots are read-only ---------------------------------------------------
    @rule(data=st.data())
    def write_into_snapshot(self, data):
        turn = data.draw(st.sampled_from(sorted(self.model.turns)), label="turn")
        tree = self.model.turns[turn]
        top = self.root + b"/" + SNAPDIR + b"/turn-%d" % turn

        def snap(p):
            return top + b"".join(b"/" + n for n in p)

        files = self.model.paths({"file"}, tree=tree)
        dirs = self.model.paths({"dir"}, min_depth=0, tree=tree)
        existing = self.model.paths(tree=tree)
        attempts = {
            "create": lambda p: os.close(os.open(snap(p) + b"/new", os.O_WRONLY | os.O_CREAT, 0o644)),
            "mkdir": lambda p: os.mkdir(snap(p) + b"/newdir"),
            "symlink": lambda p: os.symlink(b"x", snap(p) + b"/newlink"),
            "chmod": lambda p: os.chmod(snap(p), 0o700),
            "utime": lambda p: os.utime(snap(p), ns=(1, 1)),
            "setxattr": lambda p: os.setxattr(snap(p), b"user.x", b"y"),
            "removexattr": lambda p: os.removexattr(snap(p), sorted(self.model.get(p, tree).xattrs)[0]),
            "open_write": lambda p: os.close(os.open(snap(p), os.O_WRONLY)),
            "open_trunc": lambda p: os.close(os.open(snap(p), os.O_RDONLY | os.O_TRUNC)),
            "truncate": lambda p: os.truncate(snap(p), 0),
            "unlink": lambda p: os.unlink(snap(p)),
            "rename": lambda p: os.rename(snap(p), snap(p[:-1]) + b"/renamed"),
            "rename_out": lambda p: os.rename(snap(p), self.root + b"/stolen"),
            "mkdir_in_snapdir": lambda p: os.mkdir(self.root + b"/" + SNAPDIR + b"/turn-999999"),
        }
        kinds = {"create": dirs, "mkdir": dirs, "symlink": dirs, "chmod": dirs + files,
                 "utime": dirs + files, "setxattr": dirs + files, "open_write": files,
                 "removexattr": [p for p in dirs + files if self.model.get(p, tree).xattrs],
                 "open_trunc": files, "truncate": files, "unlink": [p for p in existing
                                                                   if p in files or p not in dirs],
                 "rename": existing, "rename_out": existing, "mkdir_in_snapdir": [()]}
        choice = data.draw(st.sampled_from(sorted(k for k in kinds if kinds[k])), label="attempt")
        path = data.draw(st.sampled_from(kinds[choice]), label="path")
        note(f"{choice} {show(path)} in .snapshots/turn-{turn} (must fail with EROFS)")
        with pytest.raises(OSError) as e:
            attempts[choice](path)
        assert e.value.errno == errno.EROFS, f"{choice} {show(path)} in turn-{turn}: {e.value!r}"

    @rule(data=st.data())
    def rm_rf_snapshot(self, data):
        turn = data.draw(st.sampled_from(sorted(self.model.turns)), label="turn")
        note(f"rm -rf .snapshots/turn-{turn} (must fail)")
        cp = run(["rm", "-rf", "--", self.root + b"/" + SNAPDIR + b"/turn-%d" % turn], check=False)
        assert cp.returncode != 0, "rm -rf of a snapshot succeeded"
        assert "Read-only file system" in cp.stderr, cp.stderr

    # -- the invariant -------------------------------------------------------------------
    @invariant()
    def trees_match_model(self):
        if self.mounted:
            started = time.monotonic()
            self.compare_everything()
            self.stats["seconds comparing trees"] += round(time.monotonic() - started, 3)
        # Whatever the next rule changes, it changes after now.
        self.model.clock = time.time_ns()

    def compare_everything(self) -> None:
        self.stats["steps"] += 1
        self.stats["turns compared"] += len(self.model.turns)
        self.stats["entries compared"] += sum(len(self.model.walk(t)) for t in self.model.turns.values())
        problems = []
        names = os.listdir(self.root)
        if SNAPDIR in names:
            problems.append(".snapshots is listed in the root directory")
        problems += compare_tree(self.root, self.model.root, "live", live=True)
        problems += compare_tree(self.backing, self.model.root, "backing", live=True, hidden={b".cowfs"})
        snapdir = self.root + b"/" + SNAPDIR
        for n, tree in sorted(self.model.turns.items()):
            problems += compare_tree(snapdir + b"/turn-%d" % n, tree, f"turn-{n}", live=False)
        try:
            os.lstat(snapdir + b"/turn-%d" % self.model.open_turn)
            problems.append(f"the open turn {self.model.open_turn} shows in .snapshots")
        except FileNotFoundError:
            pass
        latest = os.readlink(snapdir + b"/latest")
        if latest != b"turn-%d" % max(self.model.turns):
            problems.append(f".snapshots/latest -> {latest!r}, want turn-{max(self.model.turns)}")
        if problems:
            shown = problems[:40] + ([f"... and {len(problems) - 40} more"] if len(problems) > 40 else [])
            raise AssertionError("tree differs from the model:\n" + "\n".join(shown))


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def test_model(backing):
    """The stateful model test, on a fresh workspace per example below *backing*."""
    CowfsMachine.base = backing
    CowfsMachine.teardown_problems = []
    CowfsMachine.stats = collections.Counter()
    try:
        run_state_machine_as_test(
            CowfsMachine, settings=settings(stateful_step_count=STEPS, deadline=None))
    finally:
        CowfsMachine.base = None
        print(f"model test on {backing.parent.name}: " +
              ", ".join(f"{k} {v}" for k, v in CowfsMachine.stats.items()))
    assert not CowfsMachine.teardown_problems, CowfsMachine.teardown_problems
