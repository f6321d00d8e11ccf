"""The on-disk store: `.cowfs/` at the root of the backing directory.

Owns the layout of the store and every file operation on it: keeping an
object alive after it leaves the tree, writing a pre-image copy, reaching
any recorded object again without privilege (see ObjectRef: a descriptor
held while it is in the tree, its store name once it left). Knows nothing
about FUSE or turns.

Layout (see docs/architecture.md)::

    .cowfs/
      .gitignore         "*": git never sees the store
      catalogue.db       SQLite (WAL): turns, layers, recorded objects
      objects/i<INO>     objects that left the live tree, kept alive (same inode)
      content/<T>-<INO>  pre-image copies (reflink or plain copy) of content
      lock               flock()ed by the daemon while mounted
      daemon.log
      needs-check        written when the daemon hit an internal fault: the next mount checks
      lost+found/        what `cowfs fsck --repair` moved aside (orphans, a damaged catalogue)
"""

import errno
import fcntl
import os
import stat
import time

from . import libc
from .catalogue import Catalogue, ObjectRef
from .names import STORE_NAME

_O_PATH = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC

OBJECTS = b"objects"
CONTENT = b"content"
CATALOGUE = b"catalogue.db"
LOST_FOUND = b"lost+found"
NEEDS_CHECK = b"needs-check"


def tree_path(fd: int, root_prefix: bytes) -> bytes | None:
    """Where the object open as *fd* is in the live tree, relative to its root (b"" for the
    root itself), or None once it has left the tree: removed, or inside the store.

    The kernel keeps a descriptor's path current through every rename of it or of a
    directory above it; a directory has one path, a file the name it was opened by.
    *root_prefix* is the workspace's path with a trailing slash, as the kernel names it.
    """
    path = os.readlink(libc.proc_path(fd)) + b"/"
    if not path.startswith(root_prefix) or path.endswith(b" (deleted)/"):
        return None
    rel = path[len(root_prefix):-1]
    return None if rel.split(b"/", 1)[0] == STORE_NAME else rel


class StoreBusy(Exception):
    """Another daemon holds the store."""


class CatalogueLost(Exception):
    """The store has history files but no catalogue to name them (fsck sorts it out)."""


def _mkdir(dir_fd: int, name: bytes) -> None:
    try:
        os.mkdir(name, 0o700, dir_fd=dir_fd)
    except FileExistsError:
        pass


