"""Capture: record the pre-image of a thing before its first change in a turn.

Owns the open turn and the capture rules, cheapest first:
entries and attributes are recorded as catalogue rows; content is cloned
(FICLONE) or copied into the store before an in-place change; an object that
leaves the tree is moved into the store instead of being deleted. Every
`before_*` method must run, and finish, before the change it guards reaches
the backing filesystem (record before mutate). Knows nothing about FUSE.

Objects born in the open turn need no pre-image (they did not exist at its
start), and neither do entries of directories born in it: `npm install`
into a new directory records one entry, not thousands. Ignored things
(ignore.py) need none either: capture passes over them (`passed`).
"""

import errno
import logging
import os
import stat

import trio

from . import libc
from .attribution import Attribution
from .ignore import INSIDE, RECORD, BadRules, Ignore, Rules, load_rules
from .store import Store

log = logging.getLogger(__name__)

# Content captures above this size run in a worker thread so that one huge
# copy does not stall every other request of the mount.
THREADED_CAPTURE_BYTES = 4 << 20
# Content files listed for the next fsync (durability.py) at most; past it, that fsync
# syncs the whole backing filesystem instead (a mount where nobody fsyncs stays bounded).
UNSYNCED_MAX = 100_000


def read_xattrs(path: bytes) -> dict[bytes, bytes]:
    try:
        names = os.listxattr(path)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EPERM):
            return {}
        raise
    return {os.fsencode(n): os.getxattr(path, n) for n in names}


