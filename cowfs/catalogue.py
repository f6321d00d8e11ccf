"""The catalogue: an SQLite database (WAL) of turns and the pre-images their layers hold.

Owns the schema and every query. It knows nothing about FUSE or the files
themselves: objects are backing inode numbers, entries are (directory inode,
name) pairs, pre-image content is the name of a file in the store.

A layer is the set of rows with one turn number. A row of turn t holds the
state of a thing at the *start* of turn t; the snapshot of turn k resolves
each thing with the earliest row whose turn is greater than k, or, if there
is none, with the live object.
"""

import sqlite3
import time
import urllib.parse
from contextlib import contextmanager
from dataclasses import dataclass

FORMAT_VERSION = "4"
# Format 1 reached objects by file handle (its rows are read by inode number now); format 2
# had no link counts in attribute pre-images (ignore rules and writers came as new tables,
# which a format 2 cowfs would not honour: a store using them must not be read by it);
# format 3 had no process start times and no record of the agent (harness sessions, ledger).
UPGRADABLE_FORMATS = ("1", "2", "3")

# Who made each turn's changes (attribution.py): kept when the turn is sealed. Stores made
# before attribution get the tables when they are opened; older cowfs ignore them.
_WRITERS_SCHEMA = """
CREATE TABLE IF NOT EXISTS processes (
    turn INTEGER NOT NULL, pid INTEGER NOT NULL, ppid INTEGER NOT NULL, uid INTEGER NOT NULL,
    comm TEXT NOT NULL, cmdline TEXT NOT NULL, ancestors TEXT NOT NULL DEFAULT '',
    started INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (turn, pid)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS entry_writers (
    turn INTEGER NOT NULL, parent INTEGER NOT NULL, name BLOB NOT NULL, pid INTEGER NOT NULL,
    PRIMARY KEY (turn, parent, name)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS object_writers (
    turn INTEGER NOT NULL, ino INTEGER NOT NULL, pid INTEGER NOT NULL,
    PRIMARY KEY (turn, ino)) WITHOUT ROWID;
"""

# Which commit each exported turn became, per target repository and branch.
# Stores made before the git export get the table at their first export
# (Catalogue.ensure_git_exports), so the format version stays 1.
_GIT_EXPORTS_SCHEMA = """
CREATE TABLE IF NOT EXISTS git_exports (
    repo BLOB NOT NULL, branch BLOB NOT NULL, turn INTEGER NOT NULL, sha TEXT NOT NULL,
    PRIMARY KEY (repo, branch, turn)) WITHOUT ROWID;
"""

# Ignore rules (ignore.py): the text of `.cowfsignore` from each turn where it changed, and the
# ignored things with the turn since which no snapshot shows them. Stores made before ignore
# rules get the tables when they are opened.
_IGNORE_SCHEMA = """
CREATE TABLE IF NOT EXISTS ignore_rules (turn INTEGER PRIMARY KEY, rules TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS ignored (ino INTEGER PRIMARY KEY, since INTEGER NOT NULL);
"""

# Who the agent is (agent.py): every harness session that used the workspace (its process
# identity: pid and start time in clock ticks) and the ledger of the files its write tools
# recorded (path relative to the root, content digest, the process that had written it last).
_AGENT_SCHEMA = """
CREATE TABLE IF NOT EXISTS harness_sessions (
    pid INTEGER NOT NULL, started INTEGER NOT NULL, seen REAL NOT NULL,
    PRIMARY KEY (pid, started)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS agent_writes (
    path TEXT PRIMARY KEY, sha256 TEXT, pid INTEGER, started INTEGER, recorded REAL NOT NULL);
"""

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE turns (
    turn INTEGER PRIMARY KEY,
    started REAL NOT NULL,
    sealed REAL,                 -- NULL while the turn is open
    message TEXT NOT NULL DEFAULT '',
    kind TEXT NOT NULL DEFAULT 'turn',   -- 'initial', 'turn', 'rollback'
    target INTEGER,              -- for a rollback: the turn it went back to
    changes INTEGER NOT NULL DEFAULT 0,  -- things first changed in this turn
    bytes INTEGER NOT NULL DEFAULT 0     -- bytes of content captured
);
-- How to reach an object that a layer refers to, wherever it lives now.
CREATE TABLE objects (ino INTEGER PRIMARY KEY, handle BLOB NOT NULL);
-- Entry pre-images: at the start of `turn`, (parent, name) held `ino` (NULL: nothing).
CREATE TABLE entries (
    parent INTEGER NOT NULL, name BLOB NOT NULL, turn INTEGER NOT NULL, ino INTEGER,
    PRIMARY KEY (parent, name, turn)) WITHOUT ROWID;
CREATE INDEX entries_by_turn ON entries (turn);
CREATE INDEX entries_by_ino ON entries (ino, turn);
-- Object pre-images: attributes at the start of `turn`; `content` names the
-- store file holding the content then, NULL if the content did not change yet;
-- `path` is where the object was (relative to the root) when first changed
-- in the turn, NULL if unknown: a hint for the git export.
CREATE TABLE attrs (
    ino INTEGER NOT NULL, turn INTEGER NOT NULL,
    mode INTEGER NOT NULL, uid INTEGER NOT NULL, gid INTEGER NOT NULL,
    size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, content TEXT, path BLOB,
    nlink INTEGER,               -- NULL in rows a format 2 cowfs wrote
    PRIMARY KEY (ino, turn)) WITHOUT ROWID;
