"""Changes made behind cowfs's back: what a mount must find before it serves history.

Owns the walk that finds paths changed (by ctime) since cowfs last had the
tree in hand, and the rule that tells which of those changes went through
the last session's daemon. A change through the daemon was recorded before it
reached the disk (record before mutate), so a path whose entry or object has
a row in a turn of that session is not drift. A path below a directory
created in a turn of that session needed no row in that turn (it was new),
and later turns recorded its changes: not drift either. Everything else is
drift: the snapshots of earlier turns would be wrong. It is either a change
made while nothing was mounted (after the clean unmount), or one made beside
the mount while it was up (a process that was inside the directory before it
was mounted writes to the directory underneath). Ignored things (ignore.py)
and everything below them are not drift: no snapshot shows them.
"""

import os
import stat
from dataclasses import dataclass, field

from .catalogue import Catalogue
from .store import STORE_NAME


@dataclass
class Drift:
    count: int = 0
    examples: list[str] = field(default_factory=list)
    explained: int = 0          # changed since, but recorded by the last session's daemon
    beside: int = 0             # of count: changed while mounted, not through the mount

    def add(self, path: str, limit: int) -> None:
        self.count += 1
        if len(self.examples) < limit:
            self.examples.append(path)

    def when(self) -> str:
        """When the paths changed, in words: while unmounted, beside the mount, or both."""
        beside = ("beside the mount while it was up (written to the directory underneath: by a "
                  "process that was inside it before it was mounted?)")
        if self.beside == self.count:
            return beside
        if not self.beside:
            return "while cowfs was not mounted"
        return f"while cowfs was not mounted or ({self.beside} of them) {beside}"


class SessionRecords:
    """What the catalogue recorded in the last session (turns >= *first*), which ended at
    *ended_ns* (a clean unmount) or never (None: the daemon died)."""

    def __init__(self, catalogue: Catalogue, first: int, open_turn: int, ended_ns: int | None):
        self.catalogue, self.first, self.open_turn = catalogue, first, open_turn
        self.ended_ns = ended_ns

    @property
    def crashed(self) -> bool:
        return self.ended_ns is None

    def covers(self, st: os.stat_result) -> bool:
        """*st* was changed while the session was up (a later change cannot be its daemon's)."""
        return self.ended_ns is None or st.st_ctime_ns <= self.ended_ns

    def explains(self, parent: int | None, name: bytes, st: os.stat_result) -> bool:
        """The change of entry (parent, name) holding *st* was recorded (parent None: the root):
        that entry, the object's attributes, or another name of the object (a rename or unlink
        of one of its hard links moves the ctime that all of its names show)."""
        return self.covers(st) and (
            parent is not None and self.catalogue.entry_recorded_since(parent, name, self.first)
            or self.catalogue.attrs_recorded_since(st.st_ino, self.first)
            or self.catalogue.object_named_since(st.st_ino, self.first))

    def created_in_session(self, parent: int, name: bytes, ino: int) -> bool:
        """Directory *ino* at entry (parent, name) was made there in a turn of the session (the
        entry held nothing, or something else it replaced, at the start of that turn): what
        lies below it needed no rows in that turn, and has them for every later one."""
        return self.catalogue.entry_made_since(parent, name, ino, self.first)


def since_last_session(catalogue: Catalogue) -> tuple[int | None, SessionRecords | None]:
    """From when changes are drift (the last session's mount), and what explains some of them:
    that session's records, up to its clean unmount (or all of them: its daemon died).
    (None, None) for a store never mounted."""
    unmounted = int(catalogue.get_meta("unmounted_at") or 0)
    mounted = int(catalogue.get_meta("mounted_at") or 0)
    if not mounted:
        return (unmounted or None), None
    first = int(catalogue.get_meta("mounted_turn") or 0)
    ended = unmounted if unmounted >= mounted else None
    return mounted, SessionRecords(catalogue, first, catalogue.current_turn(), ended)


def find_drift(root_fd: int, since_ns: int | None, records: SessionRecords | None = None,
               visit=None, limit: int = 5, ignored=()) -> Drift:
    """Paths under the backing root changed after *since_ns* (None: do not look) and not
    explained by *records*.

    *visit(dir_fd, name, st)* sees every entry on the way, the store's own `objects/`
    included (rollback leaves whole directories there): the mount takes its descriptors
    of recorded objects in the same walk. Nothing at or below an object in *ignored* is judged.
    """
    drift = Drift()
    root = os.fstat(root_fd)
    if since_ns is not None and root.st_ctime_ns > since_ns:
        _judge(drift, records, None, b"", root, ".", limit)
    # (descriptor, its inode, path prefix or None for the store's objects, below an ignored
    # thing, below a directory the session created)
    stack = [(os.open(".", os.O_RDONLY | os.O_DIRECTORY, dir_fd=root_fd), root.st_ino, "", False, False)]
    try:
        objects = os.open(STORE_NAME + b"/objects", os.O_RDONLY | os.O_DIRECTORY, dir_fd=root_fd)
        stack.append((objects, 0, None, False, False))
    except OSError:
        pass
    while stack:
        dir_fd, dir_ino, prefix, ignored_below, new_below = stack.pop()
        try:
            with os.scandir(dir_fd) as it:
                for entry in it:
                    if prefix == "" and entry.name == STORE_NAME.decode():
                        continue
                    name, st = os.fsencode(entry.name), entry.stat(follow_symlinks=False)
                    if visit is not None:
                        visit(dir_fd, name, st)
                    spared = ignored_below or st.st_ino in ignored
                    judged = prefix is not None and since_ns is not None and st.st_ctime_ns > since_ns
                    if judged and (spared or new_below and records.covers(st)):
                        drift.explained += 1
                    elif judged:
                        _judge(drift, records, dir_ino, name, st, prefix + entry.name, limit)
                    if stat.S_ISDIR(st.st_mode):
                        sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
                        # Made in the session: its ctime is later than the session's start.
                        created = judged and records is not None \
                            and records.created_in_session(dir_ino, name, st.st_ino)
                        stack.append((sub, st.st_ino, None if prefix is None else prefix + entry.name + "/",
                                      spared, new_below or created))
        finally:
            os.close(dir_fd)
    return drift


def _judge(drift: Drift, records: SessionRecords | None, parent: int | None, name: bytes,
           st: os.stat_result, path: str, limit: int) -> None:
    if records is not None and records.explains(parent, name, st):
        drift.explained += 1
        return
    drift.add(path, limit)
    if records is not None and records.covers(st):
        drift.beside += 1
