"""History: what the layers say about the tree of any turn, shared by diff, restore and export.

Owns the questions every user of the history asks: where a directory or a
file was at the end of turn k, what a path held then, and what changed
between two turns. Answers come from the layers and the objects they name,
so they cost O(what changed), never O(tree): a renamed directory costs one
lookup per level; only hard links whose other names no row knows need a walk.

"Turn k" here is the snapshot of sealed turn k; the open turn's number
stands for the live tree (no row is newer than it, so every lookup falls
through to the live objects).
"""

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

import trio

from . import libc
from .attribution import Attribution, Process
from .catalogue import Catalogue
from .snapshot import SnapObject, SnapshotView
from .store import STORE_NAME, ObjectRef, Store


def join(parent: bytes, name: bytes) -> bytes:
    return parent + b"/" + name if parent else name


def under_dot_git(path: bytes) -> bool:
    return any(part.lower() == b".git" for part in path.split(b"/"))


class TurnTrees:
    """Paths of the snapshots of sealed turns: where a directory is, what a path holds.

    Directories are found by identity (inode) through the layers, so a
    renamed directory costs one lookup per level, never a scan.
    """

    def __init__(self, view: SnapshotView, store: Store, root_path: bytes):
        self.view = view
        self.catalogue = view.catalogue
        self.store = store
        self.root_ino = view.root_ino
        self.root_prefix = root_path.rstrip(b"/") + b"/"    # as the kernel names our descriptors
        self.dev = os.fstat(store.fd).st_dev
        self.objects_ino = os.fstat(store.objects_fd).st_ino
        self._dirs: dict[int, dict[int, bytes | None]] = {}          # turn -> ino -> path
        self._lookups: dict[int, dict[bytes, SnapObject | None]] = {}  # turn -> path -> dir

    def forget(self, keep: set[int]) -> None:
        for cache in (self._dirs, self._lookups):
            for turn in list(cache):
                if turn not in keep:
                    del cache[turn]

    def root(self, turn: int) -> SnapObject:
        return SnapObject(turn, self.root_ino, self.view.root_handle)

    def dir_path(self, turn: int, ino: int, handle: ObjectRef) -> bytes | None:
        """Where directory *ino* is in *turn*'s snapshot (b"" for the root); None if not there."""
        if ino == self.root_ino:
            return b""
        known = self._dirs.setdefault(turn, {})
        if ino in known:
            return known[ino]
        known[ino] = None        # until found: stale rows can never make this loop
        # The live place first, then the layers: a move records its row before
        # it happens, so if the live place is already the new one, the row is seen.
        live = self.live_entry(ino, handle)
        place = self.catalogue.location_after(ino, turn)
        if place is not None:
            parent, name = place
            parent_handle = self.catalogue.ref(parent)
        elif live is not None:
            parent, parent_handle, name = live
        else:
            return None
        parent_path = self.dir_path(turn, parent, parent_handle)
        if parent_path is None:
            return None
        # location_after assumes the directory was in the tree at the end of
        # *turn*; if it was not (made later, or detached), the entry says otherwise.
        try:
            found, _, _ = self.view.child(turn, SnapObject(turn, parent, parent_handle), name)
        except (FileNotFoundError, NotADirectoryError):
            return None
        if found != ino:
            return None
        known[ino] = join(parent_path, name)
        return known[ino]

    def live_entry(self, ino: int, handle: ObjectRef) -> tuple[int, ObjectRef, bytes] | None:
        """(parent ino, parent handle, name) holding object *ino* now; None if it cannot be found.

        From the path the kernel keeps for it (always known for a directory;
        for a file only while its dentry is cached), walked down from the root,
        which also reaches directories detached into the store. Never up with
        "..": our descriptors belong to the mount namespace where our own mount
        sits on the root, and ".." from a child of the root would step into it.
        """
        try:
            fd = self.store.open_object(handle)
            try:
                path = os.readlink(libc.proc_path(fd))
            finally:
                os.close(fd)
        except OSError:
            return None
        if not path.startswith(self.root_prefix):
            return None       # a disconnected dentry: the kernel does not know where it is
        parent_path, _, name = path[len(self.root_prefix):].rpartition(b"/")
        root_fd = self.view.object_fd(self.root_ino, self.view.root_handle)
        try:
            parent_fd = os.open(parent_path or b".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC,
                                dir_fd=root_fd)
        except OSError:
            return None       # moved meanwhile (its row says where it was) or removed for good
        try:
            st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
            parent = os.fstat(parent_fd).st_ino
            if st.st_ino != ino or st.st_dev != self.dev or parent == self.objects_ino:
                return None   # moved meanwhile (its row says where it was), or detached itself
            return parent, ObjectRef(parent, self.view.root_handle, parent_path or b"."), name
        except OSError:
            return None
        finally:
            os.close(parent_fd)

    def entry_then(self, turn: int, parent: int, parent_handle: ObjectRef,
                   name: bytes) -> tuple[int | None, bool]:
        """(what entry (parent, name) held at the end of *turn*, whether it changed since).

        The live entry first, then the layers, as SnapshotView.child does.
        """
        try:
            live = os.stat(name, dir_fd=self.view.object_fd(parent, parent_handle),
                           follow_symlinks=False).st_ino
        except (FileNotFoundError, NotADirectoryError):
            live = None
        found, held = self.catalogue.entry_after(parent, name, turn)
        return (held, True) if found else (live, False)

    def entry_path(self, turn: int, parent: int, parent_handle: ObjectRef, name: bytes,
                   ino: int) -> bytes | None:
        """The path of entry (parent, name) in *turn* if it held *ino* then, else None."""
        if self.entry_then(turn, parent, parent_handle, name)[0] != ino:
            return None
        parent_path = self.dir_path(turn, parent, parent_handle)
        return None if parent_path is None else join(parent_path, name)

    def lookup(self, turn: int, path: bytes) -> tuple[int, ObjectRef, os.stat_result] | None:
        """(ino, handle, current stat) of what *path* holds in *turn*'s snapshot, if anything."""
        parent = self.lookup_parent(turn, path)
        if parent is None:
            return None
        try:
            return self.view.child(turn, parent, path.rpartition(b"/")[2])
        except (FileNotFoundError, NotADirectoryError):
            return None

    def lookup_parent(self, turn: int, path: bytes) -> SnapObject | None:
        """The directory holding *path* in *turn*'s snapshot, if there is one."""
        return self._lookup_dir(turn, path.rpartition(b"/")[0])

    def _lookup_dir(self, turn: int, path: bytes) -> SnapObject | None:
        if not path:
            return self.root(turn)
        known = self._lookups.setdefault(turn, {})
        if path not in known:
            found = self.lookup(turn, path)
            known[path] = (SnapObject(turn, found[0], found[1])
                           if found is not None and stat.S_ISDIR(found[2].st_mode) else None)
        return known[path]

    def is_empty(self, turn: int, ino: int, handle: ObjectRef) -> bool:
        """True if directory *ino* has no entry in *turn*; O(1) unless names were added since.

        Live names first, then the rows (a change records its row before it happens).
        """
        fd = self.view.object_fd(ino, handle)
        with os.scandir(libc.proc_path(fd)) as live:
            for entry in live:
                name = os.fsencode(entry.name)
                if ino == self.root_ino and name == STORE_NAME:
                    continue
                found, held = self.catalogue.entry_after(ino, name, turn)
                if not found or held is not None:
                    return False
        return all(held is None for held in self.catalogue.entries_after(ino, turn).values())

    def walk(self, turn: int, path: bytes, ino: int, handle: ObjectRef, st: os.stat_result,
             on_empty, on_dot_git) -> Iterator[tuple[bytes, SnapObject, int]]:
        """(path, object, mode in *turn*) of every non-directory at or below *path*."""
        stack = [(path, ino, handle, st)]
        while stack:
            path, ino, handle, st = stack.pop()
            if on_dot_git is not None and under_dot_git(path):
                on_dot_git(path)
                continue
            obj = SnapObject(turn, ino, handle)
            mode = self.view.attrs(turn, ino, st).mode
            if not stat.S_ISDIR(mode):
                yield path, obj, mode
                continue
            names = self.view.names(obj)
            if not names and path:
                on_empty(path)
            for name in reversed(names):
                child_ino, child_handle, child_st = self.view.child(turn, obj, name)
                stack.append((join(path, name), child_ino, child_handle, child_st))

    def names_of(self, turn: int, ino: int, handle: ObjectRef, st: os.stat_result,
                  hint: bytes | None) -> set[bytes] | None:
        """Every path of file *ino* at the end of *turn*; None if only a walk can tell.

        A change in place changes the file under all its names, whatever name
        it went through (the hint is one it had at the time, maybe gone by the
        end of the turn). Its names at the end of the turn are the entries that
        held it then: those changed since left a row holding it; the others
        hold it still, so they are among its names now. *st* was taken before
        the rows are read: a name lost after it has left its row by then.
        """
        now = st.st_nlink - (1 if self.store.kept(ino) else 0)
        if now > 1:
            return None       # hard links: finding the other names takes a walk
        names = set()
        for parent, name in self.catalogue.holders_after(ino, turn):
            path = self.entry_path(turn, parent, self.catalogue.ref(parent), name, ino)
            if path is not None:
                names.add(path)
        if now == 0:
            return names
        # Its one name now: the hint, if that entry still holds it, else the kernel's path for it.
        parent = self.lookup_parent(turn, hint) if hint is not None else None
        if parent is not None:
            name = hint.rpartition(b"/")[2]
            held, changed_since = self.entry_then(turn, parent.ino, parent.handle, name)
            if held == ino and not changed_since:
                return names | {hint}
        live = self.live_entry(ino, handle)
        if live is None:
            return None
        path = self.entry_path(turn, *live, ino)
        return names | ({path} if path is not None else set())


