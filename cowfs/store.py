"""The on-disk store: `.cowfs/` at the root of the backing directory.

Owns the layout of the store and every file operation on it: keeping an
object alive after it leaves the tree, writing a pre-image copy, reopening
any recorded object by its file handle. Knows nothing about FUSE or turns.

Layout (see docs/architecture.md)::

    .cowfs/
      .gitignore         "*": git never sees the store
      catalogue.db       SQLite (WAL): turns, layers, object handles
      objects/i<INO>     objects that left the live tree, kept alive (same inode)
      content/<T>-<INO>  pre-image copies (reflink or plain copy) of content
      control.sock       the daemon's control socket (0600), while mounted
      lock               flock()ed by the daemon while mounted
      daemon.log
"""

import errno
import fcntl
import os
import stat

from . import libc
from .catalogue import Catalogue

STORE_NAME = b".cowfs"
OBJECTS = b"objects"
CONTENT = b"content"


class StoreBusy(Exception):
    """Another daemon holds the store."""


class Store:
    def __init__(self, root_fd: int):
        """Open (creating if needed) the store under the backing directory open as *root_fd*."""
        self.root_fd = root_fd
        # open_by_handle_at needs a real (not O_PATH) descriptor on the filesystem.
        self.mount_fd = os.open(libc.proc_path(root_fd), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.mkdir(STORE_NAME, 0o700, dir_fd=root_fd)
        except FileExistsError:
            pass
        self.fd = os.open(STORE_NAME, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                          dir_fd=root_fd)
        self.ino = os.fstat(self.fd).st_ino
        self._lock()
        for sub in (OBJECTS, CONTENT):
            try:
                os.mkdir(sub, 0o700, dir_fd=self.fd)
            except FileExistsError:
                pass
        self.objects_fd = os.open(OBJECTS, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.fd)
        self.content_fd = os.open(CONTENT, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.fd)
        self._write_gitignore()
        self.path = libc.proc_path(self.fd)
        self.catalogue = Catalogue(os.fsdecode(self.path + b"/catalogue.db"))

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
        self.catalogue.close()
        for fd in (self.objects_fd, self.content_fd, self.lock_fd, self.fd, self.mount_fd):
            os.close(fd)

    # -- keeping objects alive ------------------------------------------------
    @staticmethod
    def object_name(ino: int) -> bytes:
        return b"i%d" % ino

    def keep_by_rename(self, dir_fd: int, name: bytes, ino: int) -> None:
        """Move entry *name* of *dir_fd* (object *ino*) into the store instead of deleting it."""
        libc.renameat2(dir_fd, name, self.objects_fd, self.object_name(ino), libc.RENAME_NOREPLACE)

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
    def open_object(self, handle: bytes, flags: int = os.O_PATH | os.O_NOFOLLOW) -> int:
        try:
            return libc.open_handle(self.mount_fd, handle, flags)
        except OSError as e:
            if e.errno == errno.ESTALE:
                raise OSError(errno.EIO, "a recorded object is gone from the store") from e
            raise

    # -- accounting ------------------------------------------------------------
    def allocated_bytes(self) -> int:
        """Bytes allocated to pre-image copies and kept objects (shared extents counted in full)."""
        total = 0
        for dir_fd in (self.content_fd, self.objects_fd):
            for entry in os.scandir(libc.proc_path(dir_fd)):
                total += entry.stat(follow_symlinks=False).st_blocks * 512
        return total

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
