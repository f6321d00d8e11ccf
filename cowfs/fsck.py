"""fsck: whether a workspace's store agrees with itself and with the live tree, and mending it.

Owns the consistency checks of a store and the repairs that lose nothing. Each
`check_*` method is independent: it looks at one relation (the catalogue file
itself; turn records; rows against rows; content rows against `content/`;
`objects/` names against object rows; recorded objects against the tree and
the store; the tree against the last session: drift) and adds Findings, one
plain-words line each. With `repair`, a check mends what it found where that
loses nothing, and says what it did. Knows nothing about FUSE or the CLI.

`check_workspace` is `cowfs fsck` on an unmounted workspace (the caller
refuses a mounted one); `Fsck.quick` is what a mount runs after an unclean
stop, O(rows of the open turn), with the store the daemon already holds.
What each repair does is in docs/architecture.md ("fsck").
"""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import stat
import time
from dataclasses import dataclass, field

from .catalogue import FORMAT_VERSION, TABLES, UPGRADABLE_FORMATS, Catalogue, FormatError
from .drift import find_drift, since_last_session
from .store import CATALOGUE, CONTENT, OBJECTS, Store

_OBJECT_NAME = re.compile(rb"i(\d+)")


@dataclass
class Finding:
    check: str                    # the check that found it
    message: str                  # one line, plain words
    problem: bool = True          # False: a note (harmless, or lost and accepted before)
    repaired: str | None = None   # what --repair did about it

    def line(self) -> str:
        head = ("problem" if self.problem else "note") + f": {self.message}"
        return head + (f"; repaired: {self.repaired}" if self.repaired else "")


@dataclass
class Report:
    workspace: str
    repair: bool
    findings: list[Finding] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)   # what was looked at

    @property
    def problems(self) -> list[Finding]:
        return [f for f in self.findings if f.problem]

    @property
    def left(self) -> list[Finding]:
        """Problems still there: not repaired (or no repair was asked for)."""
        return [f for f in self.problems if f.repaired is None]

    @property
    def clean(self) -> bool:
        """The store is consistent now (after the repairs, if any)."""
        return not self.left

    def summary(self) -> str:
        looked = ", ".join(f"{n:,} {what}" for what, n in self.counts.items())
        if not self.problems:
            return f"clean: {self.workspace} ({looked})"
        repaired = len(self.problems) - len(self.left)
        tail = (f", {repaired} repaired, {len(self.left)} left" if self.repair
                else "; `cowfs fsck --repair` mends what can be mended without losing anything")
        return f"{len(self.problems)} problem(s) found in {self.workspace}{tail} ({looked})"


class CatalogueUnreadable(Exception):
    """The catalogue cannot be opened at all (fsck without --repair reports it)."""


