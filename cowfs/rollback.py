"""Rollback: make the live tree exactly a sealed turn's snapshot.

Owns the algorithm. Everything that changed after turn N is named by the
layers N+1, N+2, ...: for each changed entry and object, the earliest
pre-image after N is its state in turn N. Rollback applies those states to
the live tree through the ordinary capture path, so the rollback turn's own
layer holds the state before the rollback, and a rollback can itself be
rolled back. Cost: O(things changed since N), never O(tree).

Order matters: first every entry that must lose its current object is
detached (the object moves into the store, whole directories included),
then every entry that must get an object is attached (from the store, or
by a new hard link), then contents and attributes are restored, directory
mtimes last of all.

Ignored things (ignore.py) have no history: a rollback leaves them where
they are, as they are, and refuses, before it changes anything, to go where
that cannot be done (a directory it would remove holds one, or turn N had
something else in the place of one).
"""

import errno
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field

from . import libc
from .capture import Capture, read_xattrs
from .catalogue import AttrRecord
from .errors import OperationFailed
from .store import STORE_NAME, Store, tree_path

log = logging.getLogger(__name__)


@dataclass
class RollbackResult:
    entries: set[tuple[int, bytes]] = field(default_factory=set)   # (parent ino, name) changed
    objects: set[int] = field(default_factory=set)                 # inos whose content/attrs changed
    restored: dict[int, int] = field(default_factory=dict)         # regular file ino -> size before
    detached: set[int] = field(default_factory=set)                # moved into the store, not back