class Store:
    def __init__(self, root_fd: int, create: bool = True):
        """Open (creating if needed) the store under the backing directory open as *root_fd*.

        With *create* False (fsck) nothing is created: a missing store raises
        FileNotFoundError, a missing `objects/` or `content/` leaves its descriptor -1,
        and the catalogue is not opened (`catalogue` is None).
        """
        self.root_fd = root_fd
        # ino -> O_PATH descriptor of a recorded object while it may be in the tree:
        # it follows the object through any rename, of it or of a directory above.
        self.held: dict[int, int] = {}
        self._marked: set[str] = set()      # faults noted in needs-check by this process
        root = os.fstat(root_fd)
        self.dev = root.st_dev
        self.hold(root.st_ino, root_fd)
        if create:
            _mkdir(root_fd, STORE_NAME)
        self.fd = os.open(STORE_NAME, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                          dir_fd=root_fd)
        self.ino = os.fstat(self.fd).st_ino
        self._lock()
        self.objects_fd = self.subdir(OBJECTS, create)
        self.content_fd = self.subdir(CONTENT, create)
        self.path = libc.proc_path(self.fd)
        self.catalogue = None
        if create:
            self._write_gitignore()
            self._refuse_lost_catalogue()
            self.catalogue = Catalogue(self.catalogue_path())

    def _refuse_lost_catalogue(self) -> None:
        """A store with pre-images or kept objects but no catalogue lost its history: making a new
        one would start a new history over it silently."""
        try:
            if os.stat(CATALOGUE, dir_fd=self.fd).st_size > 0:
                return
        except FileNotFoundError:
            pass
        if os.listdir(self.content_fd) or os.listdir(self.objects_fd):
            self.close()
            raise CatalogueLost("the store holds pre-images but its catalogue is missing or empty")

    def catalogue_path(self) -> str:
        return os.fsdecode(self.path + b"/" + CATALOGUE)

    def subdir(self, name: bytes, create: bool = True) -> int:
        """A descriptor of the store's directory *name*; -1 if it is missing and not *create*."""
        if create:
            _mkdir(self.fd, name)
        try:
            return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                           dir_fd=self.fd)
        except FileNotFoundError:
            if create:
                raise
            return -1

    def _lock(self) -> None:
        self.lock_fd = os.open(b"lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600, dir_fd=self.fd)
        try:
            fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreBusy("the store is in use by another cowfs daemon") from None

    def _write_gitignore(self) -> None:
        try:
            fd = os.open(b".gitignore", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=self.fd)
        except FileExistsError:
            return
        with os.fdopen(fd, "w") as f:
            f.write("*\n")

    def close(self) -> None:
        if self.catalogue is not None:
            self.catalogue.close()
        for fd in (self.objects_fd, self.content_fd, self.lock_fd, self.fd, *self.held.values()):
            if fd >= 0:
                os.close(fd)
        self.held.clear()

    # -- marks and what fsck moved aside ----------------------------------------------
    def mark_needs_check(self, why: str) -> None:
        """Leave a note that the store must be checked before it is trusted again (the next
        mount runs `cowfs fsck`'s check; a clean check removes it). One line per fault."""
        if why in self._marked:
            return
        self._marked.add(why)
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {why}".replace("\n", " ")[:500] + "\n"
        fd = os.open(NEEDS_CHECK, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600,
                     dir_fd=self.fd)
        try:
            os.write(fd, line.encode(errors="replace"))
        finally:
            os.close(fd)

    def needs_check(self) -> list[str]:
        """The faults noted by mark_needs_check since the last clean check (empty: none)."""
        try:
            fd = os.open(NEEDS_CHECK, os.O_RDONLY | os.O_CLOEXEC, dir_fd=self.fd)
        except FileNotFoundError:
            return []
        with os.fdopen(fd, "rb") as f:
            return [line.decode(errors="replace") for line in f.read().splitlines() if line.strip()]

    def clear_needs_check(self) -> None:
        try:
            os.unlink(NEEDS_CHECK, dir_fd=self.fd)
        except FileNotFoundError:
            pass

    def move_to_lost_found(self, dir_fd: int, name: bytes, prefix: bytes) -> bytes:
        """Move entry *name* of *dir_fd* into `lost+found/` as *prefix*-*name* (a suffix if taken).
        Returns its new name there. Nothing is deleted."""
        _mkdir(self.fd, LOST_FOUND)
        lost = os.open(LOST_FOUND, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                       dir_fd=self.fd)
        try:
            base = prefix + b"-" + name
            for n in range(1000):
                new = base if n == 0 else b"%s.%d" % (base, n)
                try:
                    libc.renameat2(dir_fd, name, lost, new, libc.RENAME_NOREPLACE)
                    return new
                except FileExistsError:
                    continue
            raise OSError(errno.EEXIST, f"lost+found has too many entries named {base!r}")
        finally:
            os.close(lost)

    # -- keeping objects alive ------------------------------------------------
    @staticmethod
    def object_name(ino: int) -> bytes:
        return b"i%d" % ino

    def keep_by_rename(self, dir_fd: int, name: bytes, ino: int) -> None:
        """Move entry *name* of *dir_fd* (object *ino*) into the store instead of deleting it."""
        libc.renameat2(dir_fd, name, self.objects_fd, self.object_name(ino), libc.RENAME_NOREPLACE)
        self.release(ino)   # its store name reaches it now (`rm -rf` must not pile up descriptors)

    def keep_by_link(self, obj_fd: int, ino: int) -> None:
        """Give object *ino* (open as *obj_fd*, O_PATH) a name in the store, keeping it alive."""
        os.link(libc.proc_path(obj_fd), self.object_name(ino), dst_dir_fd=self.objects_fd,
                follow_symlinks=True)

    def unkeep(self, ino: int) -> bool:
        """Drop the store's name for *ino* if it has one. True if it had."""
        name = self.object_name(ino)
        try:
            st = os.stat(name, dir_fd=self.objects_fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if st.st_ino != ino:
            return False
        if stat.S_ISDIR(st.st_mode):
            os.rmdir(name, dir_fd=self.objects_fd)
        else:
            os.unlink(name, dir_fd=self.objects_fd)
        return True

    def kept(self, ino: int) -> bool:
        try:
            return os.stat(self.object_name(ino), dir_fd=self.objects_fd,
                           follow_symlinks=False).st_ino == ino
        except FileNotFoundError:
            return False

    # -- pre-image content ----------------------------------------------------
    def new_content(self, turn: int, ino: int) -> tuple[int, str]:
        """Create the empty pre-image file for *ino* in *turn*: (fd open for writing, name)."""
        name = f"{turn}-{ino}"
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600,
                     dir_fd=self.content_fd)
        return fd, name

    def open_content(self, name: str) -> int:
        return os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=self.content_fd)

    def drop_content(self, name: str) -> None:
        try:
            os.unlink(name, dir_fd=self.content_fd)
        except FileNotFoundError:
            pass

    # -- reaching recorded objects ---------------------------------------------
    def hold(self, ino: int, fd: int) -> None:
        """Keep a descriptor of object *ino* (open as *fd*) for as long as it may be in the tree."""
        if ino not in self.held:
            self.held[ino] = os.dup(fd)

    def hold_at(self, dir_fd: int, name: bytes, ino: int) -> None:
        if ino not in self.held:
            fd = os.open(name, _O_PATH, dir_fd=dir_fd)
            if os.fstat(fd).st_ino == ino:
                self.held[ino] = fd
            else:
                os.close(fd)

    def release(self, ino: int) -> None:
        fd = self.held.pop(ino, None)
        if fd is not None:
            os.close(fd)

    def record_object(self, ino: int, fd: int | None = None, dir_fd: int = -1,
                      name: bytes = b"") -> None:
        """Note that a row names object *ino* (open as *fd*, or entry *name* of *dir_fd*)."""
        self.catalogue.record_object(ino)
        if ino in self.held:
            return
        if fd is not None:
            self.hold(ino, fd)
        else:
            self.hold_at(dir_fd, name, ino)

    def open_object(self, ref: ObjectRef) -> int:
        """A new O_PATH | O_NOFOLLOW descriptor of the object *ref* refers to."""
        fd = self._open_held(ref.ino)
        if fd is None:
            fd = self._open_at(self.objects_fd, self.object_name(ref.ino), ref.ino)
        if fd is None and ref.base is not None:
            base = self.open_object(ref.base)
            try:
                fd = self._open_at(base, ref.name, ref.ino)
            finally:
                os.close(base)
        if fd is None:
            raise self._gone(ref.ino)
        return fd

    def _gone(self, ino: int) -> OSError:
        """The error for a recorded object that cannot be reached: a fault that asks for a check
        (unless a repair already found it lost). An object no row names (a snapshot's live
        entry, an unlinked new file) can be gone without anything being wrong."""
        why = f"recorded object {ino} is gone from the store"
        if self.catalogue is not None and self.catalogue.ref(ino) is not None \
                and not self.catalogue.is_lost("object", str(ino)):
            self.mark_needs_check(why)
        return OSError(errno.EIO, why)

    def content_gone(self, name: str) -> OSError:
        """The error for a pre-image file a row names that is missing (see _gone)."""
        why = f"the pre-image content/{name} is gone from the store"
        if self.catalogue is not None and not self.catalogue.is_lost("content", name):
            self.mark_needs_check(why)
        return OSError(errno.EIO, why)

    def has_content(self, name: str) -> bool:
        try:
            return stat.S_ISREG(os.stat(name, dir_fd=self.content_fd, follow_symlinks=False).st_mode)
        except FileNotFoundError:
            return False

    def _open_held(self, ino: int) -> int | None:
        held = self.held.get(ino)
        if held is None:
            return None
        try:
            fd = os.dup(held)
        except OSError:
            return None     # released meanwhile (the git export reads from a thread)
        st = os.fstat(fd)
        if (st.st_ino, st.st_dev) != (ino, self.dev):
            os.close(fd)    # ... and its number reused
            return None
        return fd

    @staticmethod
    def _open_at(dir_fd: int, name: bytes, ino: int) -> int | None:
        try:
            fd = os.open(name, _O_PATH, dir_fd=dir_fd)
        except OSError:
            return None
        if os.fstat(fd).st_ino != ino:
            os.close(fd)
            return None
        return fd

    def find_recorded(self, dir_fd: int, name: bytes, st: os.stat_result, wanted: set[int]) -> None:
        """At mount: hold entry *name* of *dir_fd* if it is a recorded object (in *wanted*)."""
        if st.st_ino in wanted and st.st_dev == self.dev:
            self.hold_at(dir_fd, name, st.st_ino)

    # -- accounting ------------------------------------------------------------
    def probe_clone(self) -> str:
        """'reflink' if this filesystem can clone files, else 'copy'."""
        src, src_name = self.new_content(0, -1)
        dst, dst_name = self.new_content(0, -2)
        try:
            os.write(src, b"probe")
            libc.clone(src, dst)
            return "reflink"
        except OSError:
            return "copy"
        finally:
            os.close(src)
            os.close(dst)
            self.drop_content(src_name)
            self.drop_content(dst_name)
