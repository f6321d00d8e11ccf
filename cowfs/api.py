"""The Python API of a mounted workspace: what a harness calls, and what the CLI is built on.

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
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from . import control
from .errors import BadInput, UnknownTurn

SNAPDIR = ".snapshots"


@dataclass(frozen=True)
class Turn:
    """One turn of the history.

    `kind` is "initial" (turn 0, the tree at the first mount), "turn" (ended by a
    checkpoint or an unmount) or "rollback" (its layer holds the state before a
    rollback to `target`). `sealed` is None for the open turn. Times are seconds
    since the epoch.
    """
    number: int
    started: float
    sealed: float | None
    message: str
    kind: str
    changes: int
    bytes_captured: int
    target: int | None = None

    @classmethod
    def from_record(cls, record: dict) -> Turn:
        return cls(record["number"], record["started"], record["sealed"], record["message"],
                   record["kind"], record["changes"], record["bytes"], record.get("target"))

    @property
    def name(self) -> str:
        return f"turn-{self.number}"


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
        """End the open turn: flush the kernel's dirty pages, seal, return the sealed turn."""
        control.syncfs(self._mount)
        return Turn.from_record(self._request("checkpoint", message=message)["record"])

    def turns(self) -> list[Turn]:
        """Every turn still kept, oldest first; the last one is the open turn."""
        return [Turn.from_record(t) for t in self._request("log")["turns"]]

    def turn(self, number: int) -> Turn:
        """Turn *number*; `UnknownTurn` if it does not exist."""
        for t in self.turns():
            if t.number == number:
                return t
        raise UnknownTurn(f"turn {number} does not exist (see `cowfs log`)")

    def rollback(self, turn: int) -> Turn:
        """Make the live tree exactly sealed turn *turn*. Pending changes are sealed first as their
        own turn; the rollback is recorded as a turn of its own (returned), so it can be undone."""
        reply = control.rollback(os.fspath(self.path), _turn_number(turn))
        return self.turn(reply["turn"])

    def snapshot_path(self, turn: int) -> Path:
        """The read-only directory that holds sealed turn *turn*."""
        number = _turn_number(turn)
        path = self.path / SNAPDIR / f"turn-{number}"
        if not path.is_dir():
            raise UnknownTurn(f"turn {number} does not exist or is not sealed (see `cowfs log`)")
        return path

    def status(self) -> Status:
        return Status.from_reply(self._request("status"))


def mount(path: str | os.PathLike, *, at: str | None = None, snapdir: str = "hidden",
          force: bool = False, export_git_on_checkpoint: bool = False, owner: str | None = None,
          allow_other: bool = False, message: str = "") -> Workspace:
    """Mount cowfs over *path* (or at *at*) and return the mounted Workspace.

    The first mount of a directory makes its tree turn 0 (named *message*, if
    given). If this process's working directory is inside the mount, it is
    entered again, so that relative paths from now on go through the mount
    (a process that was already inside still sees the directory underneath).
    Raises BadInput (not a directory, already mounted, changed while unmounted:
    see *force*) or OperationFailed.

        >>> ws = cowfs.mount("~/proj")
    """
    from . import mounting
    req = mounting.MountRequest(os.fspath(path), at, snapdir, force, False, export_git_on_checkpoint,
                                owner, allow_other, message)
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


def _turn_number(turn: int | str | Turn) -> int:
    if isinstance(turn, Turn):
        return turn.number
    if isinstance(turn, str) and turn.removeprefix("turn-").isdigit():
        return int(turn.removeprefix("turn-"))
    if isinstance(turn, int) and not isinstance(turn, bool) and turn >= 0:
        return turn
    raise UnknownTurn(f"not a turn: {turn!r} (expected N or turn-N)")