CREATE INDEX attrs_by_turn ON attrs (turn);
CREATE TABLE xattrs (
    ino INTEGER NOT NULL, turn INTEGER NOT NULL, name BLOB NOT NULL, value BLOB NOT NULL,
    PRIMARY KEY (ino, turn, name)) WITHOUT ROWID;
""" + _GIT_EXPORTS_SCHEMA + _WRITERS_SCHEMA + _IGNORE_SCHEMA + _AGENT_SCHEMA

# What `cowfs fsck --repair` found lost and accepted (a pre-image file or a recorded object
# gone): snapshots that need it answer EIO, and the next check reports it as known.
# Created at the first such repair; older cowfs ignore it (they gave ENOENT or EIO there too).
_LOST_SCHEMA = """
CREATE TABLE IF NOT EXISTS lost (
    kind TEXT NOT NULL, name TEXT NOT NULL, noted REAL NOT NULL, detail TEXT NOT NULL,
    PRIMARY KEY (kind, name)) WITHOUT ROWID;
"""

# The tables whose rows a damaged catalogue's recovery copies (all but the schema's own).
TABLES = ("meta", "turns", "objects", "entries", "attrs", "xattrs", "git_exports", "lost",
          "processes", "entry_writers", "object_writers", "ignore_rules", "ignored",
          "harness_sessions", "agent_writes")


@dataclass(frozen=True)
class Turn:
    number: int
    started: float
    sealed: float | None
    message: str
    kind: str
    target: int | None
    changes: int
    bytes: int


@dataclass(frozen=True)
class AttrRecord:
    """An object's attributes (and maybe content) at the start of a turn."""
    turn: int
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    content: str | None
    nlink: int | None = None    # None: not recorded (a row from before format 3)

    def __post_init__(self):
        if isinstance(self.mtime_ns, bytes):
            object.__setattr__(self, "mtime_ns", int(self.mtime_ns))


_INT64 = range(-(1 << 63), 1 << 63)


def _ns_column(ns: int) -> int | bytes:
    """A time in ns as SQLite can hold it: past 2262 (or before 1677) it does not fit an
    INTEGER, and as TEXT SQLite would turn it into a lossy REAL; a BLOB it leaves alone."""
    return ns if ns in _INT64 else str(ns).encode()


class ObjectRef:
    """How the store reaches an object again (Store.open_object), without file handles.

    A recorded object is found by its inode number alone: the daemon holds a
    descriptor of it while it is in the tree, and the store names it
    `objects/i<INO>` once it left. An object that no row names (a snapshot's
    live-backed entry) is entry *name* of the object *base* refers to.
    """
    __slots__ = ("ino", "base", "name")

    def __init__(self, ino: int, base: "ObjectRef | None" = None, name: bytes | None = None):
        self.ino, self.base, self.name = ino, base, name

    def __repr__(self):
        return f"ObjectRef({self.ino}, {self.base!r}, {self.name!r})"


def disk_full(e: BaseException) -> bool:
    """Whether *e* is SQLite's "database or disk is full": its log could not grow."""
    return isinstance(e, sqlite3.OperationalError) and getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL


class FormatError(Exception):
    """The store was written in a format this cowfs does not read (a newer cowfs's)."""

    def __init__(self, version):
        super().__init__(f"store format {version} (this cowfs reads formats 1 to {FORMAT_VERSION}): "
                         "it was written by a newer cowfs; use that one")
        self.version = version


_RECORD_ATTRS = ("INSERT OR IGNORE INTO attrs (ino, turn, mode, uid, gid, size, mtime_ns, path, nlink) "
                 "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")