def check_workspace(workspace: str, repair: bool = False) -> Report:
    """Check (and with *repair* mend) the store of the unmounted *workspace*.

    Raises FileNotFoundError (no store), store.StoreBusy (a daemon holds it),
    FormatError (written by a newer cowfs), NotADirectoryError."""
    root_fd = os.open(workspace, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        store = Store(root_fd, create=False)
        try:
            return Fsck(store, workspace, repair).run()
        finally:
            store.close()
    finally:
        os.close(root_fd)


class Fsck:
    def __init__(self, store: Store, workspace: str, repair: bool = False):
        self.store = store
        self.repair = repair
        self.report = Report(workspace, repair)
        self.lost: dict[tuple[str, str], str] = {}
        self.present: dict[int, int] = {}      # ino -> st_mode of every object in tree or store
        self.drift = None

    @property
    def catalogue(self) -> Catalogue | None:
        return self.store.catalogue

    def found(self, check: str, message: str, repair=None, problem: bool = True) -> Finding:
        """Record a finding; with --repair, *repair()* mends it and returns what it did."""
        finding = Finding(check, message, problem)
        if problem and self.repair and repair is not None:
            try:
                finding.repaired = repair()
            except (OSError, sqlite3.Error) as e:
                finding.message += f" (the repair failed: {e})"
        self.report.findings.append(finding)
        return finding

    # -- the two forms --------------------------------------------------------------
    def run(self, drift: bool = True) -> Report:
        """Every check, in an order where each repair serves the checks after it. *drift*
        False: the caller (a mount) judges drift itself."""
        if self.check_catalogue_file():
            self.lost = self.catalogue.lost()
            self.check_turns()
            self.check_rows()
            self.check_content()
            self.check_object_names()
            self.walk()
            self.check_objects()
            if drift:
                self.check_drift()
        self.check_marks()
        return self.report

    def quick(self, turn: int) -> Report:
        """After an unclean stop, before serving: what a dying daemon could have left wrong,
        O(rows of the open *turn*). The daemon's walk of the tree has held every recorded
        object it found (Store.find_recorded), so an object of the turn is present if held
        or kept."""
        self.lost = self.catalogue.lost()
        self.check_turns()
        self.check_content(turn)
        for ino in sorted(self.catalogue.objects_of_turn(turn)):
            if ino not in self.store.held and not self.store.kept(ino):
                self._object_gone(ino)
        return self.report

    # -- the catalogue file -------------------------------------------------------------
    def check_catalogue_file(self) -> bool:
        """The catalogue opens, SQLite finds it sound, it has a schema cowfs reads. False if
        the checks that read it cannot run."""
        path = self.store.catalogue_path()
        if self.catalogue is None and not os.path.exists(path):
            self._no_history()
            return False
        if self.catalogue is None:      # a mount's check uses the daemon's own
            self.store.catalogue = Catalogue.existing(path, readonly=not self.repair)
        try:
            damage = self.catalogue.integrity_problems()
        except sqlite3.Error as e:
            damage = [str(e)]
        if damage:
            shown = damage[0] + (f" (and {len(damage) - 1} more)" if len(damage) > 1 else "")
            finding = self.found("catalogue", f"the catalogue {CATALOGUE.decode()} is damaged: {shown}",
                                 self._recover_catalogue)
            if finding.repaired is None:
                self.report.findings.append(Finding("catalogue", "the checks of rows against files "
                                                    "were skipped: the catalogue cannot be trusted",
                                                    problem=False))
                return False
        if not self.catalogue.has_schema():
            self._no_history()
            return False
        version = self.catalogue.get_meta("format")
        if version not in (*UPGRADABLE_FORMATS, FORMAT_VERSION):
            raise FormatError(version)
        self.report.counts.update(turns=len(self.catalogue.turns()), rows=self.catalogue.row_count())
        return True

    def _no_history(self) -> None:
        """No catalogue (missing or empty): anything in content/ or objects/ belongs to no turn."""
        files = [(fd, sub, name) for fd, sub in ((self.store.content_fd, CONTENT),
                                                 (self.store.objects_fd, OBJECTS)) if fd >= 0
                 for name in os.listdir(fd)]
        self.report.counts.update(turns=0)
        if not files:
            return
        self.found("catalogue", f"the catalogue is missing or empty, but the store holds {len(files)} "
                   "pre-image(s) and kept object(s): the history that named them is lost",
                   lambda: self._move_all_aside(files))

    def _move_all_aside(self, files) -> str:
        for fd, sub, name in files:
            self.store.move_to_lost_found(fd, os.fsencode(name), sub)
        return (f"moved them into .cowfs/lost+found; the next mount starts a new history "
                f"(turn 0: the tree as it is)")

    def _recover_catalogue(self) -> str:
        """Copy every row SQLite can still read into a new catalogue; the damaged file goes
        into lost+found."""
        path = self.store.catalogue_path()
        self.catalogue.close()
        new_path, salvage = path + ".recovered", path + ".salvage"
        for leftover in (new_path, salvage):
            for suffix in ("", "-wal", "-shm"):
                if os.path.exists(leftover + suffix):
                    os.unlink(leftover + suffix)
        # A copy to read from: SQLite refuses a file shorter than its header says (a truncated
        # one) altogether, so the copy is padded back to that size with empty pages.
        for suffix in ("", "-wal"):
            if os.path.exists(path + suffix):
                shutil.copyfile(path + suffix, salvage + suffix)
        _pad_to_header(salvage)
        old = Catalogue.existing(salvage, readonly=True)
        new = Catalogue(new_path)
        copied, unreadable = 0, []
        try:
            tables = old.tables()
        except sqlite3.Error:
            tables = set(TABLES)
        for table in (t for t in TABLES if t in tables):
            rows, columns = [], []
            try:
                cursor = old.rows_of(table)
                columns = [d[0] for d in cursor.description]
                for row in cursor:
                    rows.append(row)
            except sqlite3.Error:
                unreadable.append(table)
            garbled = new.copy_rows(table, columns, rows)
            if garbled:
                unreadable.append(f"{table} ({garbled} garbled row(s) left out)")
            copied += len(rows) - garbled
        old.close()
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(salvage + suffix):
                os.unlink(salvage + suffix)
        if unreadable:
            _judge_drift_since_unmount(new)
        new.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        new.close()
        moved = []
        for suffix in (b"", b"-wal", b"-shm"):
            if os.path.exists(os.fsencode(path) + suffix):
                moved.append(self.store.move_to_lost_found(self.store.fd, CATALOGUE + suffix,
                                                           b"damaged").decode())
        os.rename(new_path, path)
        self.store.catalogue = Catalogue.existing(path, readonly=False)
        partly = f" (tables read only in part: {', '.join(unreadable)})" if unreadable else ""
        return (f"copied the {copied:,} readable rows into a new catalogue{partly}; the damaged "
                f"file is .cowfs/lost+found/{moved[0] if moved else '?'}")

    # -- turn records -----------------------------------------------------------------
    def check_turns(self) -> None:
        """At most one open turn, the last; sealed times after started times."""
        turns = self.catalogue.turns()
        if not turns:
            self.found("turns", "the catalogue has no turn records at all")
            return
        last = turns[-1].number
        for number in self.catalogue.open_turns():
            if number != last:
                at = self._next_started(turns, number)
                self.found("turns", f"turn-{number} is still open, but turn-{last} came after it "
                           "(only the last turn may be open)",
                           lambda n=number, at=at: self._seal(n, at))
        for t in turns:
            if t.sealed is not None and t.sealed < t.started:
                self.found("turns", f"turn-{t.number} was sealed before it started "
                           "(the clock went back?)", problem=False)

    @staticmethod
    def _next_started(turns, number: int) -> float:
        later = [t.started for t in turns if t.number > number]
        earlier = [t.started for t in turns if t.number == number]
        return min(later) if later else earlier[0]

    def _seal(self, number: int, at: float) -> str:
        self.catalogue.seal_left_open(number, at, "sealed by cowfs fsck: it was left open")
        return f"sealed turn-{number} as it was, dated when the next turn started; its snapshot is listed"

    # -- rows against rows ----------------------------------------------------------------
    def check_rows(self) -> None:
        """Every turn a row names has a turn record; every object a row names has an object row."""
        known = {t.number for t in self.catalogue.turns()}
        for number in sorted(self.catalogue.turns_with_rows() - known):
            self.found("rows", f"rows of turn-{number} exist but its turn record is gone "
                       "(a new turn could take its number and mix with them)",
                       lambda n=number: self._restore_turn(n))
        for ino in sorted(self.catalogue.unrecorded_objects()):
            self.found("rows", f"object {ino}{self._where(ino)} is named by rows but has no object "
                       "row (snapshots could not reach it)",
                       lambda i=ino: self._record_object(i))

    def _restore_turn(self, number: int) -> str:
        turns = self.catalogue.turns()
        before = [t.sealed or t.started for t in turns if t.number < number]
        self.catalogue.restore_turn(number, max(before) if before else time.time(),
                                    "restored by cowfs fsck: its record was lost")
        return f"gave turn-{number} a sealed record again"

    def _record_object(self, ino: int) -> str:
        self.catalogue.record_object(ino)
        return "added its object row (whether it can be reached is checked below)"

    # -- content pre-images ---------------------------------------------------------------
    def check_content(self, turn: int | None = None) -> None:
        """Each content row's file exists in content/ with the size the row recorded; every
        file there is named by a row (all turns only: an orphan is harmless, listing is O(store))."""
        fd = self.store.content_fd
        if fd < 0:
            self.found("content", "the store's content/ directory is missing",
                       lambda: self._make_subdir(CONTENT))
            fd = self.store.content_fd
        named = set()
        rows = self.catalogue.content_rows(turn)
        for ino, row_turn, name, size, path in rows:
            named.add(name)
            self._check_preimage(fd, ino, row_turn, name, size, path)
        self.report.counts["pre-images"] = len(rows)
        if turn is not None or fd < 0:
            return
        for name in sorted(set(os.listdir(fd)) - named):
            self.found("content", f"content/{name} is a store file that no row names (an orphan: "
                       "left by a capture a crash interrupted, or not cowfs's)",
                       lambda n=name: self._aside(fd, n, CONTENT))

    def _check_preimage(self, fd: int, ino: int, turn: int, name: str, size: int,
                        path: bytes | None) -> None:
        what = (f"the content of {_show(path) if path else f'object {ino}'} "
                f"at the start of turn-{turn} (content/{name})")
        if ("content", name) in self.lost:
            self.found("content", f"{what} was found lost by an earlier repair: snapshots before "
                       f"turn-{turn} answer EIO for it", problem=False)
            return
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False) if fd >= 0 else None
        except FileNotFoundError:
            st = None
        if st is None:
            self.found("content", f"{what} is missing",
                       lambda: self._accept_lost("content", name, f"{what} is missing"))
        elif not stat.S_ISREG(st.st_mode) or st.st_size != size:
            self.found("content", f"{what} has {st.st_size:,} bytes, the catalogue recorded {size:,}",
                       lambda: self._set_aside_damaged(fd, name, what))

    def _set_aside_damaged(self, fd: int, name: str, what: str) -> str:
        moved = self.store.move_to_lost_found(fd, os.fsencode(name), CONTENT).decode()
        self._accept_lost("content", name, f"{what} was damaged")
        return f"moved it to .cowfs/lost+found/{moved}; snapshots that need it answer EIO"

    def _accept_lost(self, kind: str, name: str, detail: str) -> str:
        self.catalogue.note_lost(kind, name, detail)
        return "recorded as lost: snapshots that need it answer EIO, a rollback that needs it refuses"

    def _aside(self, fd: int, name: str, sub: bytes) -> str:
        moved = self.store.move_to_lost_found(fd, os.fsencode(name), sub).decode()
        return f"moved to .cowfs/lost+found/{moved}"

    def _make_subdir(self, name: bytes) -> str:
        fd = self.store.subdir(name, create=True)
        if name == CONTENT:
            self.store.content_fd = fd
        else:
            self.store.objects_fd = fd
        return f"made an empty {name.decode()}/"

    # -- objects/ names ---------------------------------------------------------------------
    def check_object_names(self) -> None:
        """Every entry of objects/ is i<INO>, is inode INO, and INO has an object row."""
        fd = self.store.objects_fd
        if fd < 0:
            self.found("objects", "the store's objects/ directory is missing",
                       lambda: self._make_subdir(OBJECTS))
            return
        recorded = self.catalogue.recorded_objects()
        names = os.listdir(fd)
        self.report.counts["kept objects"] = len(names)
        for name in sorted(names):
            m = _OBJECT_NAME.fullmatch(os.fsencode(name))
            ino = os.stat(name, dir_fd=fd, follow_symlinks=False).st_ino
            if m is None:
                why = "is not a name cowfs gives"
            elif int(m.group(1)) != ino:
                why = f"is inode {ino}, not {int(m.group(1))}"
            elif ino not in recorded:
                why = "is an object no row names (an orphan)"
            else:
                continue
            self.found("objects", f"objects/{name} {why}", lambda n=name: self._aside(fd, n, OBJECTS))

    # -- recorded objects against the tree and the store ------------------------------------
    def walk(self) -> None:
        """One walk of the tree and the store's objects/: what is present, and what drifted."""
        root = os.fstat(self.store.root_fd)
        self.present[root.st_ino] = root.st_mode
        dev = self.store.dev

        def visit(dir_fd, name, st):
            if st.st_dev == dev:
                self.present[st.st_ino] = st.st_mode
        since, records = since_last_session(self.catalogue)
        self.drift = find_drift(self.store.root_fd, since, records, visit)
        self.report.counts["paths"] = len(self.present)

    def check_objects(self) -> None:
        """Every object a row names is in the tree or in the store (invariant 4), and of the
        type it was recorded with (another type: its inode number was reused)."""
        modes = self.catalogue.object_modes()
        for ino in sorted(self.catalogue.recorded_objects()):
            mode = self.present.get(ino)
            if mode is None:
                self._object_gone(ino)
            elif ino in modes and stat.S_IFMT(mode) != stat.S_IFMT(modes[ino]):
                self.found("objects", f"object {ino}{self._where(ino)} was recorded as a "
                           f"{_kind(modes[ino])} and is a {_kind(mode)} now: the object is gone "
                           "and its inode number was reused; snapshots that need it are wrong "
                           "(cannot be repaired)")

    def _object_gone(self, ino: int) -> None:
        what = f"object {ino}{self._where(ino)}"
        if ("object", str(ino)) in self.lost:
            self.found("objects", f"{what} was found lost by an earlier repair: snapshots that "
                       "need it answer EIO", problem=False)
            return
        self.found("objects", f"{what} is gone: neither in the tree nor in the store's objects/",
                   lambda: self._accept_lost("object", str(ino), f"{what} is gone"))

    def _where(self, ino: int) -> str:
        turns, name = self.catalogue.describe_object(ino)
        named = f"'{_show(name)}'" if name else "no name recorded"
        shown = ", ".join(f"turn-{t}" for t in turns[:3]) + (", ..." if len(turns) > 3 else "")
        return f" ({named}; rows in {shown})" if turns else f" ({named})"

    # -- the tree against the last session ----------------------------------------------------
    def check_drift(self) -> None:
        """Changes made behind cowfs's back (drift.py): not repaired here, since only
        the user can say the tree is right (`cowfs mount --force` accepts it)."""
        drift = self.drift
        if drift is None or not drift.count:
            return
        shown = ", ".join(repr(p) for p in drift.examples)
        self.found("drift", f"{drift.count} path(s) changed {drift.when()} (e.g. {shown}): "
                   "snapshots of earlier turns would show them wrongly; `cowfs mount --force` "
                   "accepts the tree as it is (not done by --repair)")

    # -- marks a daemon left --------------------------------------------------------------------
    def check_marks(self) -> None:
        """A daemon that hit an internal fault asked for this check; a clean one answers it."""
        marks = self.store.needs_check()
        for line in marks[-3:]:
            self.found("marks", f"the daemon asked for a check: {line}", problem=False)
        if marks and self.report.clean:
            self.store.clear_needs_check()
            self.found("marks", "the check the daemon asked for is done: the mark is removed",
                       problem=False)


