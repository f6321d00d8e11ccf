"""Retention: `cowfs prune` and the mount's limits (`--keep`, `--older-than`, `--max-store`).

Owns which turns go (the oldest ones, never the newest sealed one nor the
open one), and the removal of everything only they needed: their catalogue
rows, pre-image content files, and the kept objects (`objects/i<INO>`) that
no remaining row names.

Why it is safe. The snapshot of turn k reads only rows of turns > k (the
earliest row after k wins, see catalogue.py). So once the turns before K are
gone, the rows of turns <= K are read by nobody: not by the snapshots of K
and later, not by a rollback to them (it reads the rows after its target),
not by the git export (the first kept turn is exported whole). An object is
needed while a row names it; one that no row names any more is either in
the live tree (only its descriptor and its `objects` row are dropped) or in
the store, and then it goes.

How. The turns go first, in one commit: from then on they are refused
(`PrunedTurn`) and gone from `.snapshots` and `cowfs log`. The rows follow
in batches on the daemon's trio thread, each a few milliseconds, so FUSE
requests go on between them; a batch decides about the objects its rows
named in the same step (the capture path, on the same thread, can never
record one of them halfway). What a batch frees is renamed into
`.cowfs/pruned/` (O(1) each) before the batch commits, and a worker thread
deletes it afterwards (a big file, a whole directory: O(what it frees)).
After a crash, whatever is still in `pruned/` is put back if a row still
needs it, else deleted (`empty_trash`, at the next mount and prune).
Anything below a directory being deleted that a row still needs (a hard
link, a directory recorded on its own) is moved to its own store name.
"""

import logging
import os
import re
import stat
import time
from dataclasses import asdict, dataclass, field

import trio

from . import libc
from .catalogue import Catalogue, Turn
from .errors import BadInput, PrunedTurn, UnknownTurn
from .store import Store

log = logging.getLogger(__name__)

TRASH = b"pruned"
NEVER = 1 << 62       # an item no prune frees (no row names it: not ours to judge)

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B?)", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


# -- limits ------------------------------------------------------------------------------------
def parse_duration(text: str) -> float:
    """Seconds in `30m`, `12h`, `7d`, `2w` (also `90s`, `1.5h`). Raises BadInput."""
    match = _DURATION.fullmatch(str(text).strip().lower())
    if not match or float(match[1]) <= 0:
        raise BadInput(f"not a duration: {text!r} (expected e.g. 30m, 12h, 7d or 2w)")
    return float(match[1]) * _DURATION_UNITS[match[2]]


def parse_size(text: str) -> int:
    """Bytes in `500M`, `2G`, `1.5GiB`, `4096` (powers of 1024). Raises BadInput."""
    match = _SIZE.fullmatch(str(text).strip())
    if not match or (match[3] and not match[2] and match[3].lower() != "b"):
        raise BadInput(f"not a size: {text!r} (expected e.g. 500M or 2G)")
    return int(float(match[1]) * _SIZE_UNITS[match[2].upper()])


@dataclass(frozen=True)
class Limits:
    """How much history to keep; None: no limit of that kind. Several limits: the strictest wins."""
    keep: int | None = None            # the newest N sealed turns
    older_than: float | None = None    # seconds: turns sealed longer ago go
    max_store: int | None = None       # bytes of pre-images and kept objects

    def __post_init__(self):
        if self.keep is not None and (isinstance(self.keep, bool) or not isinstance(self.keep, int)
                                      or self.keep < 1):
            raise BadInput(f"--keep {self.keep}: expected a whole number of turns, at least 1 "
                           "(the newest sealed turn is always kept)")
        for name in ("older_than", "max_store"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or value <= 0):
                raise BadInput(f"--{name.replace('_', '-')} {value!r}: expected a positive number")

    def __bool__(self) -> bool:
        return any(v is not None for v in (self.keep, self.older_than, self.max_store))

    @classmethod
    def parse(cls, keep=None, older_than=None, max_store=None) -> "Limits":
        """From what a user typed (strings) or a caller passed (numbers)."""
        if isinstance(keep, str):
            if not keep.strip().isdigit():
                raise BadInput(f"--keep {keep}: expected a whole number of turns")
            keep = int(keep)
        if isinstance(older_than, str):
            older_than = parse_duration(older_than)
        if isinstance(max_store, str):
            max_store = parse_size(max_store)
        return cls(keep, older_than, max_store)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class PruneResult:
    removed: list[int]          # the turns pruned (would be, for a dry run)
    oldest: int                 # the oldest turn kept afterwards
    freed_bytes: int            # measured from the filesystem's free space; a dry run's estimate
    dry_run: bool = False
    store_bytes: int | None = None   # pre-images and kept objects, when measured
    rows: int = 0               # catalogue rows removed
    objects: int = 0            # recorded objects no row needed any more
    note: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def require_sealed(catalogue: Catalogue, turn) -> int:
    """*turn* if it is a sealed turn still kept; else PrunedTurn (naming the oldest kept) or
    UnknownTurn."""
    if isinstance(turn, int) and not isinstance(turn, bool) and catalogue.is_sealed(turn):
        return turn
    oldest = catalogue.oldest_turn()
    if isinstance(turn, int) and not isinstance(turn, bool) and 0 <= turn < oldest:
        raise PrunedTurn(pruned_message(turn, oldest))
    raise UnknownTurn(f"turn {turn} does not exist (see `cowfs log`)")