class Capture:
    def __init__(self, store: Store, root_path: bytes):
        self.store = store
        self.catalogue = store.catalogue
        self.mode = store.probe_clone()
        self.root_prefix = root_path.rstrip(b"/") + b"/"
        self.turn = self.catalogue.open_turn()
        self.writers = Attribution()      # who changes what in the open turn
        self.ignore = Ignore(self.catalogue, store.root_fd, self.root_prefix, self.turn)
        # Content files written since the last fsync through the mount made them durable
        # (durability.py); kept across seals.
        self.unsynced: list[str] = []
        self.unsynced_overflow = False
        self._reset_turn_state()
        # A turn left open by a daemon that died: never capture twice in it.
        self.entries_done, self.attrs_done, self.content_done = self.catalogue.captured_in(self.turn)

    def _reset_turn_state(self) -> None:
        self.born: set[int] = set()            # objects created in the open turn
        self.entries_done: set[tuple[int, bytes]] = set()
        self.attrs_done: set[int] = set()
        self.content_done: set[int] = set()
        self.passed: set[int] = set()          # ignored objects and directories (ignore.py)
        self.unconfirmed: set[int] = set()     # captured at open for writing, not written yet
        self.changes = 0
        self.bytes = 0
        self._in_flight: dict[int, trio.Event] = {}

    # -- turns -----------------------------------------------------------------
    def seal(self, message: str, kind: str = "turn", target: int | None = None,
             rules: Rules | None = None) -> int:
        """Close the open turn (O(1): nothing is scanned) and open the next. Returns the sealed number.

        The next turn uses *rules*, else `.cowfsignore` as it is now (the
        rules in force if it is not valid: a checkpoint checks it first)."""
        sealed = self.turn
        w = self.writers
        # One commit for the seal and the next turn: a full disk fails both, never leaves a
        # sealed turn with no open one.
        with self.catalogue.transaction():
            self.catalogue.record_writers(sealed, w.processes.values(), w.entries, w.objects)
            self.catalogue.seal(sealed, message, self.changes, self.bytes, kind, target)
            opened = self.catalogue.open_turn()
        w.reset()
        self.turn = opened
        self._reset_turn_state()
        self.ignore.open_turn_rules(self.turn, rules if rules is not None else self._next_rules(sealed))
        return sealed

    def _next_rules(self, sealed: int) -> Rules:
        try:
            return load_rules(self.store.root_fd)
        except BadRules as e:
            log.warning("%s: turn %d keeps the rules of turn %d", e, self.turn, sealed)
            return self.ignore.rules

    def has_changes(self) -> bool:
        return self.changes > 0

    def captures_in_flight(self) -> int:
        return len(self._in_flight)

    def flush_counts(self) -> None:
        """Persist the open turn's counters (for `cowfs log` of an unsealed turn after a crash).
        Nothing new, nothing written: an idle mount's WAL stays as it is, and the next fsync
        has no row to sync (durability.py)."""
        if self.changes or self.bytes:
            self.catalogue.add_counts(self.turn, self.changes, self.bytes)
            self.changes = self.bytes = 0

    # -- entries -----------------------------------------------------------------
    def before_entry_change(self, parent: int, parent_fd: int, name: bytes) -> None:
        """Record what (parent, name) holds now, before it is created, removed or replaced."""
        if parent in self.born or parent in self.passed or (parent, name) in self.entries_done:
            return
        spared = self.ignore.entry(parent, parent_fd, name)
        if spared == INSIDE:
            self.passed.add(parent)
        if spared != RECORD:
            return
        try:
            ino = os.stat(name, dir_fd=parent_fd, follow_symlinks=False).st_ino
            self.store.record_object(ino, dir_fd=parent_fd, name=name)
        except FileNotFoundError:
            ino = None
        self.store.record_object(parent, parent_fd)
        self.catalogue.record_entry(self.turn, parent, name, ino)
        self.entries_done.add((parent, name))
        self.changes += 1

    def note_born(self, ino: int) -> None:
        self.born.add(ino)

    def is_born(self, ino: int) -> bool:
        return ino in self.born

    def created(self, parent: int, parent_fd: int, name: bytes, st: os.stat_result) -> None:
        """Entry *name* of *parent* was just made, holding *st*'s object (born in this turn)."""
        if not self.ignore.rules.empty and parent not in self.passed:
            self.ignore.created(parent, parent_fd, name, st.st_ino, stat.S_ISDIR(st.st_mode))

    def moving(self, ino: int, is_dir: bool, new_parent: int, new_parent_fd: int, new_name: bytes) -> None:
        """Object *ino* is about to be renamed to entry *new_name* of *new_parent*."""
        if new_parent not in self.passed or ino in self.ignore.things:
            self.ignore.moved(ino, ino in self.born, new_parent, new_parent_fd, new_name, is_dir)

    def removal_spared(self, parent: int, parent_fd: int, name: bytes, st: os.stat_result) -> bool:
        """Whether removing entry *name* of *parent* (holding *st*'s object) must not keep the
        object in the store: it is ignored, and no row refers to it (see `removed`)."""
        if parent in self.passed:
            spared = True
        else:
            kind = self.ignore.entry(parent, parent_fd, name)
            if kind == INSIDE:
                self.passed.add(parent)
            spared = kind != RECORD
        return spared and self.catalogue.ref(st.st_ino) is None

    def removed(self, st: os.stat_result) -> None:
        """A spared removal of *st*'s object happened: if that was its last name, its inode
        number may be reused, and must not be taken for an ignored thing."""
        if stat.S_ISDIR(st.st_mode) or st.st_nlink == 1:
            self.ignore.removed(st.st_ino)

    # -- attributes ----------------------------------------------------------------
    def before_attr_change(self, ino: int, fd: int) -> None:
        """Record mode, owner, size, mtime and xattrs of the object open as *fd* (O_PATH)."""
        if self._record_attrs(ino, fd):
            self.changes += 1
        else:
            self.confirm(ino)

    def _record_attrs(self, ino: int, fd: int) -> bool:
        if ino in self.born or ino in self.attrs_done or ino in self.passed:
            return False
        st = os.stat(fd)
        if self.ignore.active and self.ignore.object_passes(ino, fd, st):
            self.passed.add(ino)
            return False
        xattrs = {} if stat.S_ISLNK(st.st_mode) else read_xattrs(libc.proc_path(fd))
        self.store.record_object(ino, fd)
        self.catalogue.record_attrs(ino, self.turn, st, xattrs, self._path_of(fd))
        self.attrs_done.add(ino)
        return True

    def confirm(self, ino: int) -> None:
        """*ino*, captured ahead of time when it was opened for writing, is being changed now."""
        if ino in self.unconfirmed:
            self.unconfirmed.discard(ino)
            self.changes += 1

    def _path_of(self, fd: int) -> bytes | None:
        """Where the object open as *fd* is now, relative to the root (the kernel tracks it)."""
        try:
            path = os.readlink(libc.proc_path(fd))
        except OSError:
            return None
        return path[len(self.root_prefix):] if path.startswith(self.root_prefix) else None

    # -- content ----------------------------------------------------------------------
    def content_captured(self, ino: int) -> bool:
        """True when an in-place change to *ino* needs no capture in the open turn (hot path)."""
        return ino in self.content_done or ino in self.born or ino in self.passed

    async def before_content_change(self, ino: int, fd: int, ahead: bool = False) -> None:
        """Keep *ino*'s current content in the store before it is changed in place.

        *ahead*: the object is only being opened for writing and may never be
        written; the capture counts as a change once `confirm` says it is.
        Loops because a capture may await a worker thread, and the turn may be
        sealed meanwhile: the change must find a capture of the turn it lands in.
        """
        while not self.content_captured(ino):
            event = self._in_flight.get(ino)
            if event is not None:
                await event.wait()
                continue
            event = self._in_flight[ino] = trio.Event()
            try:
                await self._capture_content(ino, fd, ahead, threaded=True)
            finally:
                del self._in_flight[ino]
                event.set()
        if not ahead:
            self.confirm(ino)

    def capture_content_now(self, ino: int, fd: int) -> None:
        """before_content_change without yielding to other requests (rollback holds the mount)."""
        if self.content_captured(ino):
            return
        coroutine = self._capture_content(ino, fd, ahead=False, threaded=False)
        try:
            coroutine.send(None)    # runs to the end: with threaded=False nothing awaits
        except StopIteration:
            return
        raise RuntimeError("an unthreaded capture yielded")

    async def _capture_content(self, ino: int, fd: int, ahead: bool, threaded: bool) -> None:
        turn = self.turn
        recorded_attrs = self._record_attrs(ino, fd)
        if ino in self.passed:
            return      # ignored: no pre-image
        src = os.open(libc.proc_path(fd), os.O_RDONLY | os.O_CLOEXEC)
        dst, name = self.store.new_content(turn, ino)
        done = False
        try:
            size = os.fstat(src).st_size
            if threaded and size > THREADED_CAPTURE_BYTES:
                await trio.to_thread.run_sync(self.duplicate, src, dst)
            else:
                self.duplicate(src, dst)
            # Sealed while we copied? Then the content did not change in that turn,
            # this copy is nobody's pre-image, and the caller retries for the new turn.
            done = turn == self.turn
        finally:
            os.close(src)
            os.close(dst)
            if not done:
                self.store.drop_content(name)
        if not done:
            return
        try:
            self._recorded_content(ino, name, size)
        except BaseException:
            self.store.drop_content(name)      # no row names it (a full disk, say)
            raise
        if ahead:
            self.unconfirmed.add(ino)
        elif recorded_attrs:
            self.changes += 1

    def _recorded_content(self, ino: int, name: str, size: int) -> None:
        self.catalogue.record_content(ino, self.turn, name)
        self.content_done.add(ino)
        self.bytes += size
        if len(self.unsynced) < UNSYNCED_MAX:
            self.unsynced.append(name)
        else:
            self.unsynced_overflow = True

    def take_unsynced(self) -> tuple[list[str], bool]:
        """The content files to make durable now (and whether some were not listed)."""
        names, overflow = self.unsynced, self.unsynced_overflow
        self.unsynced, self.unsynced_overflow = [], False
        return names, overflow

    def give_back_unsynced(self, names: list[str], overflow: bool) -> None:
        """A sync of what take_unsynced gave failed: the next one tries them again."""
        self.unsynced[:0] = names
        self.unsynced_overflow |= overflow

    def duplicate(self, src: int, dst: int) -> None:
        """Make *dst* hold *src*'s content: a clone where the filesystem can, else a copy."""
        if self.mode == "reflink":
            try:
                libc.clone(src, dst)
                return
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.EXDEV, errno.ENOTTY):
                    raise
        libc.copy(src, dst)

    # -- objects leaving the tree ----------------------------------------------------
    async def before_last_unlink(self, ino: int, fd: int, writers: int) -> bool:
        """Prepare object *ino* to lose its last name. True if it must be kept in the store.

        Moving the inode itself into the store is the whole capture when nothing
        can write it any more; a process still writing it would scribble on the
        pre-image, so its content is copied first.
        """
        if ino in self.born:
            return False
        if writers:
            await self.before_content_change(ino, fd)
        return True