# -- what changed between two turns -----------------------------------------------------------
KINDS = {"A": "added", "M": "modified", "D": "deleted", "R": "renamed", "T": "type changed"}


@dataclass(frozen=True)
class Side:
    """What a path holds at one end of a diff: the object, its kind and size then, and the
    directory holding it (the entry a process changed)."""
    ino: int
    handle: ObjectRef
    mode: int
    size: int
    parent: int

    def obj(self, turn: int) -> SnapObject:
        return SnapObject(turn, self.ino, self.handle)


@dataclass(frozen=True)
class PathChange:
    """One changed path: kind is A, M, D, R or T (git's letters); old is None for A, new for D."""
    kind: str
    path: bytes
    old_path: bytes | None
    old: Side | None
    new: Side | None


def _within(path: bytes, filters: list[bytes]) -> bool:
    return not filters or any(not f or path == f or path.startswith(f + b"/") for f in filters)


class TurnDiffer:
    """The paths that differ between the ends of turns *a* and *b* (either may be the open
    turn, standing for the live tree), found from the layers between them.

    Candidates are every path, at either end, of an entry or object with a row
    in a turn between a and b: whatever differs has such a row. A directory
    that is not the same object at both ends is expanded (O(its subtree), as
    the change is). Renames are exact: the same object removed from one path
    and added at another, never guessed from content. Directories themselves
    are not listed, only what they hold (as git does).
    """
    CHUNK = 1 << 20

    def __init__(self, trees: TurnTrees, a: int, b: int):
        self.trees, self.view, self.catalogue = trees, trees.view, trees.catalogue
        self.a, self.b = a, b

    def run(self, filters: list[bytes] = ()) -> list[PathChange]:
        filters = [f.strip(b"/") for f in filters]
        candidates = sorted(p for p in self._candidates() if _within(p, filters))
        changes, added, removed = [], {}, {}
        seen = set(candidates)
        queue = list(reversed(candidates))
        while queue:
            path = queue.pop()
            old, new = self._side(self.a, path), self._side(self.b, path)
            for side, turn in ((old, self.a), (new, self.b)):
                if side is not None and stat.S_ISDIR(side.mode) and (
                        old is None or new is None or old.ino != new.ino):
                    for name in self.view.names(side.obj(turn)):
                        child = join(path, name)
                        if child not in seen:
                            seen.add(child)
                            queue.append(child)
            old = old if old is not None and not stat.S_ISDIR(old.mode) else None
            new = new if new is not None and not stat.S_ISDIR(new.mode) else None
            if old is None and new is not None:
                added[path] = new
            elif new is None and old is not None:
                removed[path] = old
            elif old is not None and stat.S_IFMT(old.mode) != stat.S_IFMT(new.mode):
                changes.append(PathChange("T", path, path, old, new))
            elif old is not None and self._differs(old, new):
                changes.append(PathChange("M", path, path, old, new))
        changes += self._pair_renames(added, removed)
        return sorted(changes, key=lambda c: c.path)

    def _candidates(self) -> set[bytes]:
        low, high = min(self.a, self.b), max(self.a, self.b)
        entries, objects = self.catalogue.changed_between(low, high)
        paths: set[bytes] = set()
        for parent, name in entries:
            ref = self.catalogue.ref(parent)
            for turn in (self.a, self.b):
                dir_path = self.trees.dir_path(turn, parent, ref) if ref is not None else None
                if dir_path is not None:
                    paths.add(join(dir_path, name))
        hard: dict[int, set[int]] = {}       # turn -> files only a walk finds the names of
        for ino, hint in objects:
            ref = self.catalogue.ref(ino)
            try:
                st = os.stat(self.view.object_fd(ino, ref))
            except (OSError, TypeError):
                continue        # not reachable any more (no row names it)
            if stat.S_ISDIR(st.st_mode):
                continue        # its entries have rows of their own
            for turn in (self.a, self.b):
                names = self.trees.names_of(turn, ino, ref, st, hint)
                if names is None:
                    hard.setdefault(turn, set()).add(ino)
                else:
                    paths |= names
        for turn, inos in hard.items():
            root = self.trees.root(turn)
            st = os.stat(self.view.object_fd(root.ino, root.handle))
            paths |= {path for path, obj, _ in self.trees.walk(turn, b"", root.ino, root.handle, st,
                                                               lambda path: None, None)
                      if obj.ino in inos}
        return paths

    def _side(self, turn: int, path: bytes) -> Side | None:
        parent = self.trees.lookup_parent(turn, path)
        if parent is None:
            return None
        try:
            ino, handle, st = self.view.child(turn, parent, path.rpartition(b"/")[2])
        except (FileNotFoundError, NotADirectoryError):
            return None
        attrs = self.view.attrs(turn, ino, st)
        return Side(ino, handle, attrs.mode, attrs.size, parent.ino)

    def _differs(self, old: Side, new: Side) -> bool:
        if old.mode != new.mode:
            return True
        if stat.S_ISLNK(old.mode):
            return self.view.readlink(old.obj(self.a)) != self.view.readlink(new.obj(self.b))
        if not stat.S_ISREG(old.mode):
            return False
        if old.size != new.size:
            return True
        if old.ino == new.ino and (self.catalogue.content_after(old.ino, self.a)
                                   == self.catalogue.content_after(new.ino, self.b)):
            return False        # the same content: no copy taken between the two ends
        return self.read(old.obj(self.a)) != self.read(new.obj(self.b))

    def read(self, obj: SnapObject) -> bytes:
        fd, _ = self.view.content_source(obj)
        try:
            chunks = []
            while chunk := os.read(fd, self.CHUNK):
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

    @staticmethod
    def _pair_renames(added: dict[bytes, Side], removed: dict[bytes, Side]) -> list[PathChange]:
        """The same object gone from one path and new at another is a rename; the rest stay
        additions and deletions."""
        gone = {}
        for path, side in sorted(removed.items()):
            gone.setdefault(side.ino, path)
        changes = []
        for path, side in sorted(added.items()):
            old_path = gone.pop(side.ino, None)
            if old_path is None:
                changes.append(PathChange("A", path, None, None, side))
            else:
                changes.append(PathChange("R", path, old_path, removed.pop(old_path), side))
        changes += [PathChange("D", path, path, side, None) for path, side in removed.items()]
        return changes