def pruned_message(turn: int, oldest: int) -> str:
    return f"turn {turn} was pruned; the oldest turn kept is turn-{oldest}"


# -- what the store holds, and what a prune would free -----------------------------------------
@dataclass
class Usage:
    """The store's pre-images and kept objects: (the oldest kept turn from which on each one is
    freed, its allocated bytes). Shared extents are counted in full, as `cowfs status` does."""
    items: list[tuple[int, int]] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(size for _, size in self.items)

    def freed_by(self, oldest: int) -> int:
        return sum(size for at, size in self.items if at <= oldest)


def measure(store: Store, catalogue: Catalogue | None = None) -> Usage:
    """Scan the store (O(its files)): in a worker thread, with a connection of its own. Without
    a catalogue, the total alone (what `cowfs status` shows): every object counts as never freed."""
    usage = Usage()
    for name, st in _scan(store.content_fd):
        turn, _, ino = name.partition(b"-")
        at = int(turn) if turn.isdigit() and ino.isdigit() else NEVER
        usage.items.append((at, st.st_blocks * 512))
    for name, st in _scan(store.objects_fd):
        last = (catalogue.last_turn_naming(st.st_ino)
                if catalogue is not None and name == store.object_name(st.st_ino) else None)
        size = st.st_blocks * 512
        if stat.S_ISDIR(st.st_mode):
            size += _tree_blocks(store.objects_fd, name) * 512
        usage.items.append((NEVER if last is None else last, size))
    return usage


def _scan(dir_fd: int):
    with os.scandir(libc.proc_path(dir_fd)) as entries:
        for entry in entries:
            try:
                yield entry.name, entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue


