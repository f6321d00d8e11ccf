"""The Python API of a mounted workspace: what a harness, compat and the MCP server call, and
what most CLI commands are built on (checkpoint, rollback, status and export-git are not yet).

Owns the typed results (`Turn`, `Status`) and the operations on a mount, each
one request (or a few) on the control channel; no process is started, so a
checkpoint costs well under a millisecond. Errors are the classes of
`cowfs.errors` (`NotMounted`, `UnknownTurn`, ...), never bare OSErrors.

    >>> ws = Workspace("~/proj")            # any path inside the mount
    >>> t = ws.checkpoint("turn 1: add parser")
    >>> t.number, t.changes
    (1, 4)
    >>> ws.rollback(0).target                # the live tree is turn 0 again
    0
    >>> ws.snapshot_path(1) / "src/app.py"   # turn 1 as plain files
    PosixPath('/home/me/proj/.snapshots/turn-1/src/app.py')
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from . import control, names
from .attribution import Process
from .errors import BadInput, PrunedTurn, UnknownTurn

SNAPDIR = names.SNAPDIR.decode()


@dataclass(frozen=True)
class Turn:
    """One turn of the history.

    `kind` is "initial" (turn 0, the tree at the first mount), "turn" (ended by a
    checkpoint or an unmount) or "rollback" (its layer holds the state before a
    rollback to `target`). `sealed` is None for the open turn. Times are seconds
    since the epoch.

    `changes` is what the turn changed, counted as `cowfs diff` shows it (the paths
    the workspace's .gitignore files and noise.DEFAULT_NOISE ignore left out, unless
    the turns were asked for with `include_ignored`); `ignored` is how many were
    left out. Both are counted when first read (one diff); the oldest turn kept
    has nothing before it to compare with, and counts what its layer captured.
    `captured` is that count: the things whose earlier state the layer holds.
    """
    number: int
    started: float
    sealed: float | None
    message: str
    kind: str
    captured: int
    bytes_captured: int
    target: int | None = None
    counter: "Callable[[], tuple[int, int]] | None" = field(default=None, repr=False, compare=False)
    _counts: list = field(default_factory=list, repr=False, compare=False)

    @classmethod
    def from_record(cls, record: dict, counter=None) -> Turn:
        return cls(record["number"], record["started"], record["sealed"], record["message"],
                   record["kind"], record["changes"], record["bytes"], record.get("target"), counter)

    def _count(self) -> tuple[int, int]:
        if not self._counts:
            self._counts.extend(self.counter() if self.counter else (self.captured, 0))
        return self._counts[0], self._counts[1]

    @property
    def changes(self) -> int:
        return self._count()[0]

    @property
    def ignored(self) -> int:
        return self._count()[1]

    @property
    def name(self) -> str:
        return f"turn-{self.number}"


@dataclass(frozen=True)
class Change:
    """One changed path between two turns (or a turn and the live tree).

    `kind` is git's letter: "A" added, "M" modified (content or mode), "D"
    deleted, "R" renamed (the same object seen moving, never guessed from
    content; `old_path` is where it was), "T" type changed. Paths are relative
    to the workspace root. `process` is the last process that made the change
    (None when no record says: a rollback's own changes, or a turn sealed
    before cowfs recorded writers).

        >>> [(c.kind, c.path, c.process.comm) for c in ws.diff()]
        [('M', 'src/app.py', 'sed'), ('D', 'build/out.o', 'rm')]
    """
    kind: str
    path: str
    old_path: str | None
    old_mode: int | None
    new_mode: int | None
    old_size: int | None
    new_size: int | None
    process: Process | None = None

    @classmethod
    def from_record(cls, r: dict) -> "Change":
        p = r.get("process")
        process = Process(**{**p, "ancestors": tuple(p.get("ancestors", ()))}) if p else None
        return cls(r["kind"], r["path"], r["old_path"], r["old_mode"], r["new_mode"], r["old_size"],
                   r["new_size"], process)

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["process"] = None if self.process is None else self.process.as_dict()
        return d


@dataclass(frozen=True)
class Status:
    """What `cowfs status` shows: the mount, its turns, how pre-images are kept, the store's size."""
    mountpoint: str
    backing: str
    open_turn: int
    last_turn: int
    turns: int
    pending_changes: int
    capture_mode: str          # "reflink" or "copy"
    store_bytes: int
    daemon_pid: int
    snapdir: str
    drift: str | None = None
    ignore: dict = field(default_factory=dict)     # "rules": the patterns in force, "ignored_things"
    requests: dict[str, int] = field(default_factory=dict)
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_reply(cls, reply: dict) -> Status:
        names = [f for f in cls.__dataclass_fields__ if f != "raw"]
        return cls(**{n: reply[n] for n in names if n in reply}, raw=reply)


