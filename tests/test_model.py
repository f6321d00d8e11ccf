"""The oracle (brief section 4): a model-based stateful test of cowfs.

Random sequences of file operations run through a real cowfs mount (real
syscalls from this process, plus shell commands: `cat >`, `cat >>`, `rm`,
`rm -rf`, `mv -T`), interleaved with checkpoints, rollbacks (to any sealed
turn, to turn 0, undoing the last rollback, with a file held open) and
remounts. An independent in-memory model (tests/model.py) says what the live
tree and every sealed turn must contain.

After every step, the live tree and every `.snapshots/turn-N` are compared
with the model: the names at each level, type, content and size, permission
bits, symlink target, `user.*` xattrs, hard-link identity (two names of one
object show one inode number, different objects different ones), st_nlink in
the live tree, and mtimes (set with utime, or learnt on first sight: from
then on an mtime must not move until the object changes, a sealed turn's
never, and a rollback must restore them). Also: `.snapshots` is not listed in
the root, the open turn has no snapshot, `latest` names the last sealed turn,
every turn number printed by checkpoint / rollback / umount is the model's,
`status` and `log` agree with it after each mount, and writes into a
snapshot fail with EROFS.

Each hypothesis example mounts a fresh workspace of its own below the
`backing` directory of the wrapper test (hypothesis cannot use per-example
fixtures), so the test runs on XFS (reflink) and on ext4 (copy).

Knobs: COWFS_HYPOTHESIS_EXAMPLES / COWFS_HYPOTHESIS_PROFILE (conftest), and
COWFS_MODEL_STEPS (stateful_step_count, default 30). With -s the wrapper
prints what was exercised (examples, steps, checkpoints, rollbacks, ...).

Minimal reproductions of the bugs this test found: test_model_regressions.py.
"""

from __future__ import annotations

import collections
import errno
import itertools
import json
import os
import shutil
import stat
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
from conftest import CommandError, Workspace, is_fuse_mounted, run
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