class Catalogue:
    @classmethod
    def existing(cls, path: str, readonly: bool) -> "Catalogue":
        """Open a catalogue as it is, creating and upgrading nothing, reading nothing yet (fsck:
        a damaged file must still open for what can be read). `created` is False: ask
        `has_schema`."""
        self = cls.__new__(cls)
        if readonly:
            uri = "file:" + urllib.parse.quote(path) + "?mode=ro"
            self.db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
        else:
            self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.created = False
        return self

    def has_schema(self) -> bool:
        return self.db.execute("SELECT 1 FROM sqlite_master WHERE name='meta'").fetchone() is not None

    def __init__(self, path: str):
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        # NORMAL: a commit reaches the WAL (and so survives a daemon crash)
        # before the change it describes reaches the backing filesystem.
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.created = not self.db.execute("SELECT 1 FROM sqlite_master WHERE name='meta'").fetchone()
        if self.created:
            self._create()
        version = self.get_meta("format")
        if version in UPGRADABLE_FORMATS:
            self._upgrade()
        elif version != FORMAT_VERSION:
            raise FormatError(version)

    def _upgrade(self) -> None:
        """Bring a format 1, 2 or 3 store to the current format, in place and all at once."""
        with self.transaction():
            columns = {row[1] for row in self.db.execute("PRAGMA table_info(attrs)")}
            if "nlink" not in columns:
                self.db.execute("ALTER TABLE attrs ADD COLUMN nlink INTEGER")
            for script in (_WRITERS_SCHEMA, _IGNORE_SCHEMA, _AGENT_SCHEMA):
                for statement in filter(str.strip, script.split(";")):
                    self.db.execute(statement)
            if "started" not in {row[1] for row in self.db.execute("PRAGMA table_info(processes)")}:
                self.db.execute("ALTER TABLE processes ADD COLUMN started INTEGER NOT NULL DEFAULT 0")
            self.set_meta("format", FORMAT_VERSION)

    def _create(self) -> None:
        now = time.time()
        self.db.executescript(
            "BEGIN;" + _SCHEMA +
            f"INSERT INTO meta VALUES ('format', '{FORMAT_VERSION}');"
            f"INSERT INTO turns (turn, started, sealed, message, kind) "
            f"VALUES (0, {now}, {now}, 'initial tree', 'initial');"
            "COMMIT;")

    @contextmanager
    def transaction(self):
        """All or nothing. Inside a `batch` it is a savepoint, so it nests."""
        if self.db.in_transaction:
            self.db.execute("SAVEPOINT part")
            try:
                yield
            except BaseException:
                self.db.execute("ROLLBACK TO part")
                raise
            finally:
                self.db.execute("RELEASE part")
            return
        self.db.execute("BEGIN")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    @contextmanager
    def batch(self):
        """Many records, one commit (a commit per statement costs more than the statement).

        Not all or nothing: after an error, what was recorded so far is still
        committed. Each record is a pre-image taken before its change, and the
        caller's in-memory state (capture's `*_done` sets) already counts it.
        The caller must not change what the records guard until this returns.
        """
        self.db.execute("BEGIN")
        try:
            yield
        finally:
            self.db.execute("COMMIT")

    def close(self) -> None:
        self.db.close()

    # -- meta ---------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    # -- recovery after a crash (drift.py) ------------------------------------
    def entry_recorded_since(self, parent: int, name: bytes, turn: int) -> bool:
        return self.db.execute("SELECT 1 FROM entries WHERE parent=? AND name=? AND turn>=? LIMIT 1",
                               (parent, name, turn)).fetchone() is not None

    def attrs_recorded_since(self, ino: int, turn: int) -> bool:
        return self.db.execute("SELECT 1 FROM attrs WHERE ino=? AND turn>=? LIMIT 1",
                               (ino, turn)).fetchone() is not None

    def recount(self, turn: int) -> int:
        """Make *turn*'s change count at least its number of rows (the count is persisted only now
        and then; the rows before every change). O(rows of the turn). Returns the count."""
        rows = sum(self.db.execute(f"SELECT count(*) FROM {table} WHERE turn=?", (turn,)).fetchone()[0]
                   for table in ("entries", "attrs"))
        self.db.execute("UPDATE turns SET changes=max(changes, ?) WHERE turn=?", (rows, turn))
        return self.db.execute("SELECT changes FROM turns WHERE turn=?", (turn,)).fetchone()[0]

    def object_named_since(self, ino: int, turn: int) -> bool:
        """An entry recorded in a turn >= *turn* held object *ino* at that turn's start (one of its
        names was removed or renamed since)."""
        return self.db.execute("SELECT 1 FROM entries WHERE ino=? AND turn>=? LIMIT 1",
                               (ino, turn)).fetchone() is not None

    def entry_made_since(self, parent: int, name: bytes, ino: int, turn: int) -> bool:
        """Entry (parent, name), which holds object *ino* now, held nothing or another object at
        the start of some turn >= *turn* (what it holds was put there since)."""
        return self.db.execute("SELECT 1 FROM entries WHERE parent=? AND name=? AND turn>=? "
                               "AND (ino IS NULL OR ino<>?) LIMIT 1",
                               (parent, name, turn, ino)).fetchone() is not None

    # -- turns --------------------------------------------------------------
    def open_turn(self) -> int:
        """The number of the open turn, opening a new one after the last sealed turn if needed."""
        last, sealed = self.db.execute(
            "SELECT turn, sealed FROM turns ORDER BY turn DESC LIMIT 1").fetchone()
        if sealed is None:
            return last
        self.db.execute("INSERT INTO turns (turn, started) VALUES (?, ?)", (last + 1, time.time()))
        return last + 1

    def current_turn(self) -> int:
        """The open turn's number, or the number the next one will get; creates nothing."""
        last, sealed = self.db.execute(
            "SELECT turn, sealed FROM turns ORDER BY turn DESC LIMIT 1").fetchone()
        return last if sealed is None else last + 1

    def seal(self, turn: int, message: str, changes: int, nbytes: int,
             kind: str = "turn", target: int | None = None) -> None:
        self.db.execute(
            "UPDATE turns SET sealed=?, message=?, changes=changes+?, bytes=bytes+?, kind=?, target=? "
            "WHERE turn=?", (time.time(), message, changes, nbytes, kind, target, turn))

    def add_counts(self, turn: int, changes: int, nbytes: int) -> None:
        self.db.execute("UPDATE turns SET changes=changes+?, bytes=bytes+? WHERE turn=?",
                        (changes, nbytes, turn))

    def turns(self) -> list[Turn]:
        rows = self.db.execute("SELECT turn, started, sealed, message, kind, target, changes, bytes "
                               "FROM turns ORDER BY turn").fetchall()
        return [Turn(*row) for row in rows]

    def name_initial_turn(self, message: str) -> None:
        self.db.execute("UPDATE turns SET message=? WHERE turn=0", (message,))

    def turn(self, number: int) -> Turn | None:
        row = self.db.execute("SELECT turn, started, sealed, message, kind, target, changes, bytes "
                              "FROM turns WHERE turn=?", (number,)).fetchone()
        return Turn(*row) if row else None

    def sealed_turns(self) -> list[int]:
        return [r[0] for r in self.db.execute(
            "SELECT turn FROM turns WHERE sealed IS NOT NULL ORDER BY turn")]

    def is_sealed(self, turn: int) -> bool:
        row = self.db.execute("SELECT sealed FROM turns WHERE turn=?", (turn,)).fetchone()
        return row is not None and row[0] is not None

    # -- recording (the capture path) ----------------------------------------
    def record_object(self, ino: int) -> None:
        # The handle column is kept for format 1 stores and no longer read (see ObjectRef).
        self.db.execute("INSERT OR IGNORE INTO objects (ino, handle) VALUES (?, x'')", (ino,))

    def record_entry(self, turn: int, parent: int, name: bytes, ino: int | None) -> None:
        self.db.execute("INSERT OR IGNORE INTO entries (parent, name, turn, ino) VALUES (?, ?, ?, ?)",
                        (parent, name, turn, ino))

    def record_attrs(self, ino: int, turn: int, st, xattrs: dict[bytes, bytes],
                     path: bytes | None) -> None:
        row = (ino, turn, st.st_mode, st.st_uid, st.st_gid, st.st_size, _ns_column(st.st_mtime_ns),
               path, st.st_nlink)
        if not xattrs:      # the usual case: one statement is all or nothing by itself
            self.db.execute(_RECORD_ATTRS, row)
            return
        with self.transaction():
            self.db.execute(_RECORD_ATTRS, row)
            self.db.executemany("INSERT OR IGNORE INTO xattrs (ino, turn, name, value) VALUES (?, ?, ?, ?)",
                                [(ino, turn, k, v) for k, v in xattrs.items()])

    def record_content(self, ino: int, turn: int, content: str) -> None:
        self.db.execute("UPDATE attrs SET content=? WHERE ino=? AND turn=? AND content IS NULL",
                        (content, ino, turn))

    def captured_in(self, turn: int) -> tuple[set[tuple[int, bytes]], set[int], set[int]]:
        """What the (open) *turn* already holds: entries, objects with attrs, objects with content.

        Used when a daemon resumes a turn another daemon left open (after a crash)."""
        entries = set(self.db.execute("SELECT parent, name FROM entries WHERE turn=?", (turn,)))
        attrs, content = set(), set()
        for ino, has_content in self.db.execute(
                "SELECT ino, content IS NOT NULL FROM attrs WHERE turn=?", (turn,)):
            attrs.add(ino)
            if has_content:
                content.add(ino)
        return entries, attrs, content

    # -- resolution (the snapshot path) --------------------------------------
    def ref(self, ino: int) -> "ObjectRef | None":
        """How to reach recorded object *ino*; None if no row refers to it."""
        row = self.db.execute("SELECT 1 FROM objects WHERE ino=?", (ino,)).fetchone()
        return ObjectRef(ino) if row else None

    def recorded_objects(self) -> set[int]:
        return {ino for (ino,) in self.db.execute("SELECT ino FROM objects")}

    def entry_after(self, parent: int, name: bytes, turn: int) -> tuple[bool, int | None]:
        """(found, ino) of the earliest entry pre-image of (parent, name) recorded after *turn*."""
        row = self.db.execute(
            "SELECT ino FROM entries WHERE parent=? AND name=? AND turn>? ORDER BY turn LIMIT 1",
            (parent, name, turn)).fetchone()
        return (False, None) if row is None else (True, row[0])

    def entries_after(self, parent: int, turn: int) -> dict[bytes, int | None]:
        """Every name of *parent* with a pre-image after *turn*, resolved to its earliest one."""
        result: dict[bytes, int | None] = {}
        for name, ino in self.db.execute(
                "SELECT name, ino FROM entries WHERE parent=? AND turn>? ORDER BY turn DESC",
                (parent, turn)):
            result[name] = ino
        return result

    def attrs_after(self, ino: int, turn: int) -> AttrRecord | None:
        row = self.db.execute(
            "SELECT turn, mode, uid, gid, size, mtime_ns, nlink FROM attrs WHERE ino=? AND turn>? "
            "ORDER BY turn LIMIT 1", (ino, turn)).fetchone()
        if row is None:
            return None
        content = self.content_after(ino, turn)
        return AttrRecord(*row[:-1], content=content, nlink=row[-1])

    def content_after(self, ino: int, turn: int) -> str | None:
        """The store file holding *ino*'s content at the end of *turn*, if it changed since."""
        row = self.db.execute(
            "SELECT content FROM attrs WHERE ino=? AND turn>? AND content IS NOT NULL "
            "ORDER BY turn LIMIT 1", (ino, turn)).fetchone()
        return row[0] if row else None

    def xattrs_at(self, ino: int, turn: int) -> dict[bytes, bytes]:
        return dict(self.db.execute("SELECT name, value FROM xattrs WHERE ino=? AND turn=?", (ino, turn)))

    # -- retention (retention.py) ----------------------------------------------
    def oldest_turn(self) -> int:
        """The oldest turn still kept: turns before it were pruned (0 if none was). Its own layer
        is needed by no snapshot (the snapshot of turn k reads rows of turns > k)."""
        return self.db.execute("SELECT min(turn) FROM turns").fetchone()[0]

    def drop_turns_before(self, turn: int) -> list[int]:
        """Forget the turns before *turn* (their rows are left to `garbage_rows`). Returns them."""
        gone = [t for (t,) in self.db.execute("SELECT turn FROM turns WHERE turn<?", (turn,))]
        self.db.execute("DELETE FROM turns WHERE turn<?", (turn,))
        return gone

    def garbage_rows(self, turn: int, limit: int) -> tuple[list[tuple], list[tuple]]:
        """Up to *limit* entry rows (parent, name, turn, ino) and attrs rows (ino, turn, content)
        of turns <= *turn*, which no kept snapshot reads once the turns before *turn* are gone."""
        entries = self.db.execute("SELECT parent, name, turn, ino FROM entries WHERE turn<=? "
                                  "LIMIT ?", (turn, limit)).fetchall()
        attrs = self.db.execute("SELECT ino, turn, content FROM attrs WHERE turn<=? LIMIT ?",
                                (turn, limit)).fetchall()
        return entries, attrs

    def delete_rows(self, entries: list[tuple], attrs: list[tuple]) -> None:
        self.db.executemany("DELETE FROM entries WHERE parent=? AND name=? AND turn=?",
                            [e[:3] for e in entries])
        self.db.executemany("DELETE FROM attrs WHERE ino=? AND turn=?", [a[:2] for a in attrs])
        self.db.executemany("DELETE FROM xattrs WHERE ino=? AND turn=?", [a[:2] for a in attrs])

    def drop_writers(self, turn: int, limit: int) -> int:
        """Delete up to *limit* attribution rows of each table for turns <= *turn* (read only by
        questions about those turns); how many went."""
        gone = 0
        for table, key in (("entry_writers", "turn, parent, name"), ("object_writers", "turn, ino"),
                           ("processes", "turn, pid")):
            gone += self.db.execute(f"DELETE FROM {table} WHERE ({key}) IN (SELECT {key} FROM {table} "
                                    "WHERE turn<=? LIMIT ?)", (turn, limit)).rowcount
        return gone

    def last_turn_naming(self, ino: int) -> int | None:
        """The newest turn with a row that names object *ino* (as object or as parent)."""
        return self.db.execute(
            "SELECT max(t) FROM (SELECT max(turn) AS t FROM entries WHERE ino=? "
            "UNION ALL SELECT max(turn) FROM entries WHERE parent=? "
            "UNION ALL SELECT max(turn) FROM attrs WHERE ino=?)", (ino, ino, ino)).fetchone()[0]

    def names_object(self, ino: int) -> bool:
        """Some row names object *ino* (as object or as parent). O(log rows)."""
        return any(self.db.execute(query, (ino,)).fetchone() for query in (
            "SELECT 1 FROM entries WHERE ino=? LIMIT 1", "SELECT 1 FROM entries WHERE parent=? LIMIT 1",
            "SELECT 1 FROM attrs WHERE ino=? LIMIT 1"))

    def unrecord_object(self, ino: int) -> None:
        self.db.execute("DELETE FROM objects WHERE ino=?", (ino,))

    def content_recorded(self, ino: int, turn: int, content: str) -> bool:
        return self.db.execute("SELECT 1 FROM attrs WHERE ino=? AND turn=? AND content=?",
                               (ino, turn, content)).fetchone() is not None

    # -- whole-layer queries (rollback, export) -------------------------------
    def xattrs_after(self, turn: int) -> dict[tuple[int, int], dict[bytes, bytes]]:
        """The extended attributes of every attrs row after *turn*, by (ino, turn) (as xattrs_at)."""
        result: dict[tuple[int, int], dict[bytes, bytes]] = {}
        for ino, t, name, value in self.db.execute(
                "SELECT ino, turn, name, value FROM xattrs WHERE turn>?", (turn,)):
            result.setdefault((ino, t), {})[name] = value
        return result

    def changed_entries_after(self, turn: int) -> dict[tuple[int, bytes], int | None]:
        """Every entry changed after *turn*, with its state at the end of *turn*."""
        result: dict[tuple[int, bytes], int | None] = {}
        for parent, name, ino in self.db.execute(
                "SELECT parent, name, ino FROM entries WHERE turn>? ORDER BY turn DESC", (turn,)):
            result[(parent, name)] = ino
        return result

    def changed_objects_after(self, turn: int) -> dict[int, AttrRecord]:
        """Every object changed after *turn*, with its state at the end of *turn* (as attrs_after)."""
        rows: dict[int, tuple] = {}
        content: dict[int, str] = {}
        for ino, *row, name in self.db.execute(
                "SELECT ino, turn, mode, uid, gid, size, mtime_ns, nlink, content FROM attrs WHERE turn>? "
                "ORDER BY turn DESC", (turn,)):
            rows[ino] = row
            if name is not None:
                content[ino] = name
        return {ino: AttrRecord(*row[:-1], content=content.get(ino), nlink=row[-1])
                for ino, row in rows.items()}

    def location_after(self, ino: int, turn: int) -> tuple[int, bytes] | None:
        """(parent, name) that held *ino* at the end of *turn*, if that entry changed since."""
        row = self.db.execute("SELECT parent, name FROM entries WHERE ino=? AND turn>? "
                              "ORDER BY turn LIMIT 1", (ino, turn)).fetchone()
        return (row[0], row[1]) if row else None

    def layer(self, turn: int) -> tuple[list[tuple[int, bytes]], list[tuple[int, bytes | None]]]:
        """Layer *turn*: its changed entries (parent, name) and changed objects (ino, path hint)."""
        entries = list(self.db.execute("SELECT parent, name FROM entries WHERE turn=?", (turn,)))
        objects = list(self.db.execute("SELECT ino, path FROM attrs WHERE turn=?", (turn,)))
        return entries, objects

    def layer_size(self, turn: int) -> tuple[int, int]:
        entries = self.db.execute("SELECT count(*) FROM entries WHERE turn=?", (turn,)).fetchone()[0]
        attrs = self.db.execute("SELECT count(*) FROM attrs WHERE turn=?", (turn,)).fetchone()[0]
        return entries, attrs

    # -- attribution (attribution.py) ---------------------------------------------------
    def record_writers(self, turn: int, processes, entries: dict, objects: dict) -> None:
        """Who made turn *turn*'s changes: Process records, (parent, name) -> pid, ino -> pid."""
        self.db.executemany("INSERT OR REPLACE INTO processes VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                            [(turn, p.pid, p.ppid, p.uid, p.comm, p.cmdline,
                              " ".join(map(str, p.ancestors)), p.started) for p in processes])
        self.db.executemany("INSERT OR REPLACE INTO entry_writers VALUES (?, ?, ?, ?)",
                            [(turn, parent, name, pid) for (parent, name), pid in entries.items()])
        self.db.executemany("INSERT OR REPLACE INTO object_writers VALUES (?, ?, ?)",
                            [(turn, ino, pid) for ino, pid in objects.items()])

    def entry_writer(self, parent: int, name: bytes, after: int, upto: int) -> tuple | None:
        """(pid, ppid, uid, comm, cmdline, started, ancestors) of the last process to change entry (parent, name)
        in turns after *after* up to *upto*; None if none is recorded."""
        return self.db.execute(
            "SELECT p.pid, p.ppid, p.uid, p.comm, p.cmdline, p.started, p.ancestors FROM entry_writers w JOIN processes p "
            "ON p.turn = w.turn AND p.pid = w.pid WHERE w.parent=? AND w.name=? AND w.turn>? "
            "AND w.turn<=? ORDER BY w.turn DESC LIMIT 1", (parent, name, after, upto)).fetchone()

    def object_writer(self, ino: int, after: int, upto: int) -> tuple | None:
        """As entry_writer, for changes of object *ino* in place."""
        return self.db.execute(
            "SELECT p.pid, p.ppid, p.uid, p.comm, p.cmdline, p.started, p.ancestors FROM object_writers w JOIN processes p "
            "ON p.turn = w.turn AND p.pid = w.pid WHERE w.ino=? AND w.turn>? AND w.turn<=? "
            "ORDER BY w.turn DESC LIMIT 1", (ino, after, upto)).fetchone()

    # -- the agent (agent.py) --------------------------------------------------------------
    def add_harness_session(self, pid: int, started: int, seen: float) -> None:
        self.db.execute("INSERT OR REPLACE INTO harness_sessions VALUES (?, ?, ?)", (pid, started, seen))

    def harness_sessions(self) -> list[tuple[int, int]]:
        return list(self.db.execute("SELECT pid, started FROM harness_sessions ORDER BY started"))

    def record_agent_write(self, path: str, sha256: str | None, pid: int | None, started: int | None,
                           recorded: float) -> None:
        self.db.execute("INSERT OR REPLACE INTO agent_writes VALUES (?, ?, ?, ?, ?)",
                        (path, sha256, pid, started, recorded))

    def agent_writes(self) -> list[tuple]:
        """(path, sha256, pid, started, recorded) of every file the harness recorded."""
        return list(self.db.execute("SELECT path, sha256, pid, started, recorded FROM agent_writes"))

    # -- ignore rules (ignore.py) -----------------------------------------------------------
    def rules_rows(self) -> list[tuple[int, str]]:
        return list(self.db.execute("SELECT turn, rules FROM ignore_rules ORDER BY turn"))

    def set_rules(self, turn: int, text: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO ignore_rules (turn, rules) VALUES (?, ?)", (turn, text))

    def ignored_things(self) -> dict[int, int]:
        return dict(self.db.execute("SELECT ino, since FROM ignored"))

    def set_ignored(self, ino: int, since: int) -> None:
        self.db.execute("INSERT OR REPLACE INTO ignored (ino, since) VALUES (?, ?)", (ino, since))

    def drop_ignored(self, ino: int) -> None:
        self.db.execute("DELETE FROM ignored WHERE ino=?", (ino,))

    def named_since(self, inos: list[int], turn: int) -> bool:
        """Whether an entry row of *turn* or later holds one of *inos* (one of them moved)."""
        marks = ",".join("?" * len(inos))
        return self.db.execute(f"SELECT 1 FROM entries WHERE ino IN ({marks}) AND turn>=? LIMIT 1",
                               (*inos, turn)).fetchone() is not None

    # -- diff (history.py) -----------------------------------------------------------------
    def changed_between(self, after: int, upto: int
                        ) -> tuple[list[tuple[int, bytes]], list[tuple[int, bytes | None]]]:
        """Entries (parent, name) and objects (ino, path hint) with a row in a turn after *after*
        up to *upto*: everything that may differ between the ends of the two turns."""
        entries = list(self.db.execute("SELECT DISTINCT parent, name FROM entries WHERE turn>? AND turn<=?",
                                       (after, upto)))
        objects: dict[int, bytes | None] = {}
        for ino, hint in self.db.execute("SELECT ino, path FROM attrs WHERE turn>? AND turn<=? "
                                         "ORDER BY turn DESC", (after, upto)):
            objects[ino] = hint or objects.get(ino)
        return entries, list(objects.items())

    # -- git export -------------------------------------------------------------------
    def ensure_git_exports(self) -> None:
        if not self.db.execute("SELECT 1 FROM sqlite_master WHERE name='git_exports'").fetchone():
            self.db.executescript(_GIT_EXPORTS_SCHEMA)

    def entry_changes(self, turn: int) -> list[tuple[int, bytes, int | None]]:
        """Layer *turn*'s entries: (parent, name, what it held at the end of the turn before)."""
        return list(self.db.execute("SELECT parent, name, ino FROM entries WHERE turn=?", (turn,)))

    def object_changes(self, turn: int) -> list[tuple[int, int, bool, bytes | None]]:
        """Layer *turn*'s objects: (ino, mode before, content changed in the turn, path hint)."""
        return [(ino, mode, bool(changed), path) for ino, mode, changed, path in self.db.execute(
            "SELECT ino, mode, content IS NOT NULL, path FROM attrs WHERE turn=?", (turn,))]

    def holders_after(self, ino: int, turn: int) -> list[tuple[int, bytes]]:
        """The entries (parent, name) that held *ino* at the start of some turn after *turn*."""
        return list(self.db.execute("SELECT DISTINCT parent, name FROM entries WHERE ino=? AND turn>?",
                                    (ino, turn)))

    def exported_turn(self, repo: bytes, branch: bytes, sha: str) -> int | None:
        row = self.db.execute("SELECT turn FROM git_exports WHERE repo=? AND branch=? AND sha=?",
                              (repo, branch, sha)).fetchone()
        return row[0] if row else None

    def record_exports(self, repo: bytes, branch: bytes, commits: list[tuple[int, str]]) -> None:
        with self.transaction():
            self.db.executemany("INSERT OR REPLACE INTO git_exports (repo, branch, turn, sha) "
                                "VALUES (?, ?, ?, ?)", [(repo, branch, t, sha) for t, sha in commits])

    def forget_exports(self, repo: bytes, branch: bytes, after: int = -1) -> None:
        """Drop the mapping of the turns after *after* (all of them by default)."""
        self.db.execute("DELETE FROM git_exports WHERE repo=? AND branch=? AND turn>?",
                        (repo, branch, after))

    # -- consistency (fsck.py) ---------------------------------------------------------
    def integrity_problems(self) -> list[str]:
        """SQLite's own check of the database file: empty if sound."""
        rows = [r[0] for r in self.db.execute("PRAGMA integrity_check")]
        return [] if rows == ["ok"] else rows

    def row_count(self) -> int:
        return sum(self.db.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("entries", "attrs"))

    def tables(self) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}

    def open_turns(self) -> list[int]:
        return [r[0] for r in self.db.execute("SELECT turn FROM turns WHERE sealed IS NULL ORDER BY turn")]

    def turns_with_rows(self, first: int = 0) -> set[int]:
        """Every turn number >= *first* that some layer row names."""
        return {r[0] for r in self.db.execute(
            "SELECT DISTINCT turn FROM entries WHERE turn>=? UNION SELECT DISTINCT turn FROM attrs "
            "WHERE turn>=? UNION SELECT DISTINCT turn FROM xattrs WHERE turn>=?", (first, first, first))}

    def content_rows(self, turn: int | None = None) -> list[tuple[int, int, str, int, bytes | None]]:
        """(ino, turn, content file, recorded size, path hint) of each content pre-image
        (of *turn* only, if given)."""
        where = "" if turn is None else " AND turn=?"
        return list(self.db.execute(
            "SELECT ino, turn, content, size, path FROM attrs WHERE content IS NOT NULL" + where,
            () if turn is None else (turn,)))

    def unrecorded_objects(self) -> set[int]:
        """Objects a layer row names that have no `objects` row (so `ref` cannot reach them)."""
        return {r[0] for r in self.db.execute(
            "SELECT ino FROM entries WHERE ino IS NOT NULL UNION SELECT parent FROM entries "
            "UNION SELECT ino FROM attrs EXCEPT SELECT ino FROM objects")}

    def objects_of_turn(self, turn: int) -> set[int]:
        """The objects the rows of *turn* name (entries held, their directories, attrs)."""
        return {r[0] for r in self.db.execute(
            "SELECT ino FROM entries WHERE turn=? AND ino IS NOT NULL UNION SELECT parent FROM entries "
            "WHERE turn=? UNION SELECT ino FROM attrs WHERE turn=?", (turn, turn, turn))}

    def object_modes(self) -> dict[int, int]:
        """The file type bits each object was recorded with (an object's type never changes)."""
        return {ino: mode for ino, mode in self.db.execute("SELECT ino, max(mode) FROM attrs GROUP BY ino")}

    def describe_object(self, ino: int) -> tuple[list[int], bytes | None]:
        """(the turns whose rows name *ino*, a name it had: a path hint or an entry name)."""
        turns = sorted({r[0] for r in self.db.execute(
            "SELECT turn FROM entries WHERE ino=? UNION SELECT turn FROM attrs WHERE ino=?", (ino, ino))})
        row = self.db.execute("SELECT path FROM attrs WHERE ino=? AND path IS NOT NULL "
                              "ORDER BY turn LIMIT 1", (ino,)).fetchone()
        if row is None:
            row = self.db.execute("SELECT name FROM entries WHERE ino=? ORDER BY turn LIMIT 1",
                                  (ino,)).fetchone()
        return turns, (bytes(row[0]) if row else None)

    def lost(self) -> dict[tuple[str, str], str]:
        """What an earlier repair accepted as lost: (kind, name) -> detail."""
        if "lost" not in self.tables():
            return {}
        return {(k, n): d for k, n, d in self.db.execute("SELECT kind, name, detail FROM lost")}

    def is_lost(self, kind: str, name: str) -> bool:
        try:
            return self.db.execute("SELECT 1 FROM lost WHERE kind=? AND name=?",
                                   (kind, name)).fetchone() is not None
        except sqlite3.OperationalError:
            return False    # no such table: nothing was ever found lost

    def note_lost(self, kind: str, name: str, detail: str) -> None:
        self.db.executescript(_LOST_SCHEMA)
        self.db.execute("INSERT OR REPLACE INTO lost (kind, name, noted, detail) VALUES (?, ?, ?, ?)",
                        (kind, name, time.time(), detail))

    def seal_left_open(self, turn: int, at: float, message: str) -> None:
        self.db.execute("UPDATE turns SET sealed=?, message=CASE WHEN message='' THEN ? ELSE message END "
                        "WHERE turn=? AND sealed IS NULL", (at, message, turn))

    def restore_turn(self, turn: int, at: float, message: str) -> None:
        """Give rows of *turn* a turn record again (its own was lost), sealed at *at*."""
        self.db.execute("INSERT OR IGNORE INTO turns (turn, started, sealed, message) VALUES (?, ?, ?, ?)",
                        (turn, at, at, message))

    def rows_of(self, table: str):
        """Every row of *table*, as far as it can be read (a damaged file ends the scan early)."""
        if table not in TABLES:
            raise ValueError(table)
        return self.db.execute(f"SELECT * FROM {table}")

    def copy_rows(self, table: str, columns: list[str], rows: list[tuple]) -> int:
        """Copy *rows* into *table*; returns how many could not be (garbled beyond use)."""
        if table not in TABLES:
            raise ValueError(table)
        if table == "lost":
            self.db.executescript(_LOST_SCHEMA)
        elif table == "git_exports":
            self.ensure_git_exports()
        skipped = 0
        if rows:
            marks = ", ".join("?" * len(columns))
            # By name: a store of an older format lacks columns added since (they stay NULL).
            names = ", ".join(columns)
            with self.transaction():
                for row in rows:
                    try:
                        self.db.execute(f"INSERT OR REPLACE INTO {table} ({names}) VALUES ({marks})", row)
                    except sqlite3.IntegrityError:
                        skipped += 1        # a row a damaged page garbled (a NULL key, say)
        return skipped