class Workspace:
    """A mounted cowfs workspace, found from any path inside it.

    Raises `NotMounted` if *path* is not inside a cowfs mount.
    """

    def __init__(self, path: str | os.PathLike = "."):
        self._mount = control.find_mount(os.path.expanduser(os.fspath(path)))
        self.path = Path(self._mount.mountpoint)

    def __repr__(self):
        return f"Workspace({str(self.path)!r})"

    def _request(self, op: str, **args) -> dict:
        return control.request(self._mount, op, **args)

    def checkpoint(self, message: str = "") -> Turn:
        """End the open turn: the daemon has the kernel write back what it holds of files still
        open, seals, and this returns the sealed turn."""
        record = self._request("checkpoint", message=message)["record"]
        return Turn.from_record(record, self._counter(record["number"], True, False))

    def sync(self) -> None:
        """Have the kernel write back, and wait for, what it holds of files still open for writing
        (what `checkpoint`, `rollback`, `restore` and a live `diff` do first), so that
        `status().pending_changes` counts writes still in the page cache."""
        self._request("flush")

    def turns(self, include_ignored: bool = False) -> list[Turn]:
        """Every turn still kept, oldest first; the last one is the open turn. Their `changes`
        leave out noise (see `Turn`) unless *include_ignored*."""
        reply = self._request("log")
        return [Turn.from_record(t, self._counter(t["number"], t["sealed"] is not None,
                                                  include_ignored, reply.get("oldest_turn", 0)))
                for t in reply["turns"]]

    def turn(self, number: int, include_ignored: bool = False) -> Turn:
        """Turn *number*; `UnknownTurn` if it does not exist (`PrunedTurn` if it was pruned)."""
        reply = self._request("log")
        for t in reply["turns"]:
            if t["number"] == number:
                return Turn.from_record(t, self._counter(number, t["sealed"] is not None,
                                                         include_ignored, reply.get("oldest_turn", 0)))
        self._refuse_pruned(number, reply)
        raise UnknownTurn(f"turn {number} does not exist (see `cowfs log`)")

    def _refuse_pruned(self, number: int, log: dict | None = None) -> None:
        from .retention import pruned_message
        oldest = (log or self._request("log")).get("oldest_turn", 0)
        if 0 <= number < oldest:
            raise PrunedTurn(pruned_message(number, oldest))

    def _counter(self, number: int, sealed: bool, include_ignored: bool, oldest: int = 0):
        """What counts turn *number*'s changes when they are first asked for (None: the oldest
        turn kept, with no turn before it to compare with)."""
        if number <= oldest:
            return None
        def count() -> tuple[int, int]:
            shown = self.shown_diff(number - 1, number if sealed else None,
                                    include_ignored=include_ignored)
            return len(shown.changes), shown.ignored
        return count

    def rollback(self, turn: int) -> Turn:
        """Make the live tree exactly sealed turn *turn*. Pending changes are sealed first as their
        own turn; the rollback is recorded as a turn of its own (returned), so it can be undone."""
        reply = control.rollback(os.fspath(self.path), _turn_number(turn))
        return self.turn(reply["turn"])

    def diff(self, a: int | None = None, b: int | None = None,
             paths: "list[str] | tuple[str, ...]" = ()) -> list[Change]:
        """What changed from sealed turn *a* (default: the last sealed turn) to sealed turn *b*
        (default: the live tree), optionally only at or below *paths*. O(what changed).

            >>> ws.diff()            # what the open turn did so far
            >>> ws.diff(3, 5, ["src"])
        """
        a = self._last_sealed() if a is None else _turn_number(a)
        b = None if b is None else _turn_number(b)
        reply = self._request("diff", a=a, b=b, paths=[self.relative(p) for p in paths])
        return [Change.from_record(r) for r in reply["changes"]]

    def shown_diff(self, a: int | None = None, b: int | None = None,
                   paths: "list[str] | tuple[str, ...]" = (), include_ignored: bool = False):
        """`diff` as the views show it: a `noise.Shown` (`changes`, and how many were `ignored`:
        paths the .gitignore files of turn *b*'s tree, or of the live tree, ignore, and
        noise.DEFAULT_NOISE). *include_ignored*: all of them."""
        from . import noise
        b = None if b is None else _turn_number(b)
        changes = self.diff(a, b, paths)
        if include_ignored or not changes:
            return noise.Shown(changes, 0)
        return noise.split(changes, self.path if b is None else self.snapshot_path(b))

    def file_diffs(self, a: int | None = None, b: int | None = None,
                   paths: "list[str] | tuple[str, ...]" = (), max_size: int | None = None,
                   changes: "list[Change] | None" = None):
        """The changes of `diff` (or *changes*, some of them) with their contents
        (patch.FileDiff), read through the mount. A change with a side larger than *max_size*
        bytes is left without contents (the patch names it, as one whose contents cannot be
        read; it counts no lines)."""
        from . import patch
        a = self._last_sealed() if a is None else _turn_number(a)
        changes = self.diff(a, b, paths) if changes is None else changes
        old_root = self.snapshot_path(a)
        new_root = self.path if b is None else self.snapshot_path(b)
        return [patch.FileDiff(c.kind, c.path, c.old_path, c.old_mode, c.new_mode,
                               *_contents(c, old_root, new_root, max_size)) for c in changes]

    def patch(self, a: int | None = None, b: int | None = None,
              paths: "list[str] | tuple[str, ...]" = ()) -> str:
        """`diff` as a git-style unified patch (`--- a/` `+++ b/` headers)."""
        from . import patch
        return patch.patch(self.file_diffs(a, b, paths))

    def restore(self, turn: int, paths: "list[str] | tuple[str, ...]") -> list[tuple[str, str]]:
        """Make each path (file, symlink or directory) exactly what it was at sealed turn *turn*:
        content, mode, mtime, xattrs; a directory's later additions are removed, a path that did
        not exist then is removed. A change of the open turn: `diff` shows it, and rolling back
        to the last sealed turn undoes it. Returns (path, what was done) per path.

            >>> ws.restore(3, ["src/app.py"])
            [('src/app.py', 'restored')]
        """
        if not paths:
            raise BadInput("restore needs at least one path")
        reply = control.restore(self._mount, _turn_number(turn), [self.relative(p) for p in paths])
        return [tuple(r) for r in reply["restored"]]

    # -- who the agent is (agent.py) -----------------------------------------------------------
    def begin_harness_session(self, pid: int | None = None):
        """Record process *pid* (default: this one) as a harness session of this workspace, in its
        store: what it and its descendants change is the agent's for every later process too."""
        from . import agent
        me = agent.Identity.of(os.getpid() if pid is None else pid)
        return agent.AgentRecord(self._request("agent", action="session", session_pid=me.pid,
                                               session_started=me.started))

    def record_agent_write(self, path: str | os.PathLike) -> None:
        """The harness's write tool just wrote *path*: keep its digest and its last writer (this
        turn's) in the ledger, so a safe restore reverts it while nobody else changed it."""
        from . import agent
        rel = self.relative(path)
        changes = self.diff(None, None, [rel])
        writer = changes[0].process if changes and changes[0].process else None
        self._request("agent", action="record", path=rel, sha256=agent.digest(self.path / rel),
                      writer_pid=writer and writer.pid, writer_started=writer and writer.started)

    def agent_record(self):
        from . import agent
        return agent.AgentRecord(self._request("agent", action="read"))

    def safe_restore_plan(self, turn: int, paths: "list[str] | tuple[str, ...]" = ()):
        """Which changes since sealed turn *turn* (at or below *paths*) are the agent's and which
        the user's, by the rule of agent.py: an `agent.SafePlan`."""
        from . import agent
        return agent.plan(self.agent_record(), self.path, self.diff(turn, None, paths))

    def relative(self, path: str | os.PathLike, base: str | None = None) -> str:
        """*path* relative to the workspace root: an absolute path must lie in the mount; a
        relative one is taken from *base* (default: the working directory) when that is inside
        the mount, else from the root. `BadInput` for a path outside the live tree (or under .snapshots)."""
        path = os.fspath(path)
        root = str(self.path)
        cwd = os.path.realpath(base) if base is not None else _cwd()
        if not os.path.isabs(path):
            base = cwd if cwd is not None and _inside(cwd, root) else root
            path = os.path.join(base, path)
        path = os.path.normpath(path)
        if not _inside(path, root):
            raise BadInput(f"{path} is outside the workspace {root}")
        rel = os.path.relpath(path, root)
        rel = "" if rel == "." else rel
        if rel.split("/", 1)[0] in (SNAPDIR, names.STORE_NAME.decode()):
            raise BadInput(f"{path} is not in the live tree (it is under {rel.split('/', 1)[0]})")
        return rel

    def _last_sealed(self) -> int:
        return max(t["number"] for t in self._request("log")["turns"] if t["sealed"] is not None)

    def snapshot_path(self, turn: int) -> Path:
        """The read-only directory that holds sealed turn *turn*."""
        number = _turn_number(turn)
        path = self.path / SNAPDIR / f"turn-{number}"
        if not path.is_dir():
            self._refuse_pruned(number)
            raise UnknownTurn(f"turn {number} does not exist or is not sealed (see `cowfs log`)")
        return path

    def status(self) -> Status:
        return Status.from_reply(self._request("status"))

    def prune(self, limits=None, *, keep: int | None = None, older_than: float | str | None = None,
              max_store: int | str | None = None, dry_run: bool = False):
        """Free the store of the oldest turns: keep the newest *keep* sealed turns, drop turns
        sealed more than *older_than* ago (seconds, or "7d"), or the oldest until the store fits
        in *max_store* (bytes, or "2G"); the strictest wins. Returns a `retention.PruneResult`
        (`removed` turns, `oldest` kept, `freed_bytes`). `BadInput` for an invalid limit.

            >>> ws.prune(keep=20).oldest
            981
        """
        from .retention import Limits, PruneResult
        limits = limits or Limits.parse(keep, older_than, max_store)
        reply = self._request("prune", **limits.as_dict(), dry_run=dry_run)
        reply.pop("ok", None)
        return PruneResult(**reply)


