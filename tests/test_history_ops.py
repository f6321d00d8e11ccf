"""History operations (rollback, restore) behind the kernel's back: never a silent loss.

A rollback or restore changes the backing tree without the kernel asking. What
the kernel still holds afterwards (a process's working directory, an open
descriptor, cached sizes and pages) must then behave as it would natively, on
every exit path of the operation: a file made in a directory the operation
removed fails with ENOENT instead of vanishing into the store, and an
operation that fails part-way leaves the kernel seeing what is on disk, so the
next write cannot put the old content back.

Expectations come from what each test did (and, for errnos, from the same
steps on a native directory), never from reading the mount under test alone.
"""

import errno
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import CommandError, run
from treeview import tree

# A process that runs one Python statement a line, in the directory it was started in, and
# answers with the value of `r` or the errno name the statement raised.
_HOLDER = r"""
import errno, os, sys
for line in sys.stdin:
    r = None
    try:
        exec(line)
        print(repr(r), flush=True)
    except OSError as e:
        print(errno.errorcode.get(e.errno, e.errno), flush=True)
"""


class Holder:
    """A process that stays in *cwd* (its working directory) across history operations."""

    def __init__(self, cwd: Path):
        self.proc = subprocess.Popen([sys.executable, "-c", _HOLDER], cwd=cwd, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def __call__(self, statement: str) -> str:
        self.proc.stdin.write(statement + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


@contextmanager
def holding(cwd: Path):
    holder = Holder(cwd)
    try:
        yield holder
    finally:
        holder.close()


# What the holder tries in its removed working directory, and what a native directory answers.
ATTEMPTS = [
    "open('notes.txt', 'w').write('important')",
    "os.mkdir('made')",
    "os.symlink('t', 'link')",
    "os.mknod('fifo', 0o600 | 0o010000)",
    "r = sorted(os.listdir('.'))",
    "os.rename('kept', 'renamed')",
    "os.unlink('kept')",
    "r = open('kept').read()",
]


def native_answers(tmp: Path) -> list[str]:
    """What each attempt gets natively in a working directory removed by `rm -rf`."""
    d = tmp / "native" / "deep"
    d.mkdir(parents=True)
    (d / "kept").write_text("kept\n")
    with holding(d) as h:
        run(["rm", "-rf", str(tmp / "native")])
        return [h(a) for a in ATTEMPTS]


def checkpoint(ws) -> int:
    return int(ws.cli("checkpoint").stdout.strip().removeprefix("turn-"))


def names_anywhere(root, name: bytes) -> list[bytes]:
    """Every path below *root* (the store included) whose last component is *name*."""
    found = []
    for dirpath, dirnames, filenames in os.walk(os.fsencode(root)):
        found += [os.path.join(dirpath, n) for n in dirnames + filenames if n == name]
    return found


def make_deep(ws) -> int:
    """Turn 1 is the tree before deep/ existed; the open turn has deep/ with files in it."""
    p = ws.path
    (p / "top").write_text("top\n")
    ws.mount()
    checkpoint(ws)
    (p / "deep" / "sub").mkdir(parents=True)
    (p / "deep" / "kept").write_text("kept\n")
    (p / "deep" / "sub" / "kept").write_text("kept\n")
    return checkpoint(ws)


@pytest.mark.parametrize("how", ["rollback", "restore"])
def test_a_directory_a_history_operation_removed_is_dead_for_whoever_is_still_inside(
        workspace, tmp_path, how):
    want = native_answers(tmp_path)
    assert want[0] == "ENOENT", want     # what the user would have seen natively
    turn = make_deep(workspace)
    p = workspace.path
    with holding(p / "deep") as top, holding(p / "deep" / "sub") as inner:
        top("fd = os.open('.', os.O_RDONLY | os.O_DIRECTORY)")
        if how == "rollback":
            workspace.cli("rollback", str(turn - 1))
        else:
            workspace.cli("restore", str(turn - 1), "deep")
        assert not (workspace.backing / "deep").exists()
        # Both the directory removed and one inside it behave as natively removed ones.
        assert [top(a) for a in ATTEMPTS] == want
        assert [inner(a) for a in ATTEMPTS] == want
        assert top("os.open('n2', os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=fd)") == "ENOENT"
        # Nothing landed anywhere: not in the tree, not in the store.
        for name in (b"notes.txt", b"made", b"link", b"fifo", b"renamed", b"n2"):
            assert names_anywhere(workspace.backing, name) == [], name
        changes = workspace.cli("diff", "--name-status").stdout     # a restore is a change
        assert changes == ("" if how == "rollback" else "D\tdeep/kept\nD\tdeep/sub/kept\n")
        # Brought back, the same directory takes new files again, and they are in the tree.
        workspace.cli("rollback", str(turn))
        assert top("r = open('notes.txt', 'w').write('important')") == "9"
        assert inner("r = sorted(os.listdir('.'))") == "['kept']"
    assert (workspace.backing / "deep" / "notes.txt").read_text() == "important"
    assert (p / "deep" / "notes.txt").read_text() == "important"


def test_a_file_a_rollback_removed_takes_the_writes_of_its_holder_as_natively(workspace):
    """Natively a write to an open descriptor of a removed file goes to that unlinked file; here
    too, and history keeps what the file held at its turn."""
    turn = make_deep(workspace)
    p = workspace.path
    with holding(p) as h:
        h("f = open('deep/kept', 'a')")
        workspace.cli("rollback", str(turn - 1))
        assert h("r = f.write('late\\n'); f.flush(); os.fsync(f.fileno())") == "5"
        assert h("f.close()") == "None"
    assert not (workspace.backing / "deep").exists()
    assert (workspace.snapshots / f"turn-{turn}" / "deep" / "kept").read_text() == "kept\n"
    workspace.cli("rollback", str(turn))
    assert (p / "deep" / "kept").read_text() == "kept\n"
    assert (workspace.backing / "deep" / "kept").read_text() == "kept\n"


def kernel_agrees_with_disk(ws, names) -> None:
    """For each file: what the mount shows (size, content) is what the backing file holds, and
    an append through the mount lands after the backing file's last byte."""
    for name in names:
        disk = (ws.backing / name).read_bytes()
        assert os.stat(ws.path / name).st_size == len(disk), name
        assert (ws.path / name).read_bytes() == disk, name
        with open(ws.path / name, "ab") as f:
            f.write(b"Z")
        assert (ws.backing / name).read_bytes() == disk + b"Z", name


def test_a_restore_that_fails_part_way_is_not_undone_by_the_next_write(workspace):
    p = workspace.path
    (p / ".cowfsignore").write_text("*.log\n")
    (p / "a").write_bytes(b"0123456789")
    workspace.mount()
    checkpoint(workspace)                                   # turn 1: a has 10 bytes
    (p / "a").write_bytes(b"x" * 30)
    (p / "d").mkdir()
    (p / "d" / "x.log").write_text("ignored\n")
    (p / "e").write_text("e\n")
    reader = open(p / "a", "rb")                            # its pages cached across the restore
    try:
        assert reader.read() == b"x" * 30
        cp = workspace.cli("restore", "1", "a", "d", "e", check=False)
        assert cp.returncode == 1, (cp.stdout, cp.stderr)
        error = cp.stderr.strip()
        assert len(error.splitlines()) == 1, error
        assert "restored: a; not (fully) restored: d, e" in error, error
        reader.seek(0)
        assert reader.read() == b"0123456789"
    finally:
        reader.close()
    assert (workspace.backing / "a").read_bytes() == b"0123456789"
    assert (workspace.backing / "e").read_text() == "e\n"  # never reached
    kernel_agrees_with_disk(workspace, ["a", "e"])
    # What was restored is a change of the open turn, shown and undoable.
    assert "M\ta" in workspace.cli("diff", "--name-status").stdout


@pytest.fixture
def immutable():
    """chattr +i on backing files; taken off again whatever happens (or the test's tree could
    not be removed)."""
    made = []

    def make(path: Path) -> None:
        subprocess.run(["chattr", "+i", str(path)], check=True)
        made.append(path)

    yield make
    for path in made:
        subprocess.run(["chattr", "-i", str(path)], check=False)


def test_a_rollback_that_fails_part_way_leaves_the_kernel_seeing_the_disk(workspace, immutable):
    """An immutable file (which not even root may change) stops the rollback in its last phase,
    after it has removed new files and restored the contents of others."""
    p = workspace.path
    names = [f"f{i}" for i in range(6)]
    for i, name in enumerate(names):
        (p / name).write_bytes(b"%d" % i * 10)
    workspace.mount()
    t0 = tree(workspace.backing, hidden={b".cowfs"})
    before = checkpoint(workspace)
    holders = [open(p / name, "rb") for name in names]      # pages cached across the rollback
    try:
        for i, name in enumerate(names):
            (p / name).write_bytes(b"changed %d\n" % i * 40)
            holders[i].seek(0)
            assert holders[i].read() == b"changed %d\n" % i * 40
        (p / "new").write_text("new\n")
        (p / "newdir").mkdir()
        changed = tree(workspace.backing, hidden={b".cowfs"})
        checkpoint(workspace)
        immutable(workspace.backing / "f3")
        cp = workspace.cli("rollback", str(before), check=False)
        assert cp.returncode == 1, (cp.stdout, cp.stderr)
        assert len(cp.stderr.strip().splitlines()) == 1 and "part-way" in cp.stderr, cp.stderr
        # Some of it was done, and what the kernel shows is what is on disk, held pages too.
        now = tree(workspace.backing, hidden={b".cowfs"})
        assert now not in (t0, changed)
        assert b"new" not in now and now[b"f3"] == changed[b"f3"]
        assert tree(p) == now
        for i, name in enumerate(names):
            holders[i].seek(0)
            assert holders[i].read() == now[os.fsencode(name)][1], name
    finally:
        for f in holders:
            f.close()
    kernel_agrees_with_disk(workspace, [n for n in names if n != "f3"])
    # Once the file may change again, the same rollback goes through.
    subprocess.run(["chattr", "-i", str(workspace.backing / "f3")], check=True)
    workspace.cli("rollback", str(before))
    assert tree(workspace.backing, hidden={b".cowfs"}) == t0
    assert tree(p) == t0