class Rollback:
    def __init__(self, store: Store, capture: Capture, writers: Callable[[int], int],
                 root_path: bytes):
        self.root_prefix = root_path.rstrip(b"/") + b"/"
        self.store = store
        self.capture = capture
        self.catalogue = store.catalogue
        self.writers = writers      # ino -> open handles that can write it
        self._fds: dict[int, int] = {}
        self._detached_dirs: set[int] = set()
        self._stored_inos: set[int] | None = None     # see _below_stored_dirs
        self.result = RollbackResult()

    def run(self, target: int) -> RollbackResult:
        entries = self.catalogue.changed_entries_after(target)
        objects = self.catalogue.changed_objects_after(target)
        self._refuse_lost_content(target, objects)
        try:
            for (parent, name), ino in entries.items():
                self._detach(parent, name, ino)
            attached = self._attach_all(entries)
            self.result.detached -= attached
            for ino in attached:
                if not stat.S_ISDIR(os.stat(self._fd(ino)).st_mode):
                    self.store.unkeep(ino)
            for ino in self._detached_dirs - attached:
                if self.store.kept(ino):
                    self._drop_shared_names(ino, self._fd(ino))
            self._restore_all(objects, self.catalogue.xattrs_after(target))
        finally:
            self._close()
        return self.result

    def refuse_losing_ignored(self, target: int) -> None:
        """Raise OperationFailed, before anything is changed, if rolling back to *target* would
        move an ignored thing (no history: it would be lost from the tree) or need its place.
        O(changed entries), plus the subtree of each directory the rollback would remove."""
        ignore = self.capture.ignore
        if not ignore.things:
            return
        for (parent, name), ino in self.catalogue.changed_entries_after(target).items():
            if not self._in_tree(parent):
                continue
            dir_fd = self._fd(parent)
            live = self._current(dir_fd, name)
            if live is None or live.st_ino == ino:
                continue
            where = os.fsdecode(self._join(ignore.path_of(dir_fd), name))
            if live.st_ino in ignore.things:
                if ino is not None:
                    raise OperationFailed(f"cannot roll back to turn-{target}: {where} is ignored "
                                          f"(.cowfsignore) and turn-{target} had something else there; "
                                          "move it away first")
                continue
            if stat.S_ISDIR(live.st_mode):
                fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
                try:
                    found = ignore.ignored_below(fd)
                finally:
                    os.close(fd)
                if found is not None:
                    raise OperationFailed(
                        f"cannot roll back to turn-{target}: it would remove {where}/, which holds "
                        f"{where}/{os.fsdecode(found)}, ignored by .cowfsignore (cowfs keeps no history "
                        "of it): move it out or delete it first")

    @staticmethod
    def _join(parent: bytes | None, name: bytes) -> bytes:
        return parent + b"/" + name if parent else name

    def close(self) -> None:
        self._close()

    def _refuse_lost_content(self, target: int, objects: dict[int, AttrRecord]) -> None:
        """A rollback that would need a pre-image file that is gone refuses before it changes
        anything, rather than stop half way (`cowfs fsck` tells what is lost)."""
        for record in objects.values():
            if record.content is not None and not self.store.has_content(record.content):
                raise OperationFailed(
                    f"turn-{target} cannot be restored exactly: the pre-image content/{record.content} "
                    "is gone from the store (see `cowfs fsck`); nothing was rolled back") from \
                    self.store.content_gone(record.content)

    def _close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def _attach_all(self, entries: dict[tuple[int, bytes], int | None]) -> set[int]:
        """Attach every entry's turn-K object whose directory is in the tree, directories first
        and top-down. An entry of a directory that is not in turn K's tree (a row left by an
        earlier rollback, say) is not attached: that would move or link into the store."""
        attached: set[int] = set()
        dirs = {key: ino for key, ino in entries.items() if ino is not None and self._is_dir(ino)}
        progress = True
        while dirs and progress:
            progress = False
            for key in [k for k in dirs if self._in_tree(k[0])]:
                if self._attach(*key, dirs.pop(key)):
                    attached.add(entries[key])
                progress = True
        for (parent, name), ino in entries.items():
            if ino is not None and not self._is_dir(ino) and self._in_tree(parent) \
                    and self._attach(parent, name, ino):
                attached.add(ino)
        return attached

    # -- reaching objects ---------------------------------------------------------------
    def _fd(self, ino: int) -> int:
        fd = self._fds.get(ino)
        if fd is None:
            handle = self.catalogue.ref(ino)
            if handle is None:
                raise OSError(errno.EIO, f"no row records object {ino}")
            fd = self._fds[ino] = self.store.open_object(handle)
        return fd

    def _is_dir(self, ino: int) -> bool:
        try:
            return stat.S_ISDIR(os.stat(self._fd(ino)).st_mode)
        except OSError:
            return False

    def _current(self, dir_fd: int, name: bytes) -> os.stat_result | None:
        try:
            return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def _before_entry_change(self, parent: int, dir_fd: int, name: bytes) -> None:
        with self.catalogue.batch():    # one commit, not one per record
            self.capture.before_entry_change(parent, dir_fd, name)
            self.capture.before_attr_change(parent, dir_fd)
        self.result.entries.add((parent, name))
        self.result.objects.add(parent)

    def _before_link_count_change(self, ino: int, fd: int) -> None:
        """A file gains or loses a name: snapshots show the link count of their turn."""
        with self.catalogue.batch():
            self.capture.before_attr_change(ino, fd)
        self.result.objects.add(ino)

    def _in_tree(self, dir_ino: int) -> bool:
        """Directory *dir_ino* is in the live tree (a directory's descriptor knows its path)."""
        return tree_path(self._fd(dir_ino), self.root_prefix) is not None

    # -- the three phases ----------------------------------------------------------------
    def _detach(self, parent: int, name: bytes, target: int | None) -> None:
        dir_fd = self._fd(parent)
        live = self._current(dir_fd, name)
        if live is None or live.st_ino == target or live.st_ino in self.capture.ignore.things:
            return      # already right, or ignored: left alone
        if live.st_ino not in self._fds:
            self._fds[live.st_ino] = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        if not stat.S_ISDIR(live.st_mode) and live.st_nlink == 1 and self.writers(live.st_ino):
            self.capture.capture_content_now(live.st_ino, self._fd(live.st_ino))
        self._before_entry_change(parent, dir_fd, name)
        self.result.objects.add(live.st_ino)
        if stat.S_ISDIR(live.st_mode) or live.st_nlink == 1:
            self.store.keep_by_rename(dir_fd, name, live.st_ino)
            self.result.detached.add(live.st_ino)
        else:
            self._before_link_count_change(live.st_ino, self._fd(live.st_ino))
            os.unlink(name, dir_fd=dir_fd)
        if stat.S_ISDIR(live.st_mode):
            self._detached_dirs.add(live.st_ino)

    def _drop_shared_names(self, dir_ino: int, dir_fd: int) -> None:
        """Unlink, below a directory left in the store, every file that has other names.

        Those names would otherwise still count in the file's st_nlink in the
        tree. Recorded like any change, so the turn before the rollback still
        shows them. O(the detached subtree), paid only for directories that
        must disappear.
        """
        with os.scandir(libc.proc_path(dir_fd)) as entries:
            for entry in entries:
                st = entry.stat(follow_symlinks=False)
                name = os.fsencode(entry.name)
                if stat.S_ISDIR(st.st_mode):
                    sub = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
                    try:
                        self._drop_shared_names(st.st_ino, sub)
                    finally:
                        os.close(sub)
                elif st.st_nlink > 1:
                    self._before_entry_change(dir_ino, dir_fd, name)
                    if st.st_ino not in self._fds:
                        self._fds[st.st_ino] = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC,
                                                       dir_fd=dir_fd)
                    self._before_link_count_change(st.st_ino, self._fds[st.st_ino])
                    os.unlink(name, dir_fd=dir_fd)
                    self.result.objects.add(st.st_ino)     # its link count changed

    def _attach(self, parent: int, name: bytes, ino: int) -> bool:
        dir_fd = self._fd(parent)
        live = self._current(dir_fd, name)
        if live is not None and (live.st_ino == ino or live.st_ino in self.capture.ignore.things):
            return False
        obj_fd = self._fd(ino)
        self._before_entry_change(parent, dir_fd, name)
        self.result.objects.add(ino)
        if stat.S_ISDIR(os.stat(obj_fd).st_mode):
            # A directory has one name, somewhere in the store after the detach phase.
            old_dir_fd, old_name = self._location_of_dir(ino, obj_fd)
            libc.renameat2(old_dir_fd, old_name, dir_fd, name, libc.RENAME_NOREPLACE)
            self.store.hold(ino, obj_fd)    # it left its store name
        else:
            stale = self._name_in_stored_dir(ino, obj_fd)
            # Before its first link here: a file attached at two names gains one for good
            # (its store name, if it has one, goes once all are attached).
            self._before_link_count_change(ino, obj_fd)
            os.link(libc.proc_path(obj_fd), name, dst_dir_fd=dir_fd, follow_symlinks=True)
            # Held by its name in the tree: its store name is dropped below, and a
            # descriptor of a removed name would not tell where the object is now.
            self.store.release(ino)
            self.store.hold_at(dir_fd, name, ino)
            if stale is not None:
                # Its name inside a directory an earlier rollback left in the store
                # would count in the st_nlink the tree shows (found by the model test).
                self._before_entry_change(*stale)
                os.unlink(stale[2], dir_fd=stale[1])
        return True

    def _name_in_stored_dir(self, ino: int, fd: int) -> tuple[int, int, bytes] | None:
        """(directory ino, its descriptor, name) of a file's only name if that name is inside
        a directory in the store; None if it has other names or is elsewhere."""
        if os.stat(fd).st_nlink != 1 or self.store.kept(ino):
            return None     # several names, or the store's own (unkept after attaching)
        path = os.readlink(libc.proc_path(fd))
        if not path.startswith(self.root_prefix + STORE_NAME + b"/") or path.endswith(b" (deleted)"):
            return None     # elsewhere, or the kernel's name for it is one since removed
        try:
            return self._entry_at(path, ino)
        except OSError:
            return None     # moved since: not a name this rollback can tell

    def _entry_at(self, path: bytes, ino: int) -> tuple[int, int, bytes]:
        """(parent ino, parent descriptor, name) of object *ino* at absolute *path*, the parent
        opened downwards from the root: walking ".." up to the root would step onto this very mount."""
        if not path.startswith(self.root_prefix):
            raise OSError(errno.EIO, f"object {ino} is outside the workspace: {path!r}")
        parent_rel, _, name = path[len(self.root_prefix):].rpartition(b"/")
        parent_fd = os.open(parent_rel or b".", os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                            dir_fd=self.store.root_fd)
        parent_ino = os.stat(parent_fd).st_ino
        if parent_ino in self._fds:
            os.close(parent_fd)
            parent_fd = self._fds[parent_ino]
        else:
            self._fds[parent_ino] = parent_fd
        if os.stat(name, dir_fd=parent_fd, follow_symlinks=False).st_ino != ino:
            raise OSError(errno.EIO, f"object {ino} is not at {path!r}")
        return parent_ino, parent_fd, name

    def _location_of_dir(self, ino: int, fd: int) -> tuple[int, bytes]:
        """(parent descriptor, name) of directory *ino* now, recorded as a change if in a directory
        of the tree's history (not the store's own). Found from the path the kernel keeps for
        a directory's descriptor."""
        if self.store.kept(ino):
            return self.store.objects_fd, self.store.object_name(ino)
        parent_ino, parent_fd, name = self._entry_at(os.readlink(libc.proc_path(fd)), ino)
        self._before_entry_change(parent_ino, parent_fd, name)
        return parent_fd, name

    def _restore_all(self, objects: dict[int, AttrRecord], xattrs: dict) -> None:
        """Restore every changed object of the tree, directories last.

        Every pre-image is recorded first, in one commit, and only then is
        anything restored: record before mutate still holds, and 1,000 files
        cost one commit instead of three each (most of a rollback's time).
        Restoring one object changes no other object's state, so recording
        them all up front records what each restore changes.
        """
        plans = []
        for ino, record in objects.items():
            plan = self._plan_restore(ino, record)
            if plan is not None:
                plans.append(plan)
        plans.sort(key=lambda p: stat.S_ISDIR(p[2].st_mode))     # directories last
        with self.catalogue.batch():
            for ino, fd, st, record in plans:
                if record.content is not None and stat.S_ISREG(st.st_mode):
                    self.capture.capture_content_now(ino, fd)
                else:
                    self.capture.before_attr_change(ino, fd)
        for ino, fd, st, record in plans:
            self._restore(fd, st, record, xattrs.get((ino, record.turn), {}))

    def _plan_restore(self, ino: int, record: AttrRecord
                      ) -> tuple[int, int, os.stat_result, AttrRecord] | None:
        try:
            fd = self._fd(ino)
            st = os.stat(fd)
        except OSError:
            return None
        if self._only_in_store(ino, st):
            return None     # not in the tree of the target turn: its state does not matter
        self.result.objects.add(ino)
        return ino, fd, st, record

    def _restore(self, fd: int, st: os.stat_result, record: AttrRecord,
                 xattrs: dict[bytes, bytes]) -> None:
        """Make the object open as *fd* what *record* says (its pre-image is recorded already)."""
        path = libc.proc_path(fd)
        if record.content is None or not stat.S_ISREG(st.st_mode):
            self._changing_file(st)
            self._restore_attrs(fd, path, st, record, xattrs)
            return
        # The descriptor that restores the content serves the calls after it too:
        # cheaper than resolving a /proc path for each.
        try:
            target = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        except PermissionError:
            # A read-only file of the daemon's own user (rootless): its owner may
            # make it writable; _restore_attrs then sets the mode it must have.
            os.chmod(path, stat.S_IMODE(st.st_mode) | stat.S_IWUSR)
            st = os.stat(fd)
            target = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        self._changing_file(st)
        try:
            self._restore_content(target, record.content)
            self._restore_attrs(fd, target, st, record, xattrs)
        finally:
            os.close(target)

    def _changing_file(self, st: os.stat_result) -> None:
        """A regular file is about to change behind the kernel's back: it must be told the size
        and mtime (Daemon.kernel_refresh_list). Only what was changed, even if a failure
        stops the rollback after it: a refresh of a file that could not be changed may fail."""
        if stat.S_ISREG(st.st_mode):
            self.result.restored[st.st_ino] = st.st_size

    def _restore_attrs(self, fd: int, target: int | bytes, st: os.stat_result, record: AttrRecord,
                       xattrs: dict[bytes, bytes]) -> None:
        """Owner, mode, xattrs and mtime, through *target*: a descriptor or a path to the object."""
        if (st.st_uid, st.st_gid) != (record.uid, record.gid):
            libc.chown_fd(fd, record.uid, record.gid)
        if stat.S_ISLNK(st.st_mode):
            return
        if stat.S_IMODE(st.st_mode) != stat.S_IMODE(record.mode):
            os.chmod(target, stat.S_IMODE(record.mode))
        self._restore_xattrs(target, xattrs)
        os.utime(target, ns=(os.stat(fd).st_atime_ns, record.mtime_ns))

    def _only_in_store(self, ino: int, st: os.stat_result) -> bool:
        """Not in the target turn's tree: in the store by a name of its own, or, with no name
        in the tree, below a directory the detach phase moved there (restoring it would
        rewrite a file that leaves the tree under a process that holds it open)."""
        if self.store.kept(ino):
            return stat.S_ISDIR(st.st_mode) or st.st_nlink == 1
        if stat.S_ISDIR(st.st_mode):
            return not self._in_tree(ino)
        fd = self._fd(ino)
        if self._name_in_stored_dir(ino, fd) is not None:
            return True
        # The descriptor was opened through a name removed since: its path tells nothing, so
        # look for the object below the directories this rollback left in the store.
        return (st.st_nlink == 1 and os.readlink(libc.proc_path(fd)).endswith(b" (deleted)")
                and ino in self._below_stored_dirs())

    def _below_stored_dirs(self) -> set[int]:
        """Every object below a directory this rollback left in the store (one walk of those
        subtrees, made only if asked: they leave the tree, so they are O(what changed))."""
        if self._stored_inos is None:
            self._stored_inos = set()
            stack = [self._fd(d) for d in self._detached_dirs if self.store.kept(d)]
            while stack:
                with os.scandir(libc.proc_path(stack.pop())) as entries:
                    for entry in entries:
                        st = entry.stat(follow_symlinks=False)
                        self._stored_inos.add(st.st_ino)
                        if stat.S_ISDIR(st.st_mode):
                            stack.append(self._fd_at(entry.path, st.st_ino))
        return self._stored_inos

    def _fd_at(self, path: str, ino: int) -> int:
        if ino not in self._fds:
            self._fds[ino] = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        return self._fds[ino]

    def _restore_content(self, dst: int, content: str) -> None:
        src = self.store.open_content(content)
        try:
            os.ftruncate(dst, 0)
            self.capture.duplicate(src, dst)
        finally:
            os.close(src)

    def _restore_xattrs(self, target: int | bytes, wanted: dict[bytes, bytes]) -> None:
        current = read_xattrs(target)
        for name in current.keys() - wanted.keys():
            os.removexattr(target, name)
        for name, value in wanted.items():
            if current.get(name) != value:
                os.setxattr(target, name, value)