def mount(path: str | os.PathLike, *, at: str | None = None, snapdir: str = "hidden",
          force: bool = False, export_git_on_checkpoint: bool = False, owner: str | None = None,
          allow_other: bool = False, message: str = "",
          auto_checkpoint: float | None = None, keep: int | None = None,
          older_than: float | str | None = None, max_store: int | str | None = None,
          options: str = "", idle_umount: float | str | None = None) -> Workspace:
    """Mount cowfs over *path* (or at *at*) and return the mounted Workspace.

    The first mount of a directory makes its tree turn 0 (named *message*, if
    given). *keep*, *older_than*, *max_store*: prune limits applied after
    each checkpoint, in the background (see `Workspace.prune`). *options*: as `cowfs mount -o`
    ("noatime", "relatime", "strictatime", "nodiratime", comma-separated). *idle_umount*
    (seconds, or "10m"): the mount ends by itself once idle that long (no open
    file, no process inside, no request), sealing pending changes.
    If this process's working directory is inside the mount, it is
    entered again, so that relative paths from now on go through the mount
    (a process that was already inside still sees the directory underneath).
    Raises BadInput (not a directory, already mounted, changed while unmounted:
    see *force*) or OperationFailed.

        >>> ws = cowfs.mount("~/proj")
    """
    from . import mounting
    req = mounting.MountRequest(os.fspath(path), at, snapdir, force, False, export_git_on_checkpoint,
                                owner, allow_other, message, auto_checkpoint, keep=keep,
                                older_than=older_than, max_store=max_store, options=options,
                                idle_umount=idle_umount)
    mounted_ = mounting.mount(req)
    _reenter_cwd(mounted_.mountpoint)
    return Workspace(mounted_.mountpoint)