def _judge_drift_since_unmount(catalogue: Catalogue) -> None:
    """Rows the damage lost can no longer explain the last session's changes (drift.py), and
    would turn them into drift "beside the mount": what they guarded is reported as damaged
    already. So after a clean unmount, drift is judged from that unmount on."""
    unmounted = int(catalogue.get_meta("unmounted_at") or 0)
    if unmounted and unmounted >= int(catalogue.get_meta("mounted_at") or 0):
        catalogue.set_meta("mounted_at", str(unmounted))


def _pad_to_header(path: str) -> None:
    """Extend a truncated SQLite file with zeroes to the size its header records."""
    with open(path, "r+b") as f:
        header = f.read(100)
        if len(header) < 100 or not header.startswith(b"SQLite format 3\0"):
            return
        page_size = int.from_bytes(header[16:18], "big")
        page_size = 65536 if page_size == 1 else page_size
        size = page_size * int.from_bytes(header[28:32], "big")
        if os.fstat(f.fileno()).st_size < size:
            f.truncate(size)


def _show(name: bytes) -> str:
    return os.fsdecode(name)


def _kind(mode: int) -> str:
    return {stat.S_IFDIR: "directory", stat.S_IFREG: "file", stat.S_IFLNK: "symlink",
            stat.S_IFIFO: "FIFO"}.get(stat.S_IFMT(mode), "special file")