# -- who made a change ------------------------------------------------------------------------
def writer_of(change: PathChange, catalogue: Catalogue, low: int, high: int,
              open_writers: Attribution | None) -> Process | None:
    """The last process that made *change* in the turns after *low* up to *high*.

    *open_writers* is the open turn's record when *high* is the open turn. A
    change of content or mode is the object's; anything else (and a file
    replaced by a rename, as `sed -i` does) is the entry's.
    """
    side = change.new or change.old
    name = (change.path if change.new else change.old_path).rpartition(b"/")[2]
    keys = [("entry", (side.parent, name)), ("object", side.ino)]
    if change.kind == "M":
        keys.reverse()
    for kind, key in keys:
        if open_writers is not None:
            found = (open_writers.entry_writer(*key) if kind == "entry"
                     else open_writers.object_writer(key))
            if found is not None:
                return found
        row = (catalogue.entry_writer(*key, low, high) if kind == "entry"
               else catalogue.object_writer(key, low, high))
        if row is not None:
            *fields, started, ancestors = row
            return Process(*fields, tuple(int(p) for p in ancestors.split()), started or 0)
    return None


def change_record(change: PathChange, process: Process | None) -> dict:
    """A change as the control channel sends it (paths as str, surrogateescape)."""
    def side(s):
        return (None, None) if s is None else (s.mode, s.size)
    (old_mode, old_size), (new_mode, new_size) = side(change.old), side(change.new)
    return {"kind": change.kind, "path": os.fsdecode(change.path),
            "old_path": os.fsdecode(change.old_path) if change.old_path is not None else None,
            "old_mode": old_mode, "new_mode": new_mode, "old_size": old_size, "new_size": new_size,
            "process": process.as_dict() if process is not None else None}


