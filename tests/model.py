"""An independent in-memory model of a cowfs workspace and its sealed turns.

Used by test_model.py. It knows nothing about cowfs' implementation: it
only encodes what the user-visible contract says a workspace and its
`.snapshots/turn-N` must contain.

The tree is made of objects with identity: two names of a hard-linked file
are two entries holding the *same* ``File`` instance, so a change through
one name shows through the other. A sealed turn is a ``copy.deepcopy`` of
the whole tree (deepcopy keeps the sharing inside one copy).

Paths are tuples of ``bytes`` names; the root is ``()``.

Timestamps are predicted, not adopted: ``mtime`` is an exact ``int`` (set with
utime, or pinned once seen inside its window), or a :class:`Window` -- what a
change (of content, or of a directory's entries) says: the clock at some
moment while the operation ran, between ``lo`` (set by the test before it: see
``Model.clock``) and ``hi`` (closed by the seal that keeps it, else the moment
of the comparison). A value seen outside its window is an error (e.g. a stale
mtime from before a rollback); inside, it is pinned, and from then on must
not move: in the live tree until the object changes, in a sealed turn for
ever, and through a rollback. ``st_nlink`` is predicted too (``nlink``).

Identity: every object has an ``oid`` that deepcopy keeps, so the object a
descriptor held across a rollback refers to can be found in the tree after it
(a rollback puts turn K's objects back, not copies of them).

Owners: ``uid``/``gid``, 0 for what this (root) test process creates.
"""

from __future__ import annotations

import copy
import itertools
import time
from dataclasses import dataclass, field

Path = tuple  # tuple[bytes, ...]

_oids = itertools.count(1)


def new_oid() -> int:
    return next(_oids)


# How far a file system's timestamp may lag the clock the test reads before an operation: the
# coarse clock the kernel stamps with advances once a tick (4 ms at HZ=250).
CLOCK_SLACK_NS = 50_000_000


@dataclass
class Window:
    """An mtime set by a change made at some moment in [lo, hi]; hi None: not closed yet."""
    lo: int
    hi: int | None = None

    def admits(self, ns: int, now: int) -> bool:
        hi = self.hi if self.hi is not None else now
        return self.lo - CLOCK_SLACK_NS <= ns <= hi + 1_000_000

    def __repr__(self):
        return f"Window({self.lo}, {self.hi if self.hi is not None else 'now'})"


@dataclass(eq=False)
class Node:
    mtime: int | Window | None = None
    uid: int = 0
    gid: int = 0
    oid: int = field(default_factory=new_oid)


@dataclass(eq=False)
class File(Node):
    content: bytes = b""
    mode: int = 0o644
    xattrs: dict = field(default_factory=dict)
    kind = "file"


@dataclass(eq=False)
class Dir(Node):
    mode: int = 0o755
    entries: dict = field(default_factory=dict)
    xattrs: dict = field(default_factory=dict)
    kind = "dir"


@dataclass(eq=False)
class Symlink(Node):
    target: bytes = b""
    mode = 0o777
    kind = "symlink"

    @property
    def xattrs(self):
        return {}


@dataclass(eq=False)
class Fifo(Node):
    mode: int = 0o644
    xattrs: dict = field(default_factory=dict)
    kind = "fifo"


def show(path: Path) -> str:
    """A readable, unambiguous rendering of a path (for notes and messages)."""
    return repr(b"/".join(path)) if path else "<root>"


class ModelError(Exception):
    """The test asked the model for something that is not in it (a test bug)."""


