"""Snapshots: the read-only tree of any sealed turn, resolved from the layers.

Owns how `.snapshots/turn-K/...` is computed: the entry (D, name) of turn K
is the earliest entry pre-image recorded after K, or else D's live entry;
an object's attributes and content are the earliest attribute / content
pre-image recorded after K, or else the live object's. Objects are reached
through their file handles wherever they live now (tree or store), so
directory renames never need a path rewrite. Knows nothing about FUSE
replies: it returns plain values that fs.py turns into them.

A snapshot hides every path that the ignore rules of the turn after it match
(ignore.py): such paths may have changed since without a pre-image. So a
view knows the path of each directory it resolved (a directory has one).
"""

import errno
import os
import stat
from collections import OrderedDict
from dataclasses import dataclass

from . import libc
from .capture import read_xattrs
from .ignore import RuleHistory
from .store import STORE_NAME, ObjectRef, Store


@dataclass
class SnapAttrs:
    """What a snapshot shows of an object."""
    ino: int
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    rdev: int
    blocks: int
    nlink: int


@dataclass
class SnapObject:
    """One object of one turn's snapshot, as the kernel knows it."""
    turn: int
    ino: int
    handle: ObjectRef
    lookups: int = 0


def _not_found() -> OSError:
    return OSError(errno.ENOENT, "no such entry in this snapshot")