def umount(path: str | os.PathLike, lazy: bool = False) -> int | None:
    """Seal pending changes and unmount the mount containing *path*; returns the turn they were
    sealed as (None if there were none). A busy mount raises OperationFailed naming its holders,
    unless *lazy* (detach now; the daemon stops when the last of them leaves)."""
    from . import mounting
    return mounting.unmount(os.fspath(path), lazy).sealed


@contextmanager
def mounted(path: str | os.PathLike, **options):
    """Mount for the duration of a `with` block, then unmount (sealing pending changes).

        >>> with cowfs.mounted("/tmp/ws") as ws:
        ...     Path("/tmp/ws/notes.txt").write_text("hello")
        ...     ws.checkpoint("wrote notes")
    """
    ws = mount(path, **options)
    try:
        yield ws
    finally:
        cwd = _cwd()
        if cwd is not None and _inside(cwd, str(ws.path)):
            os.chdir("/")       # our own working directory would keep the mount busy
            umount(ws.path)
            os.chdir(cwd)       # the directory underneath, which is the live tree
        else:
            umount(ws.path)


def fsck(path: str | os.PathLike, repair: bool = False):
    """Check the store of the unmounted workspace *path* against itself and the tree; with
    *repair*, mend what can be mended without losing anything. Returns a `fsck.Report`
    (`.findings`, one plain line each; `.clean`: consistent now). A dead mount there is cleared
    first; a live one raises BadInput, as do a missing store and a newer format."""
    from . import fsck as fsck_, mounting
    from .catalogue import FormatError
    from .store import StoreBusy
    workspace = os.path.realpath(os.path.expanduser(os.fspath(path)))
    if not os.path.isdir(workspace):
        raise BadInput(f"{path} is not a directory")
    try:
        notes = mounting.refuse_mounted(workspace)
    except BadInput as e:
        raise BadInput(f"{e}: fsck checks an unmounted workspace (`cowfs umount` it first)") from None
    try:
        report = fsck_.check_workspace(workspace, repair)
    except FileNotFoundError:
        raise BadInput(f"{workspace} has no cowfs store (.cowfs): nothing to check") from None
    except StoreBusy:
        raise BadInput(f"the store of {workspace} is in use by a cowfs daemon (mounted elsewhere "
                       "with --at?): unmount it first") from None
    except FormatError as e:
        raise BadInput(f"{workspace}/.cowfs: {e}") from None
    report.findings[:0] = [fsck_.Finding("mount", n, problem=False) for n in notes]
    return report


