"""Restore: make some paths exactly what they were at a sealed turn, as a change of the open turn.

Owns the algorithm of `cowfs restore TURN PATH...`. Unlike a rollback, which
puts every object back by identity, a restore works on paths: the rest of
the tree stays as it is, so an object of turn N that lives on elsewhere in
the tree now (renamed, say) must not be linked back under its old name too.
So a path that holds the same object as at turn N is restored in place
(content from its pre-image, attributes, and for a directory, its names:
later additions removed, missing ones made); anything else there is removed
through the capture path (kept in the store, like any removal) and the
turn-N object is made anew: a clone of its content (a copy where the
filesystem cannot clone), a directory, a symlink, a device node. Names that
were hard links of one file at turn N become hard links again.

Ignored things (ignore.py) are left alone: a path the rules ignore cannot
be restored (the daemon refuses it), a directory's ignored names are not
later additions, and a directory to remove that holds one is refused.

Every change goes through the capture path first (record before mutate),
so the restore shows in `cowfs diff` and a rollback to the last sealed turn
undoes it. Cost: O(what the restored paths hold), never O(tree).
"""

import os
import stat

from . import libc
from .capture import Capture
from .catalogue import AttrRecord
from .errors import BadInput, OperationFailed
from .history import TurnTrees, join
from .rollback import Rollback
from .snapshot import SnapObject
from .store import STORE_NAME, Store

_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_OBJ_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