class SnapshotView:
    FD_CACHE = 256

    def __init__(self, store: Store, root_ino: int, root_handle: ObjectRef,
                 rules: RuleHistory | None = None):
        self.store = store
        self.catalogue = store.catalogue
        self.root_ino = root_ino
        self.root_handle = root_handle
        self._fds: OrderedDict[int, int] = OrderedDict()   # ino -> O_PATH fd, LRU
        self.oldest_turn = 0        # turns before it were pruned (retention.Pruner keeps it)
        # The rules of every turn: the daemon's own (kept current at each seal), or read from
        # this view's catalogue at first use (a view of a worker thread, made for one job).
        self._rules = rules
        self._dir_paths: dict[tuple[int, int], bytes] = {}   # (turn, directory ino) -> its path

    @property
    def rules(self) -> RuleHistory:
        if self._rules is None:
            self._rules = RuleHistory(self.catalogue.rules_rows())
        return self._rules

    def _hidden(self, turn: int, parent: "SnapObject", name: bytes, is_dir: bool | None) -> bool:
        """Whether the ignore rules of the turn after *turn* match entry *name* of *parent*."""
        rules = self.rules.snapshot_rules(turn)
        if rules.empty:
            return False
        parent_path = b"" if parent.ino == self.root_ino else self._dir_paths.get((turn, parent.ino))
        if parent_path is None:
            return False    # only reached top-down, where each directory's path is known
        return rules.hides(parent_path + b"/" + name if parent_path else name, is_dir)

    # -- reaching objects -----------------------------------------------------
    def object_fd(self, ino: int, handle: ObjectRef) -> int:
        """An O_PATH descriptor of object *ino*, cached (callers must not close it)."""
        fd = self._fds.get(ino)
        if fd is not None:
            self._fds.move_to_end(ino)
            return fd
        fd = self.store.open_object(handle)
        self._fds[ino] = fd
        if len(self._fds) > self.FD_CACHE:
            os.close(self._fds.popitem(last=False)[1])
        return fd

    def evict(self, ino: int) -> None:
        """Forget object *ino* (pruned: its descriptor must not keep it, or its number, alive)."""
        fd = self._fds.pop(ino, None)
        if fd is not None:
            os.close(fd)

    def pruned(self, turn: int) -> bool:
        return turn < self.oldest_turn

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    # -- resolution ---------------------------------------------------------------
    def child(self, turn: int, parent: SnapObject, name: bytes) -> tuple[int, ObjectRef, os.stat_result]:
        """(ino, handle, current stat) of entry *name* of *parent* in *turn*'s snapshot.

        The live entry is read before the layers are asked: a change records its
        pre-image before it mutates, so whichever happened first, the answer is
        right even if the tree changes meanwhile (the git export reads from a thread).
        """
        if parent.ino == self.root_ino and name == STORE_NAME:
            raise _not_found()
        dir_fd = self.object_fd(parent.ino, parent.handle)
        try:
            live = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            live_handle = ObjectRef(live.st_ino, parent.handle, name)
        except FileNotFoundError:
            live = live_handle = None
        found, ino = self.catalogue.entry_after(parent.ino, name, turn)
        if not found:
            if live is None:
                raise _not_found()
            return self._shown(turn, parent, name, (live.st_ino, live_handle, live))
        if ino is None:
            raise _not_found()
        handle = self.catalogue.ref(ino)
        if handle is None:
            raise OSError(errno.EIO, f"no row records object {ino}")
        return self._shown(turn, parent, name, (ino, handle, os.stat(self.object_fd(ino, handle))))

    def _shown(self, turn: int, parent: "SnapObject", name: bytes, found: tuple):
        """*found* unless the rules hide it; a directory's path is remembered."""
        is_dir = stat.S_ISDIR(found[2].st_mode)
        if self._hidden(turn, parent, name, is_dir):
            raise _not_found()
        if is_dir:
            parent_path = b"" if parent.ino == self.root_ino else self._dir_paths.get((turn, parent.ino))
            if parent_path is not None:
                self._dir_paths[(turn, found[0])] = parent_path + b"/" + name if parent_path else name
        return found

    def names(self, obj: SnapObject) -> list[bytes]:
        """The sorted names of directory *obj* in its turn's snapshot."""
        path = libc.proc_path(self.object_fd(obj.ino, obj.handle))
        live = set(os.listdir(path))
        for name, ino in self.catalogue.entries_after(obj.ino, obj.turn).items():
            if ino is None:
                live.discard(name)
            else:
                live.add(name)
        if obj.ino == self.root_ino:
            live.discard(STORE_NAME)
        return [name for name in sorted(live) if not self._hidden_name(obj, name)]

    def _hidden_name(self, obj: "SnapObject", name: bytes) -> bool:
        if not self._hidden(obj.turn, obj, name, None):
            return False
        if self._hidden(obj.turn, obj, name, True) == self._hidden(obj.turn, obj, name, False):
            return True
        try:        # the rules tell directories from files: ask what it is
            self.child(obj.turn, obj, name)
        except FileNotFoundError:
            return True
        return False

    def attrs(self, turn: int, ino: int, st: os.stat_result) -> SnapAttrs:
        record = self.catalogue.attrs_after(ino, turn)
        if record is None:
            return SnapAttrs(ino, st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns,
                             st.st_rdev, st.st_blocks, st.st_nlink)
        # Every change of a link count records the object's attributes first (a directory's
        # with its entry change), so a record's count is the one of then; rows from before
        # format 3 have none, and the live count is the best left.
        nlink = st.st_nlink if record.nlink is None else record.nlink
        return SnapAttrs(ino, record.mode, record.uid, record.gid, record.size, record.mtime_ns,
                         st.st_rdev, (record.size + 511) // 512, nlink)

    def stat_of(self, obj: SnapObject) -> SnapAttrs:
        return self.attrs(obj.turn, obj.ino, os.stat(self.object_fd(obj.ino, obj.handle)))

    def readlink(self, obj: SnapObject) -> bytes:
        # A symlink's target never changes in place: the live object has it.
        return libc.readlink_fd(self.object_fd(obj.ino, obj.handle))

    def xattrs(self, obj: SnapObject) -> dict[bytes, bytes]:
        record = self.catalogue.attrs_after(obj.ino, obj.turn)
        if record is not None:
            return self.catalogue.xattrs_at(obj.ino, record.turn)
        fd = self.object_fd(obj.ino, obj.handle)
        if stat.S_ISLNK(os.stat(fd).st_mode):
            return {}
        return read_xattrs(libc.proc_path(fd))

    # -- content ---------------------------------------------------------------------
    def content_source(self, obj: SnapObject) -> tuple[int, bool]:
        """A descriptor to read *obj*'s content in its turn from: (fd, is_preimage_copy).

        A live source is only right until the object's first in-place change,
        which records a copy: readers call again on every read.
        """
        name = self.catalogue.content_after(obj.ino, obj.turn)
        if name is not None:
            try:
                return self.store.open_content(name), True
            except FileNotFoundError:
                raise self.store.content_gone(name) from None
        fd = self.object_fd(obj.ino, obj.handle)
        return os.open(libc.proc_path(fd), os.O_RDONLY | os.O_CLOEXEC), False

    def preimage_name(self, obj: SnapObject) -> str | None:
        return self.catalogue.content_after(obj.ino, obj.turn)


class SnapshotNodes:
    """The kernel's view of the `.snapshots` tree: virtual inode numbers and lookup counts."""

    def __init__(self, first_id: int):
        self._ids: dict[tuple[int, int], int] = {}
        self.nodes: dict[int, SnapObject] = {}
        self._next = first_id

    def ensure(self, turn: int, ino: int, handle: ObjectRef) -> int:
        """The inode number of *ino* in *turn*'s snapshot, without counting a lookup."""
        nodeid = self._ids.get((turn, ino))
        if nodeid is None:
            nodeid = self._ids[(turn, ino)] = self._next
            self._next += 1
            self.nodes[nodeid] = SnapObject(turn, ino, handle)
        return nodeid

    def remember(self, turn: int, ino: int, handle: ObjectRef) -> int:
        nodeid = self.ensure(turn, ino, handle)
        self.nodes[nodeid].lookups += 1
        return nodeid

    def forget(self, nodeid: int, count: int) -> None:
        obj = self.nodes.get(nodeid)
        if obj is None:
            return
        obj.lookups -= count
        if obj.lookups <= 0:
            del self.nodes[nodeid]
            del self._ids[(obj.turn, obj.ino)]
