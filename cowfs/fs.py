"""The FUSE operations: thin handlers over the live tree, capture and snapshots.

Live requests pass through to the backing directory by descriptor (so the
backing filesystem, not cowfs, decides POSIX behaviour); each mutating handler first awaits any content capture it needs, then,
with no await in between, records entry/attribute pre-images and performs
the change, so a checkpoint can never fall between the record and the
mutation. Requests under `.snapshots` are answered from snapshot.py and
refused with EROFS when they would write.
"""

import collections
import contextlib
import errno
import functools
import logging
import os
import stat
import threading
import time

import pyfuse3
import trio

from . import libc
from .capture import Capture
from .catalogue import disk_full
from .control import CONTROL_XATTR, REFRESH_PREFIX
from .durability import HistorySync
from .inodes import VIRTUAL_BASE, InodeTable, Node
from .names import SNAPDIR
from .snapshot import SnapObject, SnapshotNodes, SnapshotView
from .store import STORE_NAME, ObjectRef, Store, tree_path

log = logging.getLogger(__name__)

LATEST = b"latest"
SNAPDIR_ID = VIRTUAL_BASE
LATEST_ID = VIRTUAL_BASE + 1
CONTROL_XATTR_NAME = os.fsencode(CONTROL_XATTR)     # as pyfuse3 passes names

# While mounted, every change to the backing directory goes through this daemon
# (the workspace is mounted over, the store hidden), so the kernel may keep what
# it learnt for long; rollback invalidates what it changes itself.
LIVE_TIMEOUT = 3600.0
SNAPSHOT_TIMEOUT = 365 * 86400.0
# How long a lookup of a file whose write failed waits for its pending release (fs.write).
FORGET_WAIT = 1.0

# How long a direct write waits for the page cache of its file to be dropped (fs._after_direct_write).
DIRECT_INVALIDATE_WAIT = 1.0

# File handles of `.snapshots` files live above every possible descriptor number.
SNAP_FH_BASE = 1 << 40

_DOTS = (b".", b"..")

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR


# Handlers that change nothing in the live tree. Every other one ends a
# filesystem epoch (`open` does when it truncates).
_READ_ONLY = frozenset({"lookup", "getattr", "readlink", "open", "read", "fsync", "release",
                        "opendir", "readdir", "releasedir", "fsyncdir", "getxattr", "listxattr",
                        "statfs"})


def fuse_op(method):
    """Turn every failure of a handler into an errno: anything else would end pyfuse3.main().

    Also counts the request (`cowfs status --json` shows the counts): what a
    workload costs through FUSE is mostly how many round trips it makes. And
    a handler that may change the live tree ends the epoch when it is done
    (see `CowFS.epoch`), whether it succeeded or not.
    """
    name = method.__name__
    mutates = name not in _READ_ONLY

    @functools.wraps(method)
    async def handler(self, *args):
        self.requests[name] += 1
        if self.debug:
            log.debug("%s%r", name, _shown_args(args))
        if args and type(args[-1]) is pyfuse3.RequestContext and self.is_own(args[-1].pid) \
                and args[-1].pid != self.flusher_tid:
            # From a worker thread of ours (from the main one it could never be served).
            self.requests["from_daemon"] += 1
            log.error("%s%r came from the daemon itself", name, args[:2])
        try:
            return await method(self, *args)
        except pyfuse3.FUSEError:
            raise
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except Exception as e:
            if disk_full(e):    # the catalogue could not record the pre-image: nothing changed
                raise pyfuse3.FUSEError(errno.ENOSPC) from None
            log.exception("internal error in %s%r", method.__name__, args[:2])
            self.internal_fault(f"internal error in {name}: {e!r}")
            raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            if mutates:
                self.epoch += 1
                self.last_change = time.monotonic()    # for --auto-checkpoint
    return handler


def _shown_args(args: tuple) -> tuple:
    """A request's arguments for the debug log: no context, and no written data beyond a
    glimpse (a 1 MiB write logged whole once filled the disk it was about)."""
    if args and type(args[-1]) is pyfuse3.RequestContext:
        args = args[:-1]
    return tuple(f"<{len(a)} bytes: {bytes(a[:16])!r}...>" if isinstance(a, (bytes, memoryview)) and len(a) > 64
                 else a for a in args)


def _erofs():
    return pyfuse3.FUSEError(errno.EROFS)


def _entry(st, nodeid: int, timeout: float) -> pyfuse3.EntryAttributes:
    e = pyfuse3.EntryAttributes()
    e.st_ino = nodeid
    e.generation = 0
    e.entry_timeout = e.attr_timeout = timeout
    e.st_mode = st.st_mode
    e.st_nlink = st.st_nlink
    e.st_uid = st.st_uid
    e.st_gid = st.st_gid
    e.st_rdev = st.st_rdev
    e.st_size = st.st_size
    e.st_blksize = st.st_blksize
    e.st_blocks = st.st_blocks
    e.st_atime_ns = st.st_atime_ns
    e.st_mtime_ns = st.st_mtime_ns
    e.st_ctime_ns = st.st_ctime_ns
    return e


class _umask:
    """The caller's umask around one creation on the backing filesystem.

    With ACLs enabled the kernel leaves the umask to the filesystem, which is
    what the backing one does natively: a default ACL of the parent wins over
    it, otherwise it masks the mode. The daemon's own umask is 0, and the
    creation syscall runs on the one trio thread, so setting it around the
    call changes nothing else (content copies in worker threads make files
    whose mode they set themselves).
    """
    __slots__ = ("mask",)

    def __init__(self, ctx):
        self.mask = ctx.umask

    def __enter__(self):
        os.umask(self.mask)

    def __exit__(self, *exc):
        os.umask(0)


def invalidate_entries(names: list[tuple[int, bytes]]) -> None:
    """Make the kernel drop entries (parent nodeid, name); blocks: call from a thread, never
    from the trio loop (the kernel may need the loop to answer a request first)."""
    for parent, name in names:
        try:
            pyfuse3.invalidate_entry(parent, name)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENOSYS):
                log.warning("invalidate_entry(%d, %r): %s", parent, name, e)


def _give(dir_fd: int, name: bytes, st, uid: int, gid: int) -> None:
    """chown a new object to its creator. A chown clears the set-user-ID and set-group-ID bits of
    what is not a directory, which the creator's own creation would have kept (the kernel has
    already dropped an S_ISGID the creator may not have): they are put back."""
    os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
    if st.st_mode & (stat.S_ISUID | stat.S_ISGID) and stat.S_ISREG(st.st_mode):
        os.chmod(name, stat.S_IMODE(st.st_mode), dir_fd=dir_fd)


def _has_default_acl(fd: int) -> bool:
    """Whether the directory open as *fd* has a default ACL."""
    try:
        os.getxattr(libc.proc_path(fd), b"system.posix_acl_default")
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.EOPNOTSUPP):
            return False
        raise
    return True


_ACL_ACCESS = b"system.posix_acl_access"


def _acl_drop_setgid(fd: int, ctx) -> None:
    """What setting an access ACL does natively (posix_acl_update_mode): clear S_ISGID unless
    the caller is in the file's group (or has CAP_FSETID: uid 0 stands for it). The daemon
    set the ACL with its own credentials, and the kernel's way to ask for it
    (FUSE_SETXATTR_ACL_KILL_SGID) needs FUSE_SETXATTR_EXT, which pyfuse3 does not negotiate."""
    st = os.stat(fd)
    if st.st_mode & stat.S_ISGID and not _in_group(ctx, st.st_gid):
        os.chmod(libc.proc_path(fd), stat.S_IMODE(st.st_mode) & ~stat.S_ISGID)