def compare_tree(top: bytes, tree: M.Dir, label: str, *, live: bool) -> list[str]:
    """Every way the real tree at *top* differs from the model tree (empty: equal).

    An object whose mtime the model does not know yet takes the one seen here:
    from then on it must not change until the model says the object changed
    (a sealed turn never changes, and a rollback restores mtimes too).
    """
    problems: list[str] = []
    counts = M.Model().link_count(tree)
    ino_of: dict[int, int] = {}      # id(model object) -> st_ino seen
    obj_of: dict[int, int] = {}      # st_ino -> id(model object)

    def visit(rel: tuple, node) -> None:
        real = top + b"".join(b"/" + n for n in rel)
        where = f"{label}:{show(rel)}"
        try:
            st_ = os.lstat(real)
        except OSError as e:
            problems.append(f"{where}: lstat failed: {e}")
            return
        kind = kind_of(st_.st_mode)
        if kind != node.kind:
            problems.append(f"{where}: is a {kind}, want a {node.kind}")
            return
        if ino_of.setdefault(id(node), st_.st_ino) != st_.st_ino:
            problems.append(f"{where}: hard link split: inode {st_.st_ino}, "
                            f"another name of it has {ino_of[id(node)]}")
        if obj_of.setdefault(st_.st_ino, id(node)) != id(node):
            problems.append(f"{where}: inode {st_.st_ino} is shared with a different object")
        if stat.S_IMODE(st_.st_mode) != node.mode:
            problems.append(f"{where}: mode {stat.S_IMODE(st_.st_mode):o}, want {node.mode:o}")
        if node.mtime is None:
            node.mtime = st_.st_mtime_ns
        elif st_.st_mtime_ns != node.mtime:
            problems.append(f"{where}: mtime_ns {st_.st_mtime_ns}, want {node.mtime}")
        if live and kind != "dir" and st_.st_nlink != counts[id(node)]:
            problems.append(f"{where}: st_nlink {st_.st_nlink}, want {counts[id(node)]}")
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
            elif kind == "dir":
                names = set(os.listdir(real))
                want = set(node.entries)
                if names != want:
                    problems.append(f"{where}: names differ: extra {sorted(names - want)}, "
                                    f"missing {sorted(want - names)}")
                for name in sorted(names & want):
                    visit(rel + (name,), node.entries[name])
            if kind != "symlink":
                xattrs = user_xattrs(real)
                if xattrs != node.xattrs:
                    problems.append(f"{where}: user xattrs {xattrs}, want {node.xattrs}")
        except OSError as e:
            problems.append(f"{where}: {e!r}")

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
        self.model = M.Model(root_mode=stat.S_IMODE(os.stat(self.root).st_mode))
        self.mounted = False
        self.daemon_pid = None
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

    def op_pwrite(self, data):
        path = self.draw_path(data, self.files(), "path")
        offset = data.draw(OFFSETS, label="offset")
        content = data.draw(SOME_BYTES, label="content")
        note(f"pwrite {len(content)} bytes at {offset} into {show(path)}")
        fd = os.open(self.real(path), os.O_WRONLY)
        try:
            assert os.pwrite(fd, content, offset) == len(content)
        finally:
            os.close(fd)
        self.model.pwrite(path, offset, content)

    def op_truncate(self, data):
        path = self.draw_path(data, self.files(), "path")
        size = data.draw(SIZES, label="size")
        note(f"truncate {show(path)} to {size}")
        os.truncate(self.real(path), size)
        self.model.truncate(path, size)

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
               "setxattr": self.op_setxattr, "mkfifo": self.op_mkfifo}
        for name in data.draw(st.lists(st.sampled_from(sorted(ops)), max_size=6), label="initial ops"):
            needs_absent = name in ("mkdir", "symlink", "mkfifo", "link")
            if (needs_absent and not self.model.absent()) or (name == "link" and not self.nondirs()) \
                    or (name == "write" and not (self.model.absent() or self.files())):
                continue
            ops[name](data)
        note("mount")
        self.mount()
        # Creating the store (.cowfs) in the root changes the root's mtime.
        self.model.root.mtime = None
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
        for p in self.model.absent(max_depth=4) + self.model.paths({"dir"}):
            if p == src or p[:len(src)] == src:
                continue
            victim = self.model.get(p)
            if victim is not None and victim.entries:
                continue
            if len(p) + self.model.height(node) > 4:
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

    def rollback_now(self, target: int) -> None:
        self.stats["rollbacks"] += 1
        out = self.cli("rollback", str(target))
        pending, recorded = self.model.rollback(target)
        note(f"rollback {target} -> {out.strip()!r}")
        want = ([f"sealed pending changes as turn-{pending}"] if pending is not None else [])
        want.append(f"rolled back to turn-{target} (recorded as turn-{recorded})")
        assert out.splitlines() == want, f"rollback printed {out!r}, want {want}"

    @rule(data=st.data())
    def rollback(self, data):
        self.rollback_now(data.draw(st.sampled_from(sorted(self.model.turns)), label="turn"))

    @rule()
    def rollback_to_zero(self):
        self.rollback_now(0)

    @precondition(lambda self: self.model.last_rollback is not None)
    @rule()
    def undo_last_rollback(self):
        """Roll back to the turn sealed just before the last rollback: a rollback of a rollback."""
        self.rollback_now(self.model.last_rollback[0])

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
        """A rollback while a file is held open (for writing) by someone."""
        path = self.draw_path(data, self.files(), "held open")
        how = data.draw(st.sampled_from(["O_RDONLY", "O_RDWR"]), label="open flags")
        target = data.draw(st.sampled_from(sorted(self.model.turns)), label="turn")
        note(f"hold {show(path)} open {how} during the rollback")
        fd = os.open(self.real(path), getattr(os, how))
        try:
            self.rollback_now(target)
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
        if not self.mounted:
            return
        self.stats["steps"] += 1
        self.stats["turns compared"] += len(self.model.turns)
        self.stats["entries compared"] += sum(len(self.model.walk(t)) for t in self.model.turns.values())
        problems = []
        names = os.listdir(self.root)
        if SNAPDIR in names:
            problems.append(".snapshots is listed in the root directory")
        problems += compare_tree(self.root, self.model.root, "live", live=True)
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