def _cwd() -> str | None:
    try:
        return os.getcwd()
    except OSError:
        return None


def _inside(path: str, mountpoint: str) -> bool:
    return path == mountpoint or path.startswith(mountpoint.rstrip("/") + "/")


def _reenter_cwd(mountpoint: str) -> None:
    cwd = _cwd()
    if cwd is not None and _inside(cwd, mountpoint):
        os.chdir(cwd)


def _contents(c: Change, old_root: Path, new_root: Path,
              max_size: int | None) -> tuple[bytes | None, bytes | None]:
    """Both sides' contents of change *c*, or neither when one is larger than *max_size*."""
    if max_size is not None and max(c.old_size or 0, c.new_size or 0) > max_size:
        return None, None
    return _content(old_root, c.old_path, c.old_mode), _content(new_root, c.path, c.new_mode)


def _content(root: Path, path: str | None, mode: int | None) -> bytes | None:
    """What the diff shows of *path* under *root*: a file's bytes, a symlink's target."""
    import stat
    if path is None or mode is None:
        return None
    full = root / path
    try:
        if stat.S_ISLNK(mode):
            return os.fsencode(os.readlink(full))
        if stat.S_ISREG(mode):
            return full.read_bytes()
    except OSError:
        return None     # changed again meanwhile, or unreadable: the patch says what it can
    return None


def _turn_number(turn: int | str | Turn) -> int:
    if isinstance(turn, Turn):
        return turn.number
    if isinstance(turn, str) and turn.removeprefix("turn-").isdigit():
        return int(turn.removeprefix("turn-"))
    if isinstance(turn, int) and not isinstance(turn, bool) and turn >= 0:
        return turn
    raise UnknownTurn(f"not a turn: {turn!r} (expected N or turn-N)")