def _in_group(ctx, gid: int) -> bool:
    """Whether the caller of a request is in group *gid* (its own or a supplementary one)."""
    if ctx.gid == gid:
        return True
    try:
        with open(b"/proc/%d/status" % ctx.pid, "rb") as f:
            for line in f:
                if line.startswith(b"Groups:"):
                    return str(gid).encode() in line.split()[1:]
    except OSError:
        pass
    return False


def _drop_pages(nodeid: int) -> None:
    """Make the kernel drop the cached pages (and attributes) of *nodeid*; blocks: call from a
    thread, never from the trio loop (pages being read or written back wait for the daemon)."""
    try:
        pyfuse3.invalidate_inode(nodeid, attr_only=False)
    except OSError as e:
        if e.errno not in (errno.ENOENT, errno.ENOSYS):
            log.warning("invalidate_inode(%d): %s", nodeid, e)


def _backing_flags(flags: int) -> int:
    """How to open the backing file for a kernel open with *flags*.

    The daemon opens /proc/self/fd/N of the object, not the caller's path.
    With the writeback cache the kernel reads pages of files opened write-only
    (to fill partial pages) and computes append offsets itself, so every
    writable file is opened read-write and O_APPEND is dropped (as libfuse's
    passthrough_ll does).
    """
    # O_NOFOLLOW was the kernel's business (it resolved the path); here it
    # would refuse /proc/self/fd/N, which is a symlink. O_DIRECT stays the
    # kernel's too (it sends the caller's I/O uncached): the daemon's own
    # buffers are not aligned, so the backing file would refuse every read.
    flags &= ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_APPEND | os.O_NOFOLLOW | os.O_DIRECT)
    if flags & os.O_ACCMODE == os.O_WRONLY:
        flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
    return flags | os.O_CLOEXEC


def _only_ctime(fields) -> bool:
    """A setattr that sets nothing but ctime: chown(path, -1, -1). The kernel names ctime only for
    regular files (whose times it keeps), and sends nothing at all for other kinds; its
    write-back flushes of a regular file's times always carry mtime."""
    return not (fields.update_size or fields.update_mode or fields.update_uid
                or fields.update_gid or fields.update_atime or fields.update_mtime)


_RELATIME_DAY_NS = 24 * 3600 * 10**9


def atime_policy(fd: int) -> str:
    """How the filesystem of *fd* keeps atime: 'noatime', 'relatime' or 'strictatime'."""
    flags = os.fstatvfs(fd).f_flag
    if flags & os.ST_NOATIME:
        return "noatime"
    return "relatime" if flags & os.ST_RELATIME else "strictatime"


def _read_one_byte(path: bytes) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.pread(fd, 1, 0)
    finally:
        os.close(fd)


def _relatime_due(st: os.stat_result) -> bool:
    """Whether a read moves atime under relatime (the kernel's rule)."""
    return (st.st_atime_ns <= st.st_mtime_ns or st.st_atime_ns <= st.st_ctime_ns
            or time.time_ns() - st.st_atime_ns >= _RELATIME_DAY_NS)


def _only_times_already_set(attr, fields, fd: int) -> os.stat_result | None:
    """The object's stat if a setattr sets only mtime (and ctime, which no one can set) to the
    mtime the object has; None otherwise (then it is a change, and one of ctime alone is a
    chown(path, -1, -1))."""
    if (fields.update_size or fields.update_mode or fields.update_uid or fields.update_gid
            or fields.update_atime or not fields.update_mtime):
        return None
    st = os.stat(fd)
    return st if attr.st_mtime_ns == st.st_mtime_ns else None


class _Listing:
    """An open directory: its names, read once so offsets stay valid while it changes."""
    __slots__ = ("nodeid", "names", "inos", "epoch")

    def __init__(self, nodeid: int):
        self.nodeid = nodeid
        self.names: list[bytes] | None = None
        self.inos: list[int] | None = None     # live directories: each name's d_ino
        self.epoch = -1                        # ... as of this epoch


class _SnapFile:
    __slots__ = ("obj", "fd", "is_copy")

    def __init__(self, obj: SnapObject, fd: int, is_copy: bool):
        self.obj, self.fd, self.is_copy = obj, fd, is_copy