def _tree_blocks(dir_fd: int, name: bytes) -> int:
    """Blocks below directory *name* of *dir_fd* (each inode once)."""
    seen, total = set(), 0
    for _, dirs, files, fd in os.fwalk(name, dir_fd=dir_fd, follow_symlinks=False):
        for child in dirs + files:
            try:
                st = os.stat(child, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if st.st_ino not in seen:
                seen.add(st.st_ino)
                total += st.st_blocks
    return total


def boundary(turns: list[Turn], limits: Limits, now: float, usage: Usage | None) -> int:
    """The oldest turn to keep under *limits*: never past the newest sealed turn."""
    sealed = [t for t in turns if t.sealed is not None]
    oldest, newest = turns[0].number, sealed[-1].number
    keep = oldest
    if limits.keep is not None and len(sealed) > limits.keep:
        keep = max(keep, sealed[-limits.keep].number)
    if limits.older_than is not None:
        young = [t.number for t in sealed if t.sealed >= now - limits.older_than]
        keep = max(keep, young[0] if young else newest)
    if limits.max_store is not None and usage is not None and usage.total > limits.max_store:
        keep = max(keep, _first_fitting([t.number for t in sealed], usage, limits.max_store))
    return min(keep, newest)


def _first_fitting(candidates: list[int], usage: Usage, max_store: int) -> int:
    """The smallest candidate turn such that keeping it and what follows fits in *max_store*."""
    items = sorted(usage.items)
    left, i = usage.total, 0
    for turn in candidates:
        while i < len(items) and items[i][0] <= turn:
            left -= items[i][1]
            i += 1
        if left <= max_store:
            return turn
    return candidates[-1]


# -- the trash: what a batch frees, until a worker deletes it ----------------------------------
def open_trash(store: Store) -> int:
    try:
        os.mkdir(TRASH, 0o700, dir_fd=store.fd)
    except FileExistsError:
        pass
    return os.open(TRASH, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=store.fd)


def _to_trash(src_fd: int, name: bytes, trash_fd: int, trash_name: bytes) -> None:
    try:
        libc.renameat2(src_fd, name, trash_fd, trash_name, libc.RENAME_NOREPLACE)
    except FileNotFoundError:
        pass
    except FileExistsError:
        log.warning("prune: %r is already in the store's trash; %r left where it is", trash_name, name)


def empty_trash(store: Store, catalogue: Catalogue, trash_fd: int) -> None:
    """Delete what `pruned/` holds, putting back first whatever a row still needs (after a crash
    in the middle of a batch, its rows are all still there). O(what it deletes)."""
    pace = _Pace()
    for name in os.listdir(libc.proc_path(trash_fd)):
        pace()
        try:
            if name.startswith(b"c"):
                _content_from_trash(store, catalogue, trash_fd, name)
            else:
                _remove_tree(store, catalogue, trash_fd, name)
        except OSError as e:
            log.warning("prune: cannot remove %r from the store's trash: %s", name, e)


class _Pace:
    """Pauses a worker now and then: deleting at full speed starves the mount's own requests
    (they wait for the CPU and for the filesystem's log behind thousands of unlinks)."""
    WORK, REST = 0.02, 0.01

    def __init__(self):
        self.since = time.monotonic()

    def __call__(self) -> None:
        if time.monotonic() - self.since > self.WORK:
            time.sleep(self.REST)
            self.since = time.monotonic()


def _content_from_trash(store: Store, catalogue: Catalogue, trash_fd: int, name: bytes) -> None:
    content = name[1:]
    turn, _, ino = content.partition(b"-")
    if turn.isdigit() and ino.isdigit() and catalogue.content_recorded(int(ino), int(turn),
                                                                       content.decode()):
        libc.renameat2(trash_fd, name, store.content_fd, content, libc.RENAME_NOREPLACE)
    else:
        os.unlink(name, dir_fd=trash_fd)


def _remove_tree(store: Store, catalogue: Catalogue, dir_fd: int, name: bytes) -> None:
    """Remove entry *name* of *dir_fd* and everything below it, except what a row still names:
    that keeps its own store name (`objects/i<INO>`), where the store finds it."""
    todo: list[tuple[int, bytes, int | None]] = [(dir_fd, name, None)]
    while todo:
        parent, child, opened = todo.pop()
        if opened is not None:      # its children are done
            os.close(opened)
            try:
                os.rmdir(child, dir_fd=parent)
            except OSError as e:
                log.warning("prune: cannot remove directory %r from the store: %s", child, e)
            continue
        st = os.stat(child, dir_fd=parent, follow_symlinks=False)
        if catalogue.ref(st.st_ino) is not None:
            _rescue(store, parent, child, st)
        elif not stat.S_ISDIR(st.st_mode):
            os.unlink(child, dir_fd=parent)
        else:
            fd = os.open(child, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                         dir_fd=parent)
            todo.append((parent, child, fd))
            todo.extend((fd, grandchild, None) for grandchild in os.listdir(libc.proc_path(fd)))


def _rescue(store: Store, dir_fd: int, name: bytes, st: os.stat_result) -> None:
    """Object *st* (entry *name* of *dir_fd*) is still recorded: give it its own store name."""
    target = store.object_name(st.st_ino)
    try:
        libc.renameat2(dir_fd, name, store.objects_fd, target, libc.RENAME_NOREPLACE)
        return
    except FileExistsError:
        pass
    if not stat.S_ISDIR(st.st_mode) and store.kept(st.st_ino):
        os.unlink(name, dir_fd=dir_fd)      # another name of the object kept there already
    else:
        log.warning("prune: recorded object %d could not be given its store name; left in the trash",
                    st.st_ino)


def recover(store: Store) -> None:
    """At mount, before serving: finish what a prune that died left in the trash."""
    try:
        fd = os.open(TRASH, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                     dir_fd=store.fd)
    except FileNotFoundError:
        return
    try:
        empty_trash(store, store.catalogue, fd)
    finally:
        os.close(fd)


# -- the prune inside the daemon ---------------------------------------------------------------
class Pruner:
    """Prunes inside the daemon: one prune or export at a time (they share *lock* and the worker
    connection *worker_catalogue*), the rows on the trio thread in short batches, the deleting in
    a worker thread; and the mount's limits applied after each seal, off the checkpoint's path."""

    # A batch of rows takes about BATCH_SECONDS; then the prune rests as long (half the trio
    # thread at most): a FUSE request needs one scheduler round, and creating one file is
    # several requests in a row, each of which would otherwise wait for a whole batch.
    BATCH_SECONDS = 0.005
    MIN_BATCH, MAX_BATCH = 16, 1 << 14

    def __init__(self, store: Store, capture, view, root_ino: int, lock: trio.Lock,
                 worker_catalogue: Catalogue, forget_turns, limits: Limits):
        self.store = store
        self.catalogue = store.catalogue
        self.capture = capture
        self.view = view                        # the daemon's SnapshotView (its descriptor cache)
        view.oldest_turn = self.catalogue.oldest_turn()
        self.root_ino = root_ino
        self.lock = lock
        self.worker_catalogue = worker_catalogue
        self.forget_turns = forget_turns        # async (turns): the kernel forgets turn-N entries
        self.limits = limits
        self.last: dict | None = None           # the last background prune, for `cowfs status`
        self._wanted = trio.Event()
        self._batch = 256

    async def prune(self, limits: Limits, dry_run: bool = False, measured: bool = True) -> PruneResult:
        """*measured*: find the bytes freed from the filesystem's free space (two syncfs calls;
        the background prune after each checkpoint leaves it: freed_bytes is then 0)."""
        async with self.lock:
            if dry_run:
                return await self._dry_run(limits)
            return await self._prune(limits, measured)

    async def _dry_run(self, limits: Limits) -> PruneResult:
        usage = await trio.to_thread.run_sync(measure, self.store, self.worker_catalogue)
        turns = self.catalogue.turns()
        oldest = boundary(turns, limits, time.time(), usage)
        removed = [t.number for t in turns if t.number < oldest]
        return PruneResult(removed, oldest, usage.freed_by(oldest), dry_run=True,
                           store_bytes=usage.total)

    async def _prune(self, limits: Limits, measured: bool) -> PruneResult:
        usage = None
        if limits.max_store is not None:
            usage = await trio.to_thread.run_sync(measure, self.store, self.worker_catalogue)
        trash = open_trash(self.store)
        try:
            # What a prune that died left first, then what this one frees.
            freed = await self._delete_in_thread(trash, measured)
            turns = self.catalogue.turns()
            oldest = boundary(turns, limits, time.time(), usage)
            removed = self._drop_turns(oldest)
            if removed:
                await self.forget_turns(removed)
            rows, objects = await self._collect(oldest, trash)
            freed += await self._delete_in_thread(trash, measured)
        finally:
            os.close(trash)
        result = PruneResult(removed, oldest, freed, rows=rows, objects=objects,
                             store_bytes=None if usage is None else usage.total - usage.freed_by(oldest))
        if usage is not None and result.store_bytes > limits.max_store:
            result.note = ("the newest sealed turn and the open turn are never pruned: the store "
                           "still holds more than --max-store")
        if removed or rows:
            log.info("pruned %d turn(s) before turn-%d: %d row(s), %d object(s), %d bytes freed",
                     len(removed), oldest, rows, objects, freed)
        return result

    def _free_bytes(self) -> int:
        libc.syncfs(self.store.fd)      # XFS frees unlinked inodes in the background until then
        st = os.fstatvfs(self.store.fd)
        return st.f_bfree * st.f_frsize

    def _drop_turns(self, oldest: int) -> list[int]:
        """The commit point: the turns before *oldest* are gone (refused, unlisted) from here on."""
        with self.catalogue.transaction():
            removed = self.catalogue.drop_turns_before(oldest)
            if removed:
                # A recovery after a crash explains changes by rows of turns since `mounted_turn`:
                # the rows pruned now explained changes that went through this daemon before now.
                self.catalogue.set_meta("mounted_at", str(time.time_ns()))
                self.catalogue.set_meta("mounted_turn", str(self.capture.turn))
        self.view.oldest_turn = max(self.view.oldest_turn, oldest)
        return removed

    async def _collect(self, oldest: int, trash: int) -> tuple[int, int]:
        """Remove the rows of turns <= *oldest*, in batches of about BATCH_SECONDS, each followed by
        as long a rest."""
        rows = objects = 0
        while True:
            start = time.monotonic()
            done, gone = self._collect_batch(oldest, trash, self._batch)
            if not done:
                return rows, objects
            rows, objects = rows + done, objects + gone
            elapsed = time.monotonic() - start
            if elapsed < self.BATCH_SECONDS / 2:
                self._batch = min(self._batch * 2, self.MAX_BATCH)
            elif elapsed > self.BATCH_SECONDS:
                self._batch = max(self._batch // 2, self.MIN_BATCH)
            await trio.sleep(elapsed)   # FUSE requests and control requests go on here

    def _collect_batch(self, oldest: int, trash: int, limit: int) -> tuple[int, int]:
        """One batch, with no await: the rows, then the objects no remaining row names. Whatever
        they free goes to the trash before the commit (a crash puts it back: `empty_trash`)."""
        catalogue, store = self.catalogue, self.store
        entries, attrs = catalogue.garbage_rows(oldest, limit)
        if not entries and not attrs:
            with catalogue.transaction():
                return catalogue.drop_writers(oldest, limit), 0     # who made those changes
        named = {e[0] for e in entries} | {e[3] for e in entries if e[3] is not None} | \
                {a[0] for a in attrs}
        named.discard(self.root_ino)
        with catalogue.transaction():
            catalogue.delete_rows(entries, attrs)
            gone = [ino for ino in named if not catalogue.names_object(ino)]
            for ino in gone:
                catalogue.unrecord_object(ino)
            for _, _, content in attrs:
                if content is not None:
                    _to_trash(store.content_fd, content.encode(), trash, b"c" + content.encode())
            for ino in gone:
                if store.kept(ino):
                    _to_trash(store.objects_fd, store.object_name(ino), trash, store.object_name(ino))
        for ino in gone:
            store.release(ino)
            self.view.evict(ino)
        return len(entries) + len(attrs), len(gone)

    async def _delete_in_thread(self, trash: int, measured: bool) -> int:
        if not os.listdir(libc.proc_path(trash)):
            return 0        # (a small directory: no thread needed to see that)
        return await trio.to_thread.run_sync(self._delete, trash, measured)

    def _delete(self, trash: int, measured: bool) -> int:
        """Empty the trash (in a worker thread); the bytes that freed, by the filesystem's free
        space (so an extent shared by reflinks counts once), measured just around it: anything
        else writing to the filesystem meanwhile makes the figure smaller."""
        if not measured:
            empty_trash(self.store, self.worker_catalogue, trash)
            return 0
        before = self._free_bytes()
        empty_trash(self.store, self.worker_catalogue, trash)
        return max(0, self._free_bytes() - before)

    # -- the mount's limits --------------------------------------------------------------------
    def sealed(self) -> None:
        """A turn was sealed: wake the background prune (never waits; several seals make one)."""
        self._wanted.set()

    async def keep_limits(self) -> None:
        """The mount's limits, applied at mount and after each seal, in the background."""
        self._wanted.set()
        while True:
            await self._wanted.wait()
            self._wanted = trio.Event()
            try:
                result = await self.prune(self.limits, measured=False)
            except Exception as e:
                # A bug here must not take the mount down with it.
                log.exception("prune after checkpoint failed")
                self.last = {"error": f"{type(e).__name__}: {e}"}
                continue
            if result.removed or self.last is None:
                self.last = {"removed": len(result.removed), "oldest": result.oldest,
                             "at": time.time()}
