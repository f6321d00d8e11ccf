"""Durability of history: what a user's fsync makes durable before the file itself.

A pre-image is written before its change reaches the backing filesystem
(record before mutate), so a daemon crash never loses one. A power loss is
another matter: the store's content files and SQLite's WAL (synchronous=NORMAL)
sit in the page cache as long as the kernel likes, and the backing file may
reach the disk first. So `fsync`, `fdatasync` and `fsyncdir` through the
mount first make durable every pre-image recorded so far (the content files
not yet synced, the store directories naming them and the objects moved
into the store, and the catalogue's WAL), then sync the file or directory
itself. Nothing to do (the usual repeat fsync) costs three comparisons; the
syncs run in a worker thread (the request thread serves every request: an
fsync there would stall the whole mount).

Owns only the ordering; capture.py lists the content files written since the
last sync (`Capture.unsynced`). See docs/architecture.md, "Durability".
"""

import functools
import os
from concurrent.futures import ThreadPoolExecutor

import trio

from . import libc
from .capture import Capture
from .store import CATALOGUE, Store

WAL = CATALOGUE + b"-wal"
# Syncs run at once by one fsync (_sync) at most.
PARALLEL_SYNCS = 8


class HistorySync:
    def __init__(self, store: Store, capture: Capture):
        self.store = store
        self.capture = capture
        self.db = store.catalogue.db
        # The connection's row count (sqlite3 total_changes) when its WAL was last synced;
        # -1: not yet in this mount (then the store's own directory is synced too, once).
        self.synced_rows = -1
        self._lock = trio.Lock()    # one sync at a time: a second waits and finds it done
        self._pool: ThreadPoolExecutor | None = None

    def pending(self) -> bool:
        """Whether something was recorded since the last sync (three comparisons: every fsync)."""
        return bool(self.capture.unsynced) or self.capture.unsynced_overflow \
            or self.db.total_changes != self.synced_rows

    async def before_sync(self) -> None:
        """Make every pre-image and catalogue row recorded so far durable. Called by the
        fsync handlers before they sync what the user asked for."""
        if not self.pending():
            return
        async with self._lock:
            if not self.pending():
                return      # synced by the fsync that held the lock
            rows = self.db.total_changes
            names, overflow = self.capture.take_unsynced()
            first = self.synced_rows == -1
            try:
                await trio.to_thread.run_sync(self._sync, names, overflow,
                                              rows != self.synced_rows, first)
            except BaseException:
                self.capture.give_back_unsynced(names, overflow)
                raise
            # A transaction still open commits its rows after this sync: none counts as synced.
            self.synced_rows = -2 if self.db.in_transaction else rows

    def _sync(self, names: list[str], overflow: bool, rows: bool, first: bool) -> None:
        """In a worker thread: the content files, the directories naming them and the objects
        moved into the store, the rows (the WAL), all at once: a journal commits concurrent syncs
        together (on ext4, one commit instead of one per sync). All have returned when this does."""
        store = self.store
        jobs = [functools.partial(_sync_entry, store.content_fd, os.fsencode(n)) for n in names]
        if names:
            jobs.append(functools.partial(os.fsync, store.content_fd))
        if rows:
            jobs += [functools.partial(os.fsync, store.objects_fd),
                     functools.partial(_sync_entry, store.fd, WAL)]
        if first:
            jobs += [functools.partial(_sync_entry, store.fd, CATALOGUE),
                     functools.partial(os.fsync, store.fd)]    # the WAL's, objects/, content/
        if overflow:
            jobs.append(functools.partial(libc.syncfs, store.fd))  # too many to list: all of it
        if len(jobs) == 1:
            jobs[0]()
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(PARALLEL_SYNCS, thread_name_prefix="cowfs-sync")
        for _ in self._pool.map(lambda job: job(), jobs):
            pass


def _sync_entry(dir_fd: int, name: bytes) -> None:
    """fdatasync entry *name* of *dir_fd*, if it is there."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return      # a content file dropped since (a prune); no WAL: SQLite synced every row
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)