class CowFS(pyfuse3.Operations):
    supports_dot_lookup = False
    # The kernel gathers small writes into pages and sends them in large
    # batches; before every seal the daemon has it write back the files still
    # open for writing (flush_open_writes), so every page written in a turn
    # reaches the capture path within that turn.
    enable_writeback_cache = True
    # POSIX ACLs: the kernel enforces them (with default_permissions) and asks for them by
    # getxattr; the backing filesystem keeps them and their mode in step. The caller's umask
    # then comes with each creation instead of being applied by the kernel (see _umask).
    enable_acl = True

    def __init__(self, root_fd: int, store: Store, capture: Capture, control_path: bytes,
                 snapdir_visible: bool = False, atime: str = "", nodiratime: bool = False):
        super().__init__()
        self.store = store
        self.capture = capture
        self.writers = capture.writers      # attribution: a dict store per change
        self.history_sync = HistorySync(store, capture)     # what an fsync syncs first
        self.inodes = InodeTable(root_fd, store)
        self.root_fd = root_fd
        self.view = SnapshotView(store, self.inodes.root_ino, ObjectRef(self.inodes.root_ino),
                                 capture.ignore.history)
        self.snap_nodes = SnapshotNodes(VIRTUAL_BASE + 16)
        self.control_path = control_path
        self.snapdir_visible = snapdir_visible
        self.as_root = os.geteuid() == 0
        # How reads move atime: the mount's -o noatime|relatime|strictatime, else the backing
        # mount's policy. With an option the daemon's own descriptors read with O_NOATIME
        # (the backing mount's policy would move atime at each of its reads), and an open for
        # reading moves atime as the option says (_read_access).
        self.atime = atime or atime_policy(root_fd)
        self.noatime_reads = os.O_NOATIME if atime or nodiratime else 0
        self.nodiratime = nodiratime
        self.open_files: dict[int, Node] = {}        # live fh (= descriptor) -> node
        self._forgotten: dict[int, trio.Event] = {}  # ino -> the kernel forgot it (fs.write)
        self.writer_fhs: set[int] = set()
        # Handles opened with O_DIRECT for writing, and how many each object has: their writes
        # bypass the page cache, which must then not serve the old content (_after_direct_write).
        self.direct_fhs: set[int] = set()
        self.direct_writers: collections.Counter[int] = collections.Counter()
        # After a rollback the refresher re-applies sizes and mtimes through the mount
        # (see Daemon.kernel_refresh_list): those setattrs are not changes to capture.
        self.refreshing: set[int] = set()
        self.refresher_tid = 0
        # Before a seal a thread of ours reopens each file open for writing (flush_open_writes)
        # by the same reserved names, through the mount's root at mount_path (dir_fd, path for
        # os.open; the daemon sets it once mounted).
        self.flushing: set[int] = set()
        self.flusher_tid = 0
        self._flush_lock = trio.Lock()   # one flusher at a time: they share flushing/flusher_tid
        self.mount_path: tuple[int | None, bytes] | None = None
        # Objects a rollback took out of the tree, while the kernel may still hold dentries
        # of their old names (until the rollback's invalidation is done): see _not_detached.
        self.detached: set[int] = set()
        self.snap_files: dict[int, _SnapFile] = {}
        self.listings: dict[int, _Listing] = {}
        self._next_fh = SNAP_FH_BASE
        self.requests: collections.Counter[str] = collections.Counter()  # by handler, since mount
        self._own_tids: dict[int, bool] = {}    # caller thread -> one of ours (see is_own)
        # Ends whenever the live tree may have changed (a mutating handler
        # returned, a rollback ran): a directory scanned in this epoch still
        # has the names and d_inos it had.
        self.epoch = 0
        self.last_change = time.monotonic()
        self.debug = False          # --debug: log every request (fuse_op)
        # Ends when a rollback ran. The attributes readdir sent for an object
        # (Node.entry) stay true in this generation until a handler that changes
        # that object drops them (_drop_listed).
        self.generation = 0

    # -- helpers --------------------------------------------------------------------
    def _node(self, nodeid: int) -> Node:
        node = self.inodes.get(nodeid)
        if node is None:
            raise pyfuse3.FUSEError(errno.ESTALE)
        return node

    def _live_parent(self, nodeid: int, name: bytes) -> Node:
        """The live directory a mutation of entry *name* happens in, refusing the reserved names."""
        if nodeid >= VIRTUAL_BASE:
            raise _erofs()
        if nodeid == pyfuse3.ROOT_INODE and name in (SNAPDIR, STORE_NAME):
            raise pyfuse3.FUSEError(errno.EPERM)
        return self._in_tree(self._not_detached(self._node(nodeid)))

    def _in_tree(self, node: Node) -> Node:
        """Refuse, with ENOENT, to look up, list or change entries of a directory that a
        history operation took out of the live tree behind the kernel's back (a rollback or
        restore removed it), reached through what the kernel still holds: a process's working
        directory, an open directory descriptor. Natively such a directory is dead (the kernel
        refuses the same with ENOENT); here it lives on in the store, and a file made in it
        would vanish into history with no error. Free on the hot path: a directory proves
        that it is in the tree once after each history operation that took anything out."""
        if node.tree_epoch != self.inodes.tree_epoch:
            if tree_path(node.fd, self.capture.root_prefix) is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            node.tree_epoch = self.inodes.tree_epoch
        return node

    def _not_detached(self, node: Node) -> Node:
        """Refuse, with ESTALE, to open or change entries in an object a rollback has just taken
        out of the tree, reached through a dentry the kernel has not dropped yet: what was
        written there would be in the store, under no name. The kernel's path walk retries an
        ESTALE with a fresh lookup (LOOKUP_REVAL), which finds the tree as the rollback left it."""
        if node.ino in self.detached:
            raise pyfuse3.FUSEError(errno.ESTALE)
        return node

    def internal_fault(self, why: str) -> None:
        """A fault the errno mapping hides: the next mount checks the store first, since the caller
        saw only EIO and the store may now disagree with the tree."""
        try:
            self.store.mark_needs_check(why)
        except OSError:
            log.exception("cannot mark the store as needing a check")

    def is_own(self, tid: int) -> bool:
        """Whether thread *tid* (a request's caller) is one of the daemon's (cached)."""
        own = self._own_tids.get(tid)
        if own is None:
            if len(self._own_tids) > 4096:
                self._own_tids.clear()
            own = self._own_tids[tid] = os.path.exists(f"/proc/self/task/{tid}")
        return own

    def _new_fh(self) -> int:
        self._next_fh += 1
        return self._next_fh

    def _created(self, parent: Node, name: bytes, ctx) -> pyfuse3.EntryAttributes:
        """Finish a creation: owner, birth, the kernel's entry."""
        st = os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
        uid, gid = self._owner(parent, st, ctx)
        if (uid, gid) != (st.st_uid, st.st_gid):
            _give(parent.fd, name, st, uid, gid)
        self.capture.note_born(st.st_ino)
        self.capture.created(parent.ino, parent.fd, name, st)
        self.inodes.remember(parent, name, st.st_ino)
        entry = _entry(st, self.inodes.nodeid(st.st_ino), LIVE_TIMEOUT)
        entry.st_uid, entry.st_gid = uid, gid
        return entry

    def _owner(self, parent: Node, st, ctx) -> tuple[int, int]:
        """Objects created through the mount belong to the caller, as on the backing filesystem.

        The backing filesystem created *st* as the daemon: in a setgid directory with the
        directory's group (kept), elsewhere with the daemon's (the caller's instead). The
        directory's mode says which: its group may be the daemon's own (0).
        """
        if not self.as_root:
            return st.st_uid, st.st_gid
        if os.stat(parent.fd).st_mode & stat.S_ISGID:
            return ctx.uid, st.st_gid
        return ctx.uid, ctx.gid

    def _before_entry_change(self, parent_id: int, parent: Node, name: bytes) -> None:
        self.capture.before_entry_change(parent.ino, parent.fd, name)
        self.capture.before_attr_change(parent.ino, parent.fd)
        parent.entry = None     # its size, mtime and link count change

    def _drop_listed(self, ino: int) -> None:
        """Forget the attributes readdir sent for object *ino*: they are about to change."""
        node = self.inodes.get(self.inodes.nodeid(ino))
        if node is not None:
            node.entry = None

    # -- lookups and attributes ------------------------------------------------------
    @fuse_op
    async def lookup(self, parent_id, name, ctx=None):
        if parent_id >= VIRTUAL_BASE:
            return self._snap_lookup(parent_id, name)
        if parent_id == pyfuse3.ROOT_INODE:
            if name == SNAPDIR:
                return self._snapdir_entry()
            if name == STORE_NAME:
                raise pyfuse3.FUSEError(errno.ENOENT)
            if name.startswith(REFRESH_PREFIX) and ctx.pid:
                if ctx.pid == self.refresher_tid:
                    return self._reserved_lookup(name, self.refreshing)
                if ctx.pid == self.flusher_tid:
                    return self._reserved_lookup(name, self.flushing)
        parent = self._in_tree(self._node(parent_id))
        try:
            st = os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
        except FileNotFoundError:
            negative = pyfuse3.EntryAttributes()
            negative.st_ino = 0
            negative.entry_timeout = LIVE_TIMEOUT
            return negative
        node = self.inodes.remember(parent, name, st.st_ino)
        if node.size_unsure:
            await self._until_forgotten(node)
            st = os.stat(node.fd)
        return _entry(st, self.inodes.nodeid(st.st_ino), LIVE_TIMEOUT)

    def _reserved_lookup(self, name: bytes, reachable: set[int]) -> pyfuse3.EntryAttributes:
        """The entry of a file by its reserved name, for the thread that may reach *reachable*
        (the refresher, restored files; the flusher, files open for writing).

        Any name the kernel resolves to the same inode number reaches the inode
        it caches, so no path of the file (which the rollback may have removed,
        and which the kernel may know under a name cowfs never recorded) is needed.
        """
        tail = name[len(REFRESH_PREFIX):]
        nodeid = int(tail) if tail.isdigit() else 0
        if nodeid not in reachable:
            raise pyfuse3.FUSEError(errno.ENOENT)
        node = self._node(nodeid)
        node.lookups += 1
        return _entry(os.stat(node.fd), nodeid, 0)

    @fuse_op
    async def getattr(self, nodeid, ctx=None):
        if nodeid >= VIRTUAL_BASE:
            return self._snap_getattr(nodeid)
        node = self._node(nodeid)
        if node.write_error:
            error, node.write_error = node.write_error, 0
            if node.writers:
                raise pyfuse3.FUSEError(error)     # see _tell_the_writer
        return _entry(os.stat(node.fd), nodeid, LIVE_TIMEOUT)

    @fuse_op
    async def setattr(self, nodeid, attr, fields, fh, ctx):
        if nodeid >= VIRTUAL_BASE:
            raise _erofs()
        node = self._node(nodeid)
        unchanged = _only_times_already_set(attr, fields, node.fd)
        if unchanged is not None:
            # With the writeback cache the kernel flushes its cached mtime and ctime
            # after every unlink, rename or link of a file: mostly the mtime it has.
            # Not a change: nothing to capture, nothing to count.
            return _entry(unchanged, nodeid, LIVE_TIMEOUT)
        if ctx.pid != self.refresher_tid or nodeid not in self.refreshing:
            if fields.update_size:
                with self.inodes.pinned(node):
                    await self.capture.before_content_change(node.ino, node.fd)
            self.capture.before_attr_change(node.ino, node.fd)
            self.writers.object(node.ino, ctx.pid, ctx.uid)
        node.entry = None       # after the last await: a readdir meanwhile saw the old attributes
        path = libc.proc_path(node.fd)
        if fields.update_size:
            before = os.stat(node.fd)
            if fh is not None and fh in self.open_files:
                os.ftruncate(fh, attr.st_size)
            else:
                os.truncate(path, attr.st_size)
            if not fields.update_mtime:
                # The kernel owns mtime (writeback cache) and sends one when it wants it changed.
                os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        if fields.update_mode:
            os.chmod(path, stat.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            libc.chown_fd(node.fd, attr.st_uid if fields.update_uid else -1,
                          attr.st_gid if fields.update_gid else -1)
        if fields.update_atime or fields.update_mtime:
            st = os.stat(node.fd)
            atime = attr.st_atime_ns if fields.update_atime else st.st_atime_ns
            mtime = attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns
            os.utime(path, ns=(atime, mtime))
        if _only_ctime(fields):
            # chown(path, -1, -1) stamps ctime natively; recorded like any other change, so a
            # recovery after a crash knows the new ctime came through the daemon.
            libc.chown_fd(node.fd, -1, -1)
        return _entry(os.stat(node.fd), nodeid, LIVE_TIMEOUT)

    @fuse_op
    async def readlink(self, nodeid, ctx):
        if nodeid == LATEST_ID:
            return self._latest_target()
        if nodeid >= VIRTUAL_BASE:
            return self.view.readlink(self._snap_obj(nodeid))
        return libc.readlink_fd(self._node(nodeid).fd)

    def forget(self, inode_list):
        self.requests["forget"] += 1
        for nodeid, count in inode_list:
            try:
                if nodeid >= VIRTUAL_BASE:
                    self.snap_nodes.forget(nodeid, count)
                else:
                    node = self.inodes.get(nodeid)
                    if node is not None and node.size_unsure:
                        self._forgotten_unsure(node)   # the kernel's inode, and its size, are gone
                    self.inodes.forget(nodeid, count)
            except Exception:
                log.exception("forget(%d) failed", nodeid)

    @fuse_op
    async def statfs(self, ctx):
        sv = os.statvfs(libc.proc_path(self.root_fd))
        out = pyfuse3.StatvfsData()
        for field in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
                      "f_files", "f_ffree", "f_favail", "f_namemax"):
            setattr(out, field, getattr(sv, field))
        return out

    # -- creating and removing entries --------------------------------------------------
    def _make(self, parent_id: int, name: bytes, ctx, make) -> pyfuse3.EntryAttributes:
        """Create entry *name* with ``make(dir_fd)``, its pre-image recorded first."""
        parent = self._live_parent(parent_id, name)
        self._before_entry_change(parent_id, parent, name)
        with _umask(ctx):
            make(parent.fd)
        self.writers.entry(parent.ino, name, ctx.pid, ctx.uid)
        return self._created(parent, name, ctx)

    def _requested_mode(self, parent_id: int, mode: int, ctx) -> int:
        """The mode a creation asked for, before the kernel's umask, where the parent directory
        has a default ACL; else *mode*.

        POSIX.1e: under a default ACL the new object's permissions are the ACL's and the
        requested mode's, and the umask does not apply. The kernel leaves the umask to the
        filesystem only if the daemon negotiates FUSE_DONT_MASK, which pyfuse3 does not: it
        sends the mode already masked (and the umask). The caller is blocked in its system
        call meanwhile, so its mode argument is read from /proc/TID/syscall, and taken only if
        it is what the kernel masked. Where it cannot be read, the masked mode stands (never
        more access than natively, maybe less; README).
        """
        umask = ctx.umask & 0o777
        if not umask or parent_id >= VIRTUAL_BASE or not ctx.pid:
            return mode
        node = self.inodes.get(parent_id)
        if node is None or not _has_default_acl(node.fd):
            return mode
        asked = libc.creation_mode(ctx.pid)
        if asked is None or asked & 0o777 & ~umask != mode & 0o777:
            return mode
        # The permission bits only: the set-id and sticky bits are the kernel's decision (it
        # drops an S_ISGID the caller may not have).
        return (mode & ~0o777) | (asked & 0o777)

    @fuse_op
    async def mkdir(self, parent_id, name, mode, ctx):
        mode = self._requested_mode(parent_id, mode, ctx)
        return self._make(parent_id, name, ctx, lambda dir_fd: os.mkdir(name, mode, dir_fd=dir_fd))

    @fuse_op
    async def mknod(self, parent_id, name, mode, rdev, ctx):
        mode = self._requested_mode(parent_id, mode, ctx)
        return self._make(parent_id, name, ctx,
                          lambda dir_fd: os.mknod(name, mode, rdev, dir_fd=dir_fd))

    @fuse_op
    async def symlink(self, parent_id, name, target, ctx):
        return self._make(parent_id, name, ctx,
                          lambda dir_fd: os.symlink(target, name, dir_fd=dir_fd))

    @fuse_op
    async def create(self, parent_id, name, mode, flags, ctx):
        mode = self._requested_mode(parent_id, mode, ctx)
        parent = self._live_parent(parent_id, name)
        self._before_entry_change(parent_id, parent, name)
        with _umask(ctx):
            fd = os.open(name, _backing_flags(flags) | os.O_CREAT | os.O_EXCL | self.noatime_reads,
                         mode, dir_fd=parent.fd)
        self.writers.entry(parent.ino, name, ctx.pid, ctx.uid)
        try:
            entry = self._created(parent, name, ctx)
        except BaseException:
            os.close(fd)
            raise
        node = self.inodes[entry.st_ino]
        self._opened(fd, node, flags)
        return pyfuse3.FileInfo(fh=fd, keep_cache=True), entry

    @fuse_op
    async def link(self, nodeid, new_parent_id, new_name, ctx):
        if nodeid >= VIRTUAL_BASE:
            raise pyfuse3.FUSEError(errno.EXDEV)
        node = self._node(nodeid)
        parent = self._live_parent(new_parent_id, new_name)
        self._before_entry_change(new_parent_id, parent, new_name)
        self.capture.before_attr_change(node.ino, node.fd)      # its link count
        node.entry = None
        os.link(libc.proc_path(node.fd), new_name, dst_dir_fd=parent.fd, follow_symlinks=True)
        self.writers.entry(parent.ino, new_name, ctx.pid, ctx.uid)
        st = os.stat(new_name, dir_fd=parent.fd, follow_symlinks=False)
        self.inodes.remember(parent, new_name, st.st_ino)
        return _entry(st, self.inodes.nodeid(st.st_ino), LIVE_TIMEOUT)

    async def _prepare_removal(self, st) -> bool:
        """Await what removing the last name of *st*'s object needs. True: keep it in the store."""
        if stat.S_ISDIR(st.st_mode) or st.st_nlink > 1:
            return not stat.S_ISDIR(st.st_mode) or not self.capture.is_born(st.st_ino)
        node = self.inodes.get(self.inodes.nodeid(st.st_ino))
        writers = node.writers if node is not None else 0
        fd = node.fd if node is not None else None
        if writers and fd is not None:
            return await self.capture.before_last_unlink(st.st_ino, fd, writers)
        return not self.capture.is_born(st.st_ino)

    def _before_link_count_change(self, dir_fd: int, name: bytes, st) -> None:
        """Record the attributes of a file that keeps other names when entry *name* goes.

        Its link count changes: snapshots show the count of their turn, and a rollback
        must hand the kernel fresh attributes of it (it does for the objects whose
        attributes it restores). The kernel may have forgotten the file: then it is
        reached through the name.
        """
        if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
            node = self.inodes.get(self.inodes.nodeid(st.st_ino))
            if node is not None:
                self.capture.before_attr_change(node.ino, node.fd)
            else:
                self._before_attr_change_of(dir_fd, name, st.st_ino)

    def _before_attr_change_of(self, dir_fd: int, name: bytes, ino: int) -> None:
        """before_attr_change of the object entry *name* of *dir_fd* holds (maybe unknown to
        the kernel, so without a descriptor of the daemon's)."""
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            self.capture.before_attr_change(ino, fd)
        finally:
            os.close(fd)

    @fuse_op
    async def unlink(self, parent_id, name, ctx):
        parent = self._live_parent(parent_id, name)
        st = os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            raise pyfuse3.FUSEError(errno.EISDIR)
        keep = await self._prepare_removal(st)
        spared = self.capture.removal_spared(parent.ino, parent.fd, name, st)
        self._before_entry_change(parent_id, parent, name)
        self._before_link_count_change(parent.fd, name, st)
        self._drop_listed(st.st_ino)
        self.writers.entry(parent.ino, name, ctx.pid, ctx.uid)
        if keep and not spared and st.st_nlink == 1:
            self.store.keep_by_rename(parent.fd, name, st.st_ino)
        else:
            os.unlink(name, dir_fd=parent.fd)
        if spared:
            self.capture.removed(st)

    @fuse_op
    async def rmdir(self, parent_id, name, ctx):
        parent = self._live_parent(parent_id, name)
        st = os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
        if not stat.S_ISDIR(st.st_mode):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        self._check_empty(parent.fd, name)
        spared = self.capture.removal_spared(parent.ino, parent.fd, name, st)
        self._before_entry_change(parent_id, parent, name)
        self.writers.entry(parent.ino, name, ctx.pid, ctx.uid)
        if spared or self.capture.is_born(st.st_ino):
            os.rmdir(name, dir_fd=parent.fd)
        else:
            self.store.keep_by_rename(parent.fd, name, st.st_ino)
        if spared:
            self.capture.removed(st)

    @staticmethod
    def _check_empty(dir_fd: int, name: bytes) -> None:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            with os.scandir(fd) as it:
                if next(it, None) is not None:
                    raise pyfuse3.FUSEError(errno.ENOTEMPTY)
        finally:
            os.close(fd)

    @fuse_op
    async def rename(self, old_parent_id, old_name, new_parent_id, new_name, flags, ctx):
        old_parent = self._live_parent(old_parent_id, old_name)
        new_parent = self._live_parent(new_parent_id, new_name)
        src = os.stat(old_name, dir_fd=old_parent.fd, follow_symlinks=False)
        try:
            victim = os.stat(new_name, dir_fd=new_parent.fd, follow_symlinks=False)
        except FileNotFoundError:
            victim = None
        replaces = (victim is not None and not flags & (pyfuse3.RENAME_EXCHANGE | pyfuse3.RENAME_NOREPLACE)
                    and victim.st_ino != src.st_ino)
        keep = spared = False
        if replaces:
            self._check_rename_over(src, victim, old_parent.fd, old_name, new_parent.fd, new_name)
            keep = await self._prepare_removal(victim)
            spared = self.capture.removal_spared(new_parent.ino, new_parent.fd, new_name, victim)
            keep = keep and not spared
        self._before_entry_change(old_parent_id, old_parent, old_name)
        self._before_entry_change(new_parent_id, new_parent, new_name)
        self.capture.moving(src.st_ino, stat.S_ISDIR(src.st_mode), new_parent.ino, new_parent.fd, new_name)
        if victim is not None and flags & pyfuse3.RENAME_EXCHANGE:
            self.capture.moving(victim.st_ino, stat.S_ISDIR(victim.st_mode), old_parent.ino,
                                old_parent.fd, old_name)
        if replaces:
            self._before_link_count_change(new_parent.fd, new_name, victim)
            self._drop_listed(victim.st_ino)
        self._drop_listed(src.st_ino)       # its ctime (a directory's "..", too)
        if victim is not None and flags & pyfuse3.RENAME_EXCHANGE:
            self._drop_listed(victim.st_ino)    # moved too: its ctime (and on XFS a directory's mtime)
        self.writers.entry(old_parent.ino, old_name, ctx.pid, ctx.uid)
        self.writers.entry(new_parent.ino, new_name, ctx.pid, ctx.uid)
        if flags & pyfuse3.RENAME_EXCHANGE and victim is not None and old_parent.ino != new_parent.ino:
            self._before_dotdot_change(old_parent.fd, old_name, src)
            self._before_dotdot_change(new_parent.fd, new_name, victim)
        if not (keep and (stat.S_ISDIR(victim.st_mode) or victim.st_nlink == 1)):
            libc.renameat2(old_parent.fd, old_name, new_parent.fd, new_name, flags)
        else:
            self._rename_keeping_victim(old_parent.fd, old_name, new_parent.fd, new_name, victim)
        if spared:
            self.capture.removed(victim)
        # Where to reopen them by once their descriptors are closed (inodes.py).
        self.inodes.moved(src.st_ino, new_parent, new_name)
        if victim is not None and flags & pyfuse3.RENAME_EXCHANGE:
            self.inodes.moved(victim.st_ino, old_parent, old_name)

    def _before_dotdot_change(self, dir_fd: int, name: bytes, st) -> None:
        """Record the attributes of a directory that an exchange moves to another parent: XFS
        stamps its mtime when it rewrites its "..", and older snapshots must not show that."""
        if stat.S_ISDIR(st.st_mode):
            self._before_attr_change_of(dir_fd, name, st.st_ino)

    def _check_rename_over(self, src, victim, old_dir: int, old_name: bytes, dir_fd: int,
                           name: bytes) -> None:
        """The errors rename(2) would give, checked before the victim is moved away."""
        if stat.S_ISDIR(victim.st_mode):
            if not stat.S_ISDIR(src.st_mode):
                raise pyfuse3.FUSEError(errno.EISDIR)
            try:
                self._check_empty(dir_fd, name)
            except pyfuse3.FUSEError:
                # Not empty: the backing filesystem's own refusal says which errno it gives
                # (XFS EEXIST, ext4 ENOTEMPTY); it changes nothing.
                libc.renameat2(old_dir, old_name, dir_fd, name, 0)
                raise
        elif stat.S_ISDIR(src.st_mode):
            raise pyfuse3.FUSEError(errno.ENOTDIR)

    def _rename_keeping_victim(self, old_dir: int, old_name: bytes, new_dir: int, new_name: bytes,
                               victim) -> None:
        if stat.S_ISDIR(victim.st_mode):
            self.store.keep_by_rename(new_dir, new_name, victim.st_ino)
            try:
                libc.renameat2(old_dir, old_name, new_dir, new_name, libc.RENAME_NOREPLACE)
            except OSError:
                libc.renameat2(self.store.objects_fd, self.store.object_name(victim.st_ino),
                               new_dir, new_name, libc.RENAME_NOREPLACE)
                self.store.hold_at(new_dir, new_name, victim.st_ino)
                raise
            return
        # A second name in the store keeps the victim alive; the rename itself stays atomic.
        os.link(new_name, self.store.object_name(victim.st_ino), src_dir_fd=new_dir,
                dst_dir_fd=self.store.objects_fd, follow_symlinks=False)
        try:
            libc.renameat2(old_dir, old_name, new_dir, new_name)
        except OSError:
            self.store.unkeep(victim.st_ino)
            raise

    # -- open files -----------------------------------------------------------------------
    def _opened(self, fd: int, node: Node, flags: int) -> None:
        self.open_files[fd] = node
        node.pins += 1       # an open file's node keeps its descriptor (captures await on it)
        if flags & _WRITE_FLAGS:
            self.writer_fhs.add(fd)
            node.writers += 1
            if flags & os.O_DIRECT:
                self.direct_fhs.add(fd)
                self.direct_writers[node.ino] += 1

    @fuse_op
    async def open(self, nodeid, flags, ctx):
        if nodeid >= VIRTUAL_BASE:
            return self._snap_open(nodeid, flags)
        node = self._not_detached(self._node(nodeid))
        if flags & (_WRITE_FLAGS | os.O_TRUNC) and not self.capture.content_captured(node.ino):
            # Captured at open, not at the first write: with the writeback cache a
            # write() only fills the page cache, so a capture that fails (ENOSPC)
            # must fail here, where the caller sees it, not at a later flush.
            with self.inodes.pinned(node):
                await self.capture.before_content_change(node.ino, node.fd,
                                                         ahead=not flags & os.O_TRUNC)
        if flags & (_WRITE_FLAGS | os.O_TRUNC):
            self.writers.object(node.ino, ctx.pid, ctx.uid)     # writes carry no caller
        if flags & os.O_TRUNC:
            self.epoch += 1     # no await from here on: the truncation is in this epoch's past
            node.entry = None
            if ctx.uid != 0:
                self._drop_setid_bits(node)
        fd = self._open_backing(node, _backing_flags(flags))
        self._opened(fd, node, flags)
        if flags & os.O_ACCMODE == os.O_RDONLY and self.atime != "noatime" \
                and ctx.pid != self.flusher_tid:
            self._read_access(nodeid, node, fd)
        return pyfuse3.FileInfo(fh=fd, keep_cache=True)

    def _open_backing(self, node: Node, flags: int) -> int:
        """Open the backing object of *node*, with O_NOATIME where an atime option wants it
        (not the owner, a rootless daemon may not: its reads then follow the backing mount)."""
        if self.noatime_reads:
            try:
                return os.open(libc.proc_path(node.fd), flags | os.O_NOATIME)
            except PermissionError:
                pass
        return os.open(libc.proc_path(node.fd), flags)

    def _read_access(self, nodeid: int, node: Node, fd: int) -> None:
        """Record a read as the backing filesystem would. The kernel keeps no atime for a FUSE
        file and serves cached pages without asking the daemon, so an open for reading reads
        one byte of the backing file: its atime moves under the backing mount's own policy,
        and ctime stays (a utime would move it, and a recovery would take that for drift)."""
        st = os.fstat(fd)
        if self.atime == "relatime" and not _relatime_due(st):
            return              # the usual case: one fstat
        if self.noatime_reads:  # *fd* reads without moving atime: a descriptor of its own
            _read_one_byte(libc.proc_path(node.fd))
        else:
            os.pread(fd, 1, 0)
        if os.fstat(fd).st_atime_ns != st.st_atime_ns:
            node.entry = None
            # Attributes only: no page is dropped, so no lock the kernel holds for us is needed.
            pyfuse3.invalidate_inode(nodeid, attr_only=True)

    def _drop_setid_bits(self, node: Node) -> None:
        """What truncation by a caller without CAP_FSETID does natively (uid 0 stands for it).

        The daemon truncates as root, which the backing filesystem lets keep
        S_ISUID and S_ISGID; the kernel clears them itself on write() and
        truncate(), but leaves it to us on an O_TRUNC open.
        """
        mode = os.stat(node.fd).st_mode
        drop = mode & stat.S_ISUID | (mode & stat.S_ISGID if mode & stat.S_IXGRP else 0)
        if drop:
            self.capture.before_attr_change(node.ino, node.fd)
            os.chmod(libc.proc_path(node.fd), stat.S_IMODE(mode) & ~drop)

    @fuse_op
    async def read(self, fh, off, size):
        if fh >= SNAP_FH_BASE:
            return self._snap_read(fh, off, size)
        return os.pread(fh, size, off)

    @fuse_op
    async def write(self, fh, off, buf):
        node = self.open_files[fh]
        if not self.capture.content_captured(node.ino):
            await self.capture.before_content_change(node.ino, node.fd)
        elif self.capture.unconfirmed:
            self.capture.confirm(node.ino)
        # With the writeback cache the kernel owns mtime and sends it in a setattr,
        # which may arrive before this (queued) write: keep the backing mtime as is.
        node.entry = None
        st = os.fstat(fh)
        try:
            written = os.pwrite(fh, buf, off)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                self._size_unsure(node)
                self._tell_the_writer(node, e.errno)
            raise
        os.utime(fh, ns=(st.st_atime_ns, st.st_mtime_ns))
        if written < len(buf):
            self._size_unsure(node)
        if fh in self.direct_fhs:
            await self._after_direct_write(node)
        return written

    async def _after_direct_write(self, node: Node) -> None:
        """Drop the kernel's cached pages of a file a direct write has just changed, before the
        write is answered.

        The kernel drops them before it sends an O_DIRECT write, and again after a synchronous
        one, but not after an asynchronous one (io_submit): a buffered read of the range that
        reached the daemon meanwhile cached the old bytes, and they stayed. pyfuse3
        does not say whether a write is direct or a write-back of cached pages, so a write on
        a handle opened with O_DIRECT is taken for direct. Dropping pages waits for those
        under write-back, and the write-back of a page may be this very request when another,
        buffered, writer has the file open: then the drop is not awaited (the reply must go
        first), and else it is awaited at most DIRECT_INVALIDATE_WAIT (pages a mapping dirtied).
        """
        nodeid = self.inodes.nodeid(node.ino)
        if node.writers > self.direct_writers[node.ino]:
            threading.Thread(target=_drop_pages, args=(nodeid,), daemon=True).start()
            return
        with trio.move_on_after(DIRECT_INVALIDATE_WAIT):
            await trio.to_thread.run_sync(_drop_pages, nodeid, abandon_on_cancel=True)

    # A write the backing file refused (or took in part) is already counted in the size the
    # kernel keeps: with the writeback cache it owns a file's size and never takes it from a
    # reply, only a new inode takes it from the daemon. So the entry the kernel knows the file
    # by is dropped (again at the last release: a lookup in between may have made a new one),
    # the inode goes when nothing holds it (the kernel holds it until a release is answered),
    # and a lookup arriving before its FORGET waits for it: answered earlier, the lookup would
    # find the old inode, and its stale size, still cached.
    def _tell_the_writer(self, node: Node, error: int) -> None:
        """Make the next write() to a file whose write-back failed fail with *error*.

        With the writeback cache a write() only fills the page cache, and a failed write-back
        is reported at close or fsync: a writer that does neither (`dd` to a full disk) would
        run on for ever, every byte past the full disk dropped. But before each write() the
        kernel brings the file's size up to date, with a GETATTR once its attributes are
        invalid: so they are dropped here, and getattr answers that GETATTR with the error
        (once, and only while the file is open for writing), which write() returns."""
        if node.writers and not node.write_error:
            node.write_error = error
            # Attributes only: no page is dropped, so no lock the kernel holds for us is needed.
            pyfuse3.invalidate_inode(self.inodes.nodeid(node.ino), attr_only=True)

    def _size_unsure(self, node: Node) -> None:
        if not node.size_unsure:       # once: a failed write-back fails every run of pages
            node.size_unsure = True
            self._drop_kernel_entry(node)

    async def flush_open_writes(self) -> None:
        """Have the kernel write back, and wait for, the pages it holds of files open for
        writing: before a seal, so that the turn holds every write made in it.

        syncfs(2) does not wait for a FUSE write-back (the kernel ends it before the daemon
        answers), but a close does: at every close of a file the kernel writes its dirty
        pages back and waits for the replies. So a thread of ours opens and closes each file
        open for writing, by its reserved name. A file not open has no dirty page: its last
        close wrote them back.
        """
        if not self.writer_fhs or self.mount_path is None:
            return
        async with self._flush_lock:
            nodeids = sorted({self.inodes.nodeid(self.open_files[fh].ino) for fh in self.writer_fhs})
            self.flushing = set(nodeids)
            try:
                await trio.to_thread.run_sync(self._open_and_close, nodeids)
            finally:
                self.flushing, self.flusher_tid = set(), 0

    def _open_and_close(self, nodeids: list[int]) -> None:
        self.flusher_tid = threading.get_native_id()
        dir_fd, root = self.mount_path
        unreached = 0
        for nodeid in nodeids:
            try:
                fd = os.open(os.path.join(root, REFRESH_PREFIX + b"%d" % nodeid),
                             os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
            except FileNotFoundError:
                continue        # closed meanwhile: that close wrote the pages back
            except OSError as e:
                # A rootless daemon may not read a file its owner made unreadable.
                log.warning("cannot reopen open file %d to write its pages back: %s", nodeid, e)
                unreached += 1
                continue
            try:
                os.close(fd)
            except OSError as e:
                # A write-back that failed (a full disk): the data is not in the tree, so the
                # turn is exact without it. The writer's fsync still reports it; its close may
                # not, as this close took the error (see docs/architecture.md).
                log.warning("write-back of open file %d failed: %s", nodeid, e)
        if unreached:
            with contextlib.suppress(OSError):   # the next best thing: starts the write-back
                fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
                try:
                    libc.syncfs(fd)
                finally:
                    os.close(fd)

    def _drop_kernel_entry(self, node: Node) -> None:
        # In a thread of its own, never awaited: the kernel takes the directory's lock for it,
        # which a lookup waiting in _until_forgotten may hold.
        if node.parent:
            threading.Thread(target=invalidate_entries, args=([(node.parent, node.name)],),
                             daemon=True).start()

    async def _until_forgotten(self, node: Node) -> None:
        event = self._forgotten.setdefault(node.ino, trio.Event())
        if event.is_set():
            return              # waited once in vain: the file stays open elsewhere
        with trio.move_on_after(FORGET_WAIT):
            await event.wait()
        event.set()

    def _forgotten_unsure(self, node: Node) -> None:
        node.size_unsure = False
        event = self._forgotten.pop(node.ino, None)
        if event is not None:
            event.set()

    async def flush(self, fh):
        self.requests["flush"] += 1
        # Nothing is buffered here (writes go straight to the backing file), and
        # with the writeback cache the kernel writes dirty pages back, and reports
        # their errors to close(), before it would send FLUSH.  ENOSYS tells it
        # never to send FLUSH again: one round trip less for every close().
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @fuse_op
    async def fsync(self, fh, datasync):
        if fh >= SNAP_FH_BASE:
            return
        await self.history_sync.before_sync()      # the pre-images first (durability.py)
        await trio.to_thread.run_sync(os.fdatasync if datasync else os.fsync, fh)

    @fuse_op
    async def release(self, fh):
        if fh >= SNAP_FH_BASE:
            snap = self.snap_files.pop(fh)
            os.close(snap.fd)
            return
        node = self.open_files.pop(fh)
        node.pins -= 1
        os.close(fh)
        if node.size_unsure and not node.pins:
            self._drop_kernel_entry(node)
        if fh in self.writer_fhs:
            self.writer_fhs.discard(fh)
            node.writers -= 1
            if not node.writers:
                node.write_error = 0    # its close has reported it
            if fh in self.direct_fhs:
                self.direct_fhs.discard(fh)
                self.direct_writers[node.ino] -= 1
                if not self.direct_writers[node.ino]:
                    del self.direct_writers[node.ino]

    # -- directories ----------------------------------------------------------------------
    @fuse_op
    async def opendir(self, nodeid, ctx):
        fh = self._new_fh()
        self.listings[fh] = _Listing(nodeid)
        return fh

    @fuse_op
    async def readdir(self, fh, start_id, token):
        listing = self.listings[fh]
        if listing.nodeid >= VIRTUAL_BASE:
            if listing.names is None or start_id == 0:
                listing.names = self._snap_list(listing.nodeid)
            return self._snap_readdir(listing, start_id, token)
        if listing.names is None or start_id == 0:
            listing.names, listing.inos = self._list(listing.nodeid)
            listing.epoch = self.epoch
        parent, generation = self._node(listing.nodeid), self.generation
        # A name's d_ino is only known to be its object while nothing changed since the scan.
        reuse = listing.epoch == self.epoch
        for i in range(start_id, len(listing.names)):
            name = listing.names[i]
            if name == SNAPDIR or name in _DOTS:
                entry = self._snapdir_entry() if name == SNAPDIR else self._dot_entry(parent, name)
                if not pyfuse3.readdir_reply(token, name, entry, i + 1):
                    return
                continue
            # readdirplus sends every entry's attributes: a stat each, unless this
            # object was listed before and nothing changed it since.
            node = self.inodes.get(self.inodes.nodeid(listing.inos[i])) if reuse else None
            if node is not None and node.entry is not None and node.entry_generation == generation:
                entry, ino = node.entry, node.ino
            else:
                try:
                    st = os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                entry, ino = _entry(st, self.inodes.nodeid(st.st_ino), LIVE_TIMEOUT), st.st_ino
            if not pyfuse3.readdir_reply(token, name, entry, i + 1):
                return
            node = self.inodes.remember(parent, name, ino)
            node.entry, node.entry_generation = entry, generation

    def _dot_entry(self, node: Node, name: bytes) -> pyfuse3.EntryAttributes:
        """The entry of "." or ".." of live directory *node* (readdir_reply counts no lookup).

        ".." is found downwards from the root, by the path the kernel keeps for the
        directory's descriptor: walking ".." up from a child of the root would step
        onto this very mount (and wait for itself)."""
        if name == b"." or node.ino == self.inodes.root_ino:
            return _entry(os.stat(node.fd), self.inodes.nodeid(node.ino), LIVE_TIMEOUT)
        path = os.readlink(libc.proc_path(node.fd))
        prefix = self.capture.root_prefix
        parent = path[len(prefix):].rpartition(b"/")[0] \
            if path.startswith(prefix) else b""
        try:
            st = os.stat(parent or b".", dir_fd=self.root_fd)
        except OSError:     # removed or moved meanwhile: "." stands in, as for the root
            st = os.stat(node.fd)
        return _entry(st, self.inodes.nodeid(st.st_ino), LIVE_TIMEOUT)

    def _list(self, nodeid: int) -> tuple[list[bytes], list[int]]:
        """The names of a live directory and their inode numbers (as the directory says),
        "." and ".." first, as the backing filesystem lists them."""
        node = self._in_tree(self._node(nodeid))
        if not self.noatime_reads:
            with os.scandir(libc.proc_path(node.fd)) as it:
                listed = [(b".", 0), (b"..", 0)] + [(e.name, e.inode()) for e in it]
        else:
            fd = self._open_listed_dir(node)
            try:
                with os.scandir(fd) as it:
                    listed = [(b".", 0), (b"..", 0)] + [(os.fsencode(e.name), e.inode()) for e in it]
            finally:
                os.close(fd)
        if nodeid == pyfuse3.ROOT_INODE:
            listed = [(n, i) for n, i in listed if n != STORE_NAME and n != SNAPDIR]
            if self.snapdir_visible:
                listed.append((SNAPDIR, 0))
        return [n for n, _ in listed], [i for _, i in listed]

    def _open_listed_dir(self, node: Node) -> int:
        """A descriptor to list *node* by, under an atime option: its reading moves the
        directory's atime only as the option says (nodiratime, noatime: never)."""
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
        moves = not self.nodiratime and self.atime != "noatime" and \
            (self.atime == "strictatime" or _relatime_due(os.stat(node.fd)))
        return self._open_backing(node, flags) if not moves else \
            os.open(libc.proc_path(node.fd), flags)

    def _snap_list(self, nodeid: int) -> list[bytes]:
        if nodeid == SNAPDIR_ID:
            return [b"turn-%d" % t for t in self.capture.catalogue.sealed_turns()] + [LATEST]
        return self.view.names(self._snap_obj(nodeid))

    @fuse_op
    async def releasedir(self, fh):
        del self.listings[fh]

    @fuse_op
    async def fsyncdir(self, fh, datasync):
        listing = self.listings.get(fh)
        if listing is None or listing.nodeid >= VIRTUAL_BASE:
            return
        fd = os.open(libc.proc_path(self._node(listing.nodeid).fd), os.O_RDONLY | os.O_CLOEXEC)
        try:
            await self.history_sync.before_sync()  # entry pre-images, objects kept (durability.py)
            await trio.to_thread.run_sync(os.fsync, fd)
        finally:
            os.close(fd)

    # -- extended attributes ----------------------------------------------------------------
    @fuse_op
    async def getxattr(self, nodeid, name, ctx):
        if nodeid == pyfuse3.ROOT_INODE and name == CONTROL_XATTR_NAME:
            return self.control_path
        if nodeid >= VIRTUAL_BASE:
            value = self._snap_xattrs(nodeid).get(name)
            if value is None:
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
            return value
        return os.getxattr(libc.proc_path(self._node(nodeid).fd), name)

    @fuse_op
    async def listxattr(self, nodeid, ctx):
        if nodeid >= VIRTUAL_BASE:
            return list(self._snap_xattrs(nodeid))
        return [os.fsencode(n) for n in os.listxattr(libc.proc_path(self._node(nodeid).fd))]

    @fuse_op
    async def setxattr(self, nodeid, name, value, ctx):
        if nodeid >= VIRTUAL_BASE:
            raise _erofs()
        node = self._node(nodeid)
        self.capture.before_attr_change(node.ino, node.fd)
        self.writers.object(node.ino, ctx.pid, ctx.uid)
        node.entry = None    # its ctime
        os.setxattr(libc.proc_path(node.fd), name, value)
        if name == _ACL_ACCESS and ctx.uid != 0:
            _acl_drop_setgid(node.fd, ctx)

    @fuse_op
    async def removexattr(self, nodeid, name, ctx):
        if nodeid >= VIRTUAL_BASE:
            raise _erofs()
        node = self._node(nodeid)
        self.capture.before_attr_change(node.ino, node.fd)
        self.writers.object(node.ino, ctx.pid, ctx.uid)
        node.entry = None    # its ctime
        os.removexattr(libc.proc_path(node.fd), name)

    # -- the `.snapshots` tree ---------------------------------------------------------------
    def _snap_obj(self, nodeid: int) -> SnapObject:
        obj = self.snap_nodes.nodes.get(nodeid)
        if obj is None or self.view.pruned(obj.turn):
            raise pyfuse3.FUSEError(errno.ESTALE)
        return obj

    def _latest_target(self) -> bytes:
        sealed = self.capture.catalogue.sealed_turns()
        return b"turn-%d" % sealed[-1]

    def _snapdir_entry(self) -> pyfuse3.EntryAttributes:
        root = os.stat(self.root_fd)
        e = _entry(root, SNAPDIR_ID, 0.0)
        e.st_mode = stat.S_IFDIR | 0o555
        e.st_nlink = 2
        e.st_size = 0
        e.st_blocks = 0
        return e

    def _latest_entry(self) -> pyfuse3.EntryAttributes:
        e = self._snapdir_entry()
        e.st_ino = LATEST_ID
        e.st_mode = stat.S_IFLNK | 0o777
        e.st_nlink = 1
        e.st_size = len(self._latest_target())
        return e

    def _snap_entry(self, nodeid: int, attrs) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = nodeid
        e.generation = 0
        e.entry_timeout = e.attr_timeout = SNAPSHOT_TIMEOUT
        e.st_mode = attrs.mode
        e.st_nlink = attrs.nlink
        e.st_uid = attrs.uid
        e.st_gid = attrs.gid
        e.st_rdev = attrs.rdev
        e.st_size = attrs.size
        e.st_blksize = 4096
        e.st_blocks = attrs.blocks
        e.st_atime_ns = e.st_mtime_ns = attrs.mtime_ns
        e.st_ctime_ns = attrs.mtime_ns
        return e

    def _turn_root(self, name: bytes) -> int | None:
        if not name.startswith(b"turn-") or not name[5:].isdigit():
            return None
        turn = int(name[5:])
        return turn if self.capture.catalogue.is_sealed(turn) else None

    def _snap_lookup(self, parent_id: int, name: bytes, count: bool = True) -> pyfuse3.EntryAttributes:
        """Entry *name* of a `.snapshots` directory; *count*: the kernel's lookup count grows."""
        if parent_id == SNAPDIR_ID:
            if name == LATEST:
                return self._latest_entry()
            turn = self._turn_root(name)
            if turn is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            parent_turn, ino, handle = turn, self.inodes.root_ino, self.view.root_handle
            st = os.stat(self.root_fd)
        else:
            parent = self._snap_obj(parent_id)
            parent_turn = parent.turn
            ino, handle, st = self.view.child(parent_turn, parent, name)
        nodeid = self.snap_nodes.ensure(parent_turn, ino, handle)
        if count:
            self.snap_nodes.nodes[nodeid].lookups += 1
        return self._snap_entry(nodeid, self.view.attrs(parent_turn, ino, st))

    def _snap_getattr(self, nodeid: int) -> pyfuse3.EntryAttributes:
        if nodeid == SNAPDIR_ID:
            return self._snapdir_entry()
        if nodeid == LATEST_ID:
            return self._latest_entry()
        return self._snap_entry(nodeid, self.view.stat_of(self._snap_obj(nodeid)))

    def _snap_readdir(self, listing: _Listing, start_id: int, token) -> None:
        names = listing.names
        for i in range(start_id, len(names)):
            try:
                entry = self._snap_lookup(listing.nodeid, names[i], count=False)
            except FileNotFoundError:
                continue
            if not pyfuse3.readdir_reply(token, names[i], entry, i + 1):
                return
            obj = self.snap_nodes.nodes.get(entry.st_ino)
            if obj is not None:
                obj.lookups += 1

    def _snap_open(self, nodeid: int, flags: int) -> pyfuse3.FileInfo:
        if flags & (_WRITE_FLAGS | os.O_TRUNC):
            raise _erofs()
        obj = self._snap_obj(nodeid)
        fd, is_copy = self.view.content_source(obj)
        fh = self._new_fh()
        self.snap_files[fh] = _SnapFile(obj, fd, is_copy)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    def _snap_read(self, fh: int, off: int, size: int) -> bytes:
        snap = self.snap_files[fh]
        if self.view.pruned(snap.obj.turn):
            raise pyfuse3.FUSEError(errno.ESTALE)     # its rows are gone: the live file is not it
        if not snap.is_copy and self.view.preimage_name(snap.obj) is not None:
            # The live object was changed in place since open: its pre-image is in the store now.
            os.close(snap.fd)
            snap.fd, snap.is_copy = self.view.content_source(snap.obj)
        return os.pread(snap.fd, size, off)

    def _snap_xattrs(self, nodeid: int) -> dict[bytes, bytes]:
        if nodeid in (SNAPDIR_ID, LATEST_ID):
            return {}
        return self.view.xattrs(self._snap_obj(nodeid))