class Model:
    def __init__(self, root_mode: int = 0o755, root_mtime: int | None = None):
        self.clock = time.time_ns()          # a lower bound of the time of the next change
        self.root = Dir(mode=root_mode, mtime=root_mtime)
        self.turns: dict[int, Dir] = {}
        self.open_turn: int | None = None     # None until the first mount
        self.dirty = False                   # changes pending in the open turn
        self.last_rollback: tuple[int, int] | None = None   # (turn before it, rollback turn)

    # -- looking things up --------------------------------------------------------------
    def get(self, path: Path, tree: Dir | None = None):
        node = self.root if tree is None else tree
        for name in path:
            if not isinstance(node, Dir) or name not in node.entries:
                return None
            node = node.entries[name]
        return node

    def dir_of(self, path: Path) -> Dir:
        parent = self.get(path[:-1])
        if not isinstance(parent, Dir):
            raise ModelError(f"no directory {show(path[:-1])}")
        return parent

    def walk(self, tree: Dir | None = None):
        """(path, node) for every entry of the tree, root first, depth first, sorted."""
        root = self.root if tree is None else tree
        out = [((), root)]
        stack = [((), root)]
        while stack:
            path, d = stack.pop()
            for name in sorted(d.entries, reverse=True):
                child = d.entries[name]
                out.append((path + (name,), child))
                if isinstance(child, Dir):
                    stack.append((path + (name,), child))
        return out

    def paths(self, kinds=None, *, min_depth=1, max_depth=99, tree=None) -> list[Path]:
        kinds = set(kinds) if kinds else None
        return sorted(p for p, n in self.walk(tree)
                      if min_depth <= len(p) <= max_depth and (kinds is None or n.kind in kinds))

    def absent(self, max_depth: int = 3) -> list[Path]:
        """Every (existing directory, name) pair with no entry, at depth <= max_depth."""
        from_names = NAMES
        out = []
        for p, n in self.walk():
            if isinstance(n, Dir) and len(p) < max_depth:
                out.extend(p + (name,) for name in from_names if name not in n.entries)
        return sorted(out)

    def height(self, node) -> int:
        """Levels below *node* (0 for a non-directory or an empty directory)."""
        if not isinstance(node, Dir) or not node.entries:
            return 0
        return 1 + max(self.height(c) for c in node.entries.values())

    def link_count(self, tree: Dir | None = None) -> dict[int, int]:
        """id(node) -> st_nlink in the live tree: names of a non-directory; 2 and one for each
        subdirectory of a directory (the root's hidden store, .cowfs, is one)."""
        counts: dict[int, int] = {}
        for p, n in self.walk(tree):
            if isinstance(n, Dir):
                counts[id(n)] = 2 + sum(isinstance(c, Dir) for c in n.entries.values()) + (not p)
            elif p:
                counts[id(n)] = counts.get(id(n), 0) + 1
        return counts

    def find(self, oid: int, tree: Dir | None = None):
        """The object with identity *oid* in the tree, or None."""
        return next((n for _, n in self.walk(tree) if n.oid == oid), None)

    def names_of(self, oid: int) -> list[Path]:
        return [p for p, n in self.walk() if p and n.oid == oid]

    # -- mutations of the live tree ----------------------------------------------------------
    def now(self) -> Window:
        """The mtime a change made now gets."""
        return Window(self.clock)

    def _changed(self) -> None:
        self.dirty = True

    def _add(self, path: Path, node) -> None:
        parent = self.dir_of(path)
        if path[-1] in parent.entries:
            raise ModelError(f"{show(path)} exists")
        parent.entries[path[-1]] = node
        parent.mtime = self.now()
        if node.mtime is None:
            node.mtime = self.now()
        self._changed()

    def write(self, path: Path, data: bytes, mode: int) -> None:
        """open(O_WRONLY|O_CREAT|O_TRUNC) + write: a new file, or new content for an old one."""
        node = self.get(path)
        if node is None:
            self._add(path, File(content=data, mode=mode))
            return
        if not isinstance(node, File):
            raise ModelError(f"{show(path)} is a {node.kind}")
        node.content = data
        node.mtime = self.now()
        self._changed()

    def append(self, path: Path, data: bytes, mode: int) -> None:
        node = self.get(path)
        if node is None:
            self._add(path, File(content=data, mode=mode))
            return
        node.content += data
        node.mtime = self.now()
        self._changed()

    def pwrite(self, path: Path, offset: int, data: bytes) -> None:
        node = self.get(path)
        c = node.content
        if offset > len(c):
            c += b"\0" * (offset - len(c))
        node.content = c[:offset] + data + c[offset + len(data):]
        node.mtime = self.now()
        self._changed()

    def truncate(self, path: Path, size: int, *, same_size_stamps: bool = True) -> None:
        """truncate/ftruncate. To the size it has, the mtime changes only if
        *same_size_stamps* (ftruncate always; truncate(2) natively on ext4, not on XFS nor through cowfs)."""
        node = self.get(path)
        c = node.content
        node.content = c[:size] + b"\0" * max(0, size - len(c))
        if size != len(c) or same_size_stamps:
            node.mtime = self.now()
        self._changed()

    def mkdir(self, path: Path, mode: int) -> None:
        self._add(path, Dir(mode=mode))

    def mkfifo(self, path: Path, mode: int) -> None:
        self._add(path, Fifo(mode=mode))

    def symlink(self, target: bytes, path: Path) -> None:
        self._add(path, Symlink(target=target))

    def link(self, src: Path, dst: Path) -> None:
        node = self.get(src)
        if node is None or isinstance(node, Dir):
            raise ModelError(f"cannot link {show(src)}")
        self._add(dst, node)

    def remove(self, path: Path) -> None:
        """unlink, rmdir or rm -rf: the entry goes (other names of its object stay)."""
        parent = self.dir_of(path)
        if path[-1] not in parent.entries:
            raise ModelError(f"no {show(path)}")
        del parent.entries[path[-1]]
        parent.mtime = self.now()
        self._changed()

    def rename(self, src: Path, dst: Path) -> bool:
        """rename(2). Returns False when it is a no-op (both names hold one object)."""
        node = self.get(src)
        victim = self.get(dst)
        if node is None:
            raise ModelError(f"no {show(src)}")
        if victim is node:
            return False
        sp, dp = self.dir_of(src), self.dir_of(dst)
        del sp.entries[src[-1]]
        dp.entries[dst[-1]] = node
        sp.mtime, dp.mtime = self.now(), self.now()
        self._changed()
        return True

    def exchange(self, a: Path, b: Path, *, dotdot_stamps_mtime: bool) -> None:
        """renameat2(RENAME_EXCHANGE): the two entries swap objects, both directories' mtimes
        change. *dotdot_stamps_mtime*: the file system (XFS) also stamps the mtime of a
        directory whose ".." the exchange rewrites (one moved to another parent); ext4 does not."""
        pa, pb = self.dir_of(a), self.dir_of(b)
        pa.entries[a[-1]], pb.entries[b[-1]] = pb.entries[b[-1]], pa.entries[a[-1]]
        pa.mtime, pb.mtime = self.now(), self.now()
        if dotdot_stamps_mtime and pa is not pb:
            for moved in (pa.entries[a[-1]], pb.entries[b[-1]]):
                if isinstance(moved, Dir):
                    moved.mtime = self.now()
        self._changed()

    def chown(self, path: Path, uid: int, gid: int) -> None:
        """chown(2) by root: a non-directory loses set-user-ID, and set-group-ID if group-executable."""
        node = self.get(path)
        node.uid, node.gid = uid, gid
        if not isinstance(node, (Dir, Symlink)):
            node.mode &= ~0o4000
            if node.mode & 0o010:
                node.mode &= ~0o2000
        self._changed()

    def chmod(self, path: Path, mode: int) -> None:
        self.get(path).mode = mode
        self._changed()

    def utime(self, path: Path, mtime_ns: int) -> None:
        self.get(path).mtime = mtime_ns
        self._changed()

    def setxattr(self, path: Path, name: bytes, value: bytes) -> None:
        self.get(path).xattrs[name] = value
        self._changed()

    def removexattr(self, path: Path, name: bytes) -> None:
        del self.get(path).xattrs[name]
        self._changed()

    # -- turns -------------------------------------------------------------------------------
    def first_mount(self) -> None:
        self.turns[0] = copy.deepcopy(self.root)
        self.open_turn = 1
        self.dirty = False

    def close_windows(self, now: int) -> None:
        """Changes made so far happened before *now*: every open mtime window ends there."""
        for _, n in self.walk():
            if isinstance(n.mtime, Window) and n.mtime.hi is None:
                n.mtime.hi = now

    def seal(self) -> int:
        n = self.open_turn
        self.close_windows(time.time_ns())
        self.turns[n] = copy.deepcopy(self.root)
        self.open_turn += 1
        self.dirty = False
        return n

    def checkpoint(self) -> int:
        return self.seal()

    def rollback(self, target: int) -> tuple[int | None, int]:
        """(turn sealing the pending changes or None, turn recording the rollback)."""
        pending = self.seal() if self.dirty else None
        before = self.open_turn - 1
        self.root = copy.deepcopy(self.turns[target])
        recorded = self.seal()
        self.last_rollback = (before, recorded)
        return pending, recorded

    def umount(self) -> int | None:
        return self.seal() if self.dirty else None


# The small alphabet of names: a space, a newline and a non-UTF-8 byte included; "-" sorts
# before the others, "~" after.
NAMES = (b"a", b"b", b"s p", b"n\nl", b"\xff\xfe", b"-", b"~")
