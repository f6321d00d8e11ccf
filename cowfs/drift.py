"""Changes made behind cowfs's back: what a mount must find before it serves history.

Owns the walk that finds paths changed (by ctime) since cowfs last had the
tree in hand, and the rule that tells, after a daemon that died, which of
those changes went through it. A change through the daemon was recorded
before it reached the disk (record before mutate), so a path whose entry or
object has a row in a turn of the dead daemon's session is not drift. A path
below a directory created in a turn of that session needed no row in that
turn (it was new), and later turns recorded its changes: not drift either.
Everything else is drift: the snapshots of earlier turns would be wrong.
Ignored things (ignore.py) and everything below them are not drift either:
no snapshot shows them.
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
    explained: int = 0          # changed since, but recorded by the daemon that died

    def add(self, path: str, limit: int) -> None:
        self.count += 1
        if len(self.examples) < limit:
            self.examples.append(path)


class CrashRecords:
    """What the catalogue recorded in the session of a daemon that died (turns >= *first*)."""

    def __init__(self, catalogue: Catalogue, first: int, open_turn: int):
        self.catalogue, self.first, self.open_turn = catalogue, first, open_turn

    def explains(self, parent: int | None, name: bytes, st: os.stat_result) -> bool:
        """The change of entry (parent, name) holding *st* was recorded (parent None: the root)."""
        return (parent is not None and self.catalogue.entry_recorded_since(parent, name, self.first)
                or self.catalogue.attrs_recorded_since(st.st_ino, self.first))

    def created_in_session(self, parent: int, name: bytes) -> bool:
        """Entry (parent, name) was created in a turn of the dead daemon's session: what lies
        below it needed no rows in that turn, and has them for every later one."""
        return self.catalogue.entry_created_since(parent, name, self.first)


def since_last_session(catalogue: Catalogue) -> tuple[int | None, CrashRecords | None]:
    """From when changes are drift, and what explains some of them: since the clean unmount,
    or (the last daemon died) since its mount, explained by its records. (None, None) for a
    store never mounted."""
    unmounted = int(catalogue.get_meta("unmounted_at") or 0)
    mounted = int(catalogue.get_meta("mounted_at") or 0)
    records = None
    if mounted > unmounted:
        first = int(catalogue.get_meta("mounted_turn") or 0)
        records = CrashRecords(catalogue, first, catalogue.current_turn())
    return (max(mounted, unmounted) or None), records


def find_drift(root_fd: int, since_ns: int | None, records: CrashRecords | None = None,
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
    # (descriptor, its inode, path prefix or None for the store's objects, below a new directory)
    stack = [(os.open(".", os.O_RDONLY | os.O_DIRECTORY, dir_fd=root_fd), root.st_ino, "", False)]
    try:
        objects = os.open(STORE_NAME + b"/objects", os.O_RDONLY | os.O_DIRECTORY, dir_fd=root_fd)
        stack.append((objects, 0, None, False))
    except OSError:
        pass
    while stack:
        dir_fd, dir_ino, prefix, new = stack.pop()
        try:
            with os.scandir(dir_fd) as it:
                for entry in it:
                    if prefix == "" and entry.name == STORE_NAME.decode():
                        continue
                    name, st = os.fsencode(entry.name), entry.stat(follow_symlinks=False)
                    if visit is not None:
                        visit(dir_fd, name, st)
                    spared = new or st.st_ino in ignored
                    judged = prefix is not None and since_ns is not None and st.st_ctime_ns > since_ns
                    if judged and spared:
                        drift.explained += 1
                    elif judged:
                        _judge(drift, records, dir_ino, name, st, prefix + entry.name, limit)
                    if stat.S_ISDIR(st.st_mode):
                        sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
                        below_new = spared or bool(records and prefix is not None
                                                   and records.created_in_session(dir_ino, name))
                        stack.append((sub, st.st_ino, None if prefix is None else prefix + entry.name + "/",
                                      below_new))
        finally:
            os.close(dir_fd)
    return drift


def _judge(drift: Drift, records: CrashRecords | None, parent: int | None, name: bytes,
           st: os.stat_result, path: str, limit: int) -> None:
    if records is not None and records.explains(parent, name, st):
        drift.explained += 1
    else:
        drift.add(path, limit)