class HistoryRunner:
    """History questions inside the daemon: one at a time, each in a worker thread with a
    catalogue connection and a snapshot view of its own, so FUSE requests go on meanwhile."""

    def __init__(self, store: Store, root_path: bytes, root_ino: int, root_handle: ObjectRef):
        """Made before mounting: its catalogue connection is opened by name (see `prepare`)."""
        self.store, self.root_path = store, root_path
        self.root_ino, self.root_handle = root_ino, root_handle
        self.catalogue: Catalogue | None = None
        self._lock = trio.Lock()

    def prepare(self) -> None:
        self.catalogue = Catalogue(os.fsdecode(self.store.path + b"/catalogue.db"))
        self.catalogue.turns()      # opens its WAL and shared-memory files now

    def close(self) -> None:
        if self.catalogue is not None:
            self.catalogue.close()

    async def diff(self, a: int, b: int, filters: list[bytes], open_turn: int,
                   open_writers: Attribution) -> list[dict]:
        # A copy, taken here on the trio thread: a seal during the diff resets the live record.
        writers = open_writers.copy()
        async with self._lock:
            return await trio.to_thread.run_sync(self._diff, a, b, filters, open_turn, writers)

    def _diff(self, a: int, b: int, filters: list[bytes], open_turn: int,
              open_writers: Attribution) -> list[dict]:
        view = SnapshotView(self.store, self.root_ino, self.root_handle)
        view.catalogue = self.catalogue
        try:
            trees = TurnTrees(view, self.store, self.root_path)
            low, high = min(a, b), max(a, b)
            live = open_writers if high == open_turn else None
            return [change_record(c, writer_of(c, self.catalogue, low, high, live))
                    for c in TurnDiffer(trees, a, b).run(filters)]
        finally:
            view.close()