class Restore(Rollback):
    def __init__(self, store: Store, capture: Capture, writers, root_path: bytes, trees: TurnTrees):
        super().__init__(store, capture, writers, root_path)
        self.trees, self.view = trees, trees.view
        self.root_ino = trees.root_ino
        self._made: dict[int, tuple[int, bytes]] = {}   # turn-N object -> (dir fd, name) made now
        self.done: list[tuple[bytes, str]] = []          # (path, what was done), as it goes
        self._paths: list[bytes] = []

    def check(self, turn: int, paths: list[bytes]) -> None:
        """Refuse, before anything is touched, a path whose directory did not exist at *turn*."""
        for path in paths:
            if path and self.trees.lookup_parent(turn, path) is None:
                parent = os.fsdecode(path.rpartition(b"/")[0])
                raise BadInput(f"{parent}/ did not exist at turn-{turn}: restore it instead")

    def run_paths(self, turn: int, paths: list[bytes]) -> list[tuple[bytes, str]]:
        """Restore each path, after check(); returns (path, what was done) for each, also kept in
        `done` as it goes: a failure part-way leaves there what was restored (see progress)."""
        self._fds[self.root_ino] = os.dup(self.store.root_fd)
        self._paths = paths
        try:
            for path in paths:
                self.done.append((path, self._restore_path(turn, path)))
            for ino in list(self._detached_dirs):
                if self.store.kept(ino):
                    self._drop_shared_names(ino, self._fd(ino))
        finally:
            self._close()
        return self.done

    def progress(self) -> str:
        """What a restore that failed part-way did and did not do, in words for its error."""
        restored = [os.fsdecode(p) or "." for p, _ in self.done]
        left = [os.fsdecode(p) or "." for p in self._paths[len(self.done):]]
        return (f"restored: {', '.join(restored) or 'nothing'}; not (fully) restored: {', '.join(left)} "
                "(what was restored is a change of the open turn)")

    def _restore_path(self, turn: int, path: bytes) -> str:
        if not path:
            root = self.trees.root(turn)
            self._restore_dir(turn, root, self._fds[self.root_ino])
            return "restored"
        parent_ino, parent_fd = self._live_dir(turn, path.rpartition(b"/")[0])
        name = path.rpartition(b"/")[2]
        found = self.trees.lookup(turn, path)
        live = self._current(parent_fd, name)
        if found is None:
            if live is None:
                return "absent (did not exist then, does not exist now)"
            self._detach(parent_ino, name, None)
            return "removed (did not exist then)"
        self._make(turn, parent_ino, parent_fd, name, *found)
        return "restored"

    # -- the live directories on the way --------------------------------------------------
    def _live_dir(self, turn: int, path: bytes) -> tuple[int, int]:
        """(ino, descriptor) of live directory *path*, made (as at *turn*) where it is missing.
        Walked down from the root, never following a symlink."""
        ino, fd = self.root_ino, self._fds[self.root_ino]
        done = b""
        for name in path.split(b"/") if path else []:
            done = join(done, name)
            live = self._current(fd, name)
            if live is None or not stat.S_ISDIR(live.st_mode):
                found = self.trees.lookup(turn, done)
                self._make(turn, ino, fd, name, *found, children=False)
            child = os.open(name, _DIR_FLAGS, dir_fd=fd)
            ino = os.fstat(child).st_ino
            if ino in self._fds:
                os.close(child)
            else:
                self._fds[ino] = child
            fd = self._fds[ino]
        return ino, fd

    # -- making one path what it was --------------------------------------------------------
    def _make(self, turn: int, parent: int, parent_fd: int, name: bytes, ino: int, handle,
              st: os.stat_result, children: bool = True) -> None:
        obj = SnapObject(turn, ino, handle)
        attrs = self.view.attrs(turn, ino, st)
        record = AttrRecord(turn, attrs.mode, attrs.uid, attrs.gid, attrs.size, attrs.mtime_ns,
                            self.catalogue.content_after(ino, turn))
        live = self._current(parent_fd, name)
        if live is not None and live.st_ino == ino and stat.S_IFMT(live.st_mode) == stat.S_IFMT(attrs.mode):
            self._in_place(turn, obj, record, children)
            if not stat.S_ISDIR(attrs.mode):
                self._made.setdefault(ino, (parent_fd, name))   # its other names of then link here
            return
        if live is not None:
            self._detach(parent, name, None)
        self._before_entry_change(parent, parent_fd, name)
        made = self._made.get(ino)
        if made is not None and not stat.S_ISDIR(attrs.mode):
            os.link(made[1], name, src_dir_fd=made[0], dst_dir_fd=parent_fd, follow_symlinks=False)
            return
        self._create(obj, attrs, st, parent_fd, name)
        fd = os.open(name, _OBJ_FLAGS, dir_fd=parent_fd)
        new = os.fstat(fd)
        self._fds[new.st_ino] = fd
        self.capture.note_born(new.st_ino)      # it did not exist at the open turn's start
        self._made[ino] = (parent_fd, name)
        if stat.S_ISDIR(attrs.mode) and children:
            for child in self.view.names(obj):
                self._make(turn, new.st_ino, fd, child, *self.view.child(turn, obj, child))
        self._set_attrs(fd, os.fstat(fd), record, self.view.xattrs(obj))

    def _create(self, obj: SnapObject, attrs, st: os.stat_result, parent_fd: int, name: bytes) -> None:
        if stat.S_ISREG(attrs.mode):
            src, _ = self.view.content_source(obj)
            try:
                dst = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600,
                              dir_fd=parent_fd)
                try:
                    self.capture.duplicate(src, dst)
                finally:
                    os.close(dst)
            finally:
                os.close(src)
        elif stat.S_ISDIR(attrs.mode):
            os.mkdir(name, 0o700, dir_fd=parent_fd)
        elif stat.S_ISLNK(attrs.mode):
            os.symlink(self.view.readlink(obj), name, dir_fd=parent_fd)
        else:
            os.mknod(name, attrs.mode, st.st_rdev, dir_fd=parent_fd)

    def _in_place(self, turn: int, obj: SnapObject, record: AttrRecord, children: bool) -> None:
        fd = self._fd_of(obj.ino, obj.handle)
        if stat.S_ISDIR(record.mode):
            if children:
                self._restore_dir(turn, obj, fd)
        with self.catalogue.batch():
            if record.content is not None and stat.S_ISREG(record.mode):
                self.capture.capture_content_now(obj.ino, fd)
            else:
                self.capture.before_attr_change(obj.ino, fd)
        st = os.stat(fd)
        self.result.objects.add(obj.ino)
        self._restore(fd, st, record, self.view.xattrs(obj))

    def _restore_dir(self, turn: int, obj: SnapObject, fd: int) -> None:
        """Make directory *obj*'s names those of *turn*: later ones removed, the others restored."""
        wanted = self.view.names(obj)
        live = set(os.listdir(libc.proc_path(fd)))
        if obj.ino == self.root_ino:
            live.discard(STORE_NAME)
        ignore = self.capture.ignore
        path = ignore.path_of(fd) if ignore.active else None
        for name in sorted(live - set(wanted)):
            if path is not None and ignore.rules.hides(join(path, name), None):
                continue    # ignored: no history says it should not be there
            self._detach(obj.ino, name, None)
        for name in wanted:
            self._make(turn, obj.ino, fd, name, *self.view.child(turn, obj, name))

    def _detach(self, parent: int, name: bytes, target: int | None) -> None:
        """As a rollback's, refusing to remove a directory that holds an ignored thing."""
        ignore = self.capture.ignore
        if ignore.things:
            dir_fd = self._fd(parent)
            live = self._current(dir_fd, name)
            if live is not None and live.st_ino != target and stat.S_ISDIR(live.st_mode) \
                    and live.st_ino not in ignore.things:
                fd = os.open(name, _OBJ_FLAGS, dir_fd=dir_fd)
                try:
                    found = ignore.ignored_below(fd)
                finally:
                    os.close(fd)
                if found is not None:
                    where = os.fsdecode(join(ignore.path_of(dir_fd) or b"", name))
                    raise OperationFailed(f"cannot remove {where}/: it holds {where}/{os.fsdecode(found)}, "
                                          "ignored by .cowfsignore (cowfs keeps no history of it); "
                                          "move it out or delete it first")
        super()._detach(parent, name, target)

    def _fd_of(self, ino: int, handle) -> int:
        fd = self._fds.get(ino)
        if fd is None:
            fd = self._fds[ino] = self.store.open_object(handle)
        return fd

    def _set_attrs(self, fd: int, st: os.stat_result, record: AttrRecord, xattrs: dict) -> None:
        """Owner, mode, xattrs and mtime of an object this restore made."""
        self._restore_attrs(fd, libc.proc_path(fd), st, record, xattrs)
