"""A drop-in for the shadow-git checkpoint manager that agent harnesses call, backed by cowfs.

Owns the translation between the checkpoint-manager interface of agent
harnesses (the Hermes agent's `CheckpointManager` and its module's functions,
with their arguments, return shapes and error phrases) and cowfs turns, and
which mount serves a directory. Every operation is one of `cowfs.api`; the
decisions are the API's modules' (who the agent is: `cowfs.agent`; what a view
leaves out: `cowfs.noise`); this module translates arguments, ids and shapes:

- a checkpoint is a sealed turn, its reason the turn's message (first line);
- its id (`hash`) is a hex digest of the turn's number and start time, stable
  across remounts; any prefix of 4 or more digits that names one turn is
  accepted, `short_hash` is the first 8;
- `ensure_checkpoint` seals the open turn (nothing is copied: the pre-images
  were kept as the files changed), and mounts cowfs first where needed, over
  the directory whose history the path belongs to (never around another
  history), with an idle unmount; the mounts a process made end when it exits
  and are mounted again on demand;
- `restore(safe=True)` reverts the agent's changes by the shadow-git
  manager's rule (its ledger: `record_agent_write`), extended by what cowfs
  records (changes by the harness's descendants), kept in the store so that
  a restarted harness decides the same.

    from cowfs.compat import CheckpointManager      # the one line a harness changes

    mgr = CheckpointManager()
    mgr.new_turn()
    mgr.ensure_checkpoint("/home/me/proj", "before: add the parser")   # True
    ...                                                     # the agent works
    cp = mgr.list_checkpoints("/home/me/proj")[0]           # newest first
    mgr.diff("/home/me/proj", cp["short_hash"])["stat"]
    mgr.restore("/home/me/proj", cp["hash"], safe=True)     # agent's changes undone

`ensure_checkpoint` never raises (it returns False and logs); `diff` and
`restore` return `{"success": False, "error": ...}` for anything cowfs
refuses, having touched nothing. `available(path)` says whether cowfs can
serve a directory here, and why not. Housekeeping: `store_status()`,
`prune()` and the shadow-git module's functions, with the nearest cowfs
meaning (docs/harness.md); `max_total_size_mb` becomes the store limit of the
mounts this manager makes (`cowfs mount --max-store`).
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import re
import stat
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

from . import agent, api, names, noise, patch
from .errors import BadInput, CowfsError, NotMounted, OperationFailed

logger = logging.getLogger(__name__)

HASH_LENGTH = 40
SHORT_LENGTH = 8
LINE_COUNT_LIMIT = 10 << 20     # list_checkpoints counts no lines of a file larger than this
_HASH_RE = re.compile(r"[0-9a-fA-F]{4,64}")
# The shadow-git manager's exclude list is what its checkpoints lose; here nothing is excluded
# from the history, and this is what the views leave out (and count): cowfs.noise.
DEFAULT_EXCLUDES = list(noise.DEFAULT_NOISE)
STORE_DIR = names.STORE_NAME.decode()
IDLE_UMOUNT = "10m"     # a mount the manager made ends once idle this long (and when we exit)
PROJECT_MARKERS = (".git", "pyproject.toml", "package.json", "Cargo.toml", "go.mod", "Makefile",
                   "pom.xml", ".hg", "Gemfile")


# -- ids --------------------------------------------------------------------------------------
def turn_hash(turn: api.Turn) -> str:
    """The checkpoint id of *turn*: 40 hex digits from its number and start time (which never
    change, so the id is the same across remounts, and differs between workspaces)."""
    digest = hashlib.sha256(f"cowfs turn {turn.number} {turn.started!r}".encode())
    return digest.hexdigest()[:HASH_LENGTH]


def check_hash(commit_hash) -> None:
    """`BadInput` unless *commit_hash* looks like an id harnesses pass (hex, 4-64 digits). The
    wording is the shadow-git manager's, whose callers look for its phrases."""
    if not isinstance(commit_hash, str) or not commit_hash.strip():
        raise BadInput("Empty commit hash")
    if commit_hash.startswith("-"):
        raise BadInput(f"Invalid commit hash (must not start with '-'): {commit_hash!r}")
    if not _HASH_RE.fullmatch(commit_hash):
        raise BadInput(f"Invalid commit hash (expected 4-64 hex characters): {commit_hash!r}")


def find_turn(ws: api.Workspace, commit_hash: str) -> api.Turn:
    """The sealed turn whose id starts with *commit_hash*; `BadInput` if none or several."""
    check_hash(commit_hash)
    prefix = commit_hash.lower()
    found = [t for t in ws.turns() if t.sealed is not None and turn_hash(t).startswith(prefix)]
    if not found:
        raise BadInput(f"Checkpoint '{commit_hash}' not found in {ws.path} (see list_checkpoints)")
    if len(found) > 1:
        raise BadInput(f"checkpoint id {commit_hash!r} is ambiguous: give more digits")
    return found[0]


def reason_of(turn: api.Turn) -> str:
    """What a harness shows as the checkpoint's reason: the first line of the turn's message."""
    lines = turn.message.splitlines()
    return lines[0] if lines and lines[0] else f"turn {turn.number}"


def timestamp(seconds: float) -> str:
    """ISO 8601 in local time with its offset, as git's %aI prints it."""
    return datetime.fromtimestamp(seconds).astimezone().isoformat(timespec="seconds")


# -- paths ------------------------------------------------------------------------------------
def _normalize(path) -> Path:
    return Path(os.fspath(path)).expanduser().resolve()


def _too_broad(abs_dir: Path) -> bool:
    home = Path.home()
    return abs_dir in (Path("/"), home, home.resolve())


def _workspace(path: Path) -> api.Workspace | None:
    try:
        return api.Workspace(path)
    except NotMounted:
        return None


def _history_root(abs_dir: Path) -> Path | None:
    """The outermost directory at or above *abs_dir* (below `/` and the home directory) that
    holds a cowfs store: the history *abs_dir* belongs to, mounted or not."""
    found = None
    for candidate in (abs_dir, *abs_dir.parents):
        if _too_broad(candidate):
            break
        if (candidate / STORE_DIR).is_dir():
            found = candidate
    return found


def _mounts_below(abs_dir: Path) -> list[str]:
    from . import control
    inside = str(abs_dir).rstrip("/") + "/"
    return sorted(m.mountpoint for m in control.cowfs_mounts() if m.mountpoint.startswith(inside))


def _stores_below(root: Path) -> list[str]:
    """The cowfs stores below *root* (not at it), found by a walk that skips what
    noise.DEFAULT_NOISE names (virtualenvs, node_modules, .git: no project keeps a history
    there) and does not follow symlinks. Asked once, before a directory's history starts."""
    skip = {p.rstrip("/") for p in noise.DEFAULT_NOISE if p.endswith("/") and "*" not in p}
    found, todo = [], [root]
    while todo:
        here = todo.pop()
        try:
            entries = list(os.scandir(here))
        except OSError:
            continue
        for entry in entries:
            if entry.name in skip or not entry.is_dir(follow_symlinks=False):
                continue
            if entry.name == STORE_DIR:
                if here != root:
                    found.append(str(here))
                continue
            todo.append(Path(entry.path))
    return sorted(found)


_MADE: dict[int, str] = {}      # daemon pid -> mountpoint of the mounts this process made


def _unmount_made() -> None:
    """At exit: end the mounts this process made, wherever they are now (a busy one ends when
    idle, by its watcher)."""
    from . import control
    if not _MADE:
        return
    try:
        os.chdir("/")           # our own working directory would keep a mount busy
    except OSError:
        pass
    for pid, path in sorted(_MADE.items()):
        try:
            mount = control.mount_of_daemon(pid)
            if mount is None:
                continue        # ended already (idle)
            try:
                api.umount(mount.mountpoint)
            except CowfsError:  # busy: by files this very process still holds, as it exits?
                api.umount(mount.mountpoint, lazy=True)     # its daemon ends when they close
        except Exception as e:
            logger.warning("cowfs: %s stays mounted until idle: %s", path, e)
    _MADE.clear()


def _file_in(abs_dir: Path, file_path: str) -> Path:
    """The absolute path of *file_path*, relative to *abs_dir*; `BadInput` if it is empty,
    absolute, or leaves the directory (by `..` or through a symlink)."""
    if not isinstance(file_path, str) or not file_path.strip():
        raise BadInput("Empty file path")
    if os.path.isabs(file_path):
        raise BadInput(f"File path must be relative, got absolute path: {file_path!r}")
    joined = Path(os.path.normpath(abs_dir / file_path))
    for candidate in (joined, joined.resolve()):
        if candidate != abs_dir and abs_dir not in candidate.parents:
            raise BadInput(f"File path escapes the working directory {abs_dir} via traversal: "
                           f"{file_path!r}")
    return joined


class CheckpointManager:
    """Checkpoints of working directories, one per directory per turn, kept by cowfs.

    The interface of the shadow-git manager harnesses own (Hermes's
    `CheckpointManager`): call `new_turn()` when a conversation turn starts and
    `ensure_checkpoint(dir, reason)` before the first file-changing tool call.
    `max_snapshots` caps what `list_checkpoints` shows; the history itself is
    bounded by cowfs's retention, not here: `max_total_size_mb` becomes the
    store limit (`--max-store`) of the mounts this manager makes, applied after
    each checkpoint. `max_file_size_mb` is accepted for compatibility and
    ignored: cowfs keeps a changed file's old version as a reflink (a copy on
    ext4), so large files cost what changed. `idle_umount` (seconds, or "10m";
    None: never) ends the mounts this manager makes once idle that long.
    """

    def __init__(self, enabled: bool = True, max_snapshots: int = 50,
                 max_total_size_mb: int | None = None, max_file_size_mb: int | None = None,
                 idle_umount: float | str | None = IDLE_UMOUNT):
        self.enabled = enabled
        self.max_snapshots = max(1, int(max_snapshots))
        self.max_store = f"{int(max_total_size_mb)}M" if max_total_size_mb else None
        self.idle_umount = idle_umount
        self._checkpointed_dirs: set[Path] = set()
        self._sessions: set[tuple[str, int]] = set()    # (mount, pid) recorded as a harness session

    # -- turns --------------------------------------------------------------------------------
    def new_turn(self) -> None:
        """A new conversation turn: each directory may be checkpointed once again."""
        self._checkpointed_dirs.clear()

    def ensure_checkpoint(self, working_dir: str, reason: str = "auto") -> bool:
        """Make the state of *working_dir* now a checkpoint listed with *reason*, at most once per
        directory per turn. False when disabled, already done this turn, nothing changed since
        the last checkpoint, for `/` and the home directory, and on any failure (logged);
        never raises. A directory not under a cowfs mount is mounted first: the mount's turn 0
        is then this checkpoint."""
        if not self.enabled:
            return False
        try:
            abs_dir = _normalize(working_dir)
            if _too_broad(abs_dir):
                logger.debug("checkpoint skipped: %s is too broad", abs_dir)
                return False
            if abs_dir in self._checkpointed_dirs:
                return False
            self._checkpointed_dirs.add(abs_dir)
            return self._take(abs_dir, str(reason))
        except Exception as e:      # a checkpoint must never break the agent's tool call
            logger.warning("cowfs: no checkpoint of %s: %s", working_dir, e)
            return False

    def _take(self, abs_dir: Path, reason: str) -> bool:
        ws = _workspace(abs_dir)
        if ws is None:
            if not abs_dir.is_dir():
                logger.debug("checkpoint skipped: %s is not a directory", abs_dir)
                return False
            root = _history_root(abs_dir)
            inner = _mounts_below(abs_dir) or ([] if root else _stores_below(abs_dir))
            if inner:
                return self._refuse_around(abs_dir, inner, reason)
            ws, fresh = self._mount(root or abs_dir, reason)
            if fresh:
                return True
        self._begin_session(ws)
        ws.sync()
        status = ws.status()
        if status.pending_changes == 0:
            logger.debug("checkpoint skipped: nothing changed in %s since turn %d", abs_dir,
                         status.last_turn)
            return False
        turn = ws.checkpoint(reason)
        logger.info("cowfs: checkpoint %s of %s (turn %d): %s", _short(turn), abs_dir,
                    turn.number, reason)
        return True

    def _mount(self, root: Path, reason: str) -> tuple[api.Workspace, bool]:
        """Mount cowfs over *root* (which ends by itself once idle, or when this process exits);
        True with it when this started its history (then turn 0, named *reason*, is the
        checkpoint). A tree changed while unmounted is accepted, with a warning: the earlier
        checkpoints show those paths as they are now."""
        from . import mounting
        why_not = mounting.fuse_unavailable_reason(root)
        if why_not:
            raise OperationFailed(f"cowfs cannot serve {root} here: {why_not}")
        before = datetime.now().timestamp()
        options = {"message": reason, "max_store": self.max_store, "idle_umount": self.idle_umount}
        try:
            ws = api.mount(root, **options)
        except BadInput as e:
            if "--force to accept" not in str(e):      # changed while unmounted (drift)
                raise
            logger.warning("cowfs: %s: %s; accepted (the earlier checkpoints show those paths as "
                           "they are now)", root, e)
            ws = api.mount(root, force=True, **options)
        if not _MADE:
            atexit.register(_unmount_made)
        _MADE[ws.status().daemon_pid] = str(ws.path)
        self._begin_session(ws)
        fresh = ws.turns()[0].started >= before
        logger.info("cowfs: mounted %s to keep its checkpoints%s", root,
                    f"; its tree is checkpoint {_short(ws.turns()[0])}" if fresh else "")
        return ws, fresh

    def _checkpoint_of(self, working_dir: str, commit_hash: str
                       ) -> tuple[api.Workspace, api.Turn, str]:
        """The history of *working_dir*, the turn *commit_hash* names in it, and the directory
        relative to the history's root. The id is checked first: its error is the one callers
        look for, whatever the directory."""
        check_hash(commit_hash)
        abs_dir = _normalize(working_dir)
        ws = self._open(abs_dir)
        return ws, find_turn(ws, commit_hash), ws.relative(abs_dir)

    def _open(self, abs_dir: Path) -> api.Workspace:
        """The mounted history *abs_dir* belongs to, mounted again if it ended (idle)."""
        ws = _workspace(abs_dir)
        if ws is not None:
            return ws
        root = _history_root(abs_dir)
        if root is None or _mounts_below(abs_dir):
            raise NotMounted(f"no checkpoints exist for {abs_dir} (it is not under a cowfs mount)")
        return self._mount(root, "")[0]

    def _refuse_around(self, abs_dir: Path, inner: list[str], reason: str) -> bool:
        """*abs_dir* holds histories of its own directories (mounted or not): one history per
        directory tree, so it is not mounted around them (that would hide them and make their
        checkpoints unreachable); theirs are checkpointed instead."""
        for path in inner:
            self._take(Path(path), reason)
        logger.warning("cowfs: no checkpoint of %s as a whole: the cowfs histories of %s are "
                       "inside it, and were checkpointed instead (one history per directory "
                       "tree: checkpoint the project's root from the start to keep one of it "
                       "all)", abs_dir, ", ".join(inner))
        return False

    # -- looking back -------------------------------------------------------------------------
    def list_checkpoints(self, working_dir: str, all: bool = False) -> list[dict]:
        """The checkpoints of *working_dir*, newest first, at most `max_snapshots`: `hash`,
        `short_hash`, `timestamp` (ISO 8601), `reason`, and what the checkpoint changed since
        the one before it (`files_changed`, `insertions`, `deletions`, as git's --shortstat;
        the lines of a file over LINE_COUNT_LIMIT are not counted, as a binary file's), leaving
        out the changes in ignored paths (.gitignore, virtualenvs, node_modules, caches, build
        output: see cowfs.noise), counted in `ignored`; *all* counts them too.
        [] when there are none."""
        try:
            abs_dir = _normalize(working_dir)
            ws = self._open(abs_dir)
            sealed = [t for t in ws.turns() if t.sealed is not None]
            rel = ws.relative(abs_dir)
        except CowfsError as e:
            logger.debug("no checkpoints listed for %s: %s", working_dir, e)
            return []
        out = []
        for i in range(len(sealed) - 1, max(-1, len(sealed) - 1 - self.max_snapshots), -1):
            turn = sealed[i]
            entry = {"hash": turn_hash(turn), "short_hash": _short(turn),
                     "timestamp": timestamp(turn.sealed), "reason": reason_of(turn),
                     "files_changed": 0, "insertions": 0, "deletions": 0, "ignored": 0}
            if i > 0:
                entry.update(_shortstat(ws, sealed[i - 1], turn, rel, all))
            out.append(entry)
        return out

    def diff(self, working_dir: str, commit_hash: str, all: bool = False) -> dict:
        """What changed from checkpoint *commit_hash* to the live tree of *working_dir*:
        `{"success": True, "stat": git's --stat, "diff": a git-style patch, "ignored": N}`,
        paths relative to the directory, or `{"success": False, "error": ...}`. Changes in
        ignored paths (see `list_checkpoints`) are left out, the stat's last line says how many
        (`ignored`); *all* shows them."""
        try:
            ws, turn, rel = self._checkpoint_of(working_dir, commit_hash)
            shown = ws.shown_diff(turn.number, None, _only(ws, rel), include_ignored=all)
            diffs = _rebase(ws.file_diffs(turn.number, None, changes=shown.changes), rel)
            stat = patch.diffstat(diffs)
            note = noise.left_out(shown.ignored, "all=True")
            if note:
                stat += f" {note}\n"
            return {"success": True, "stat": stat, "diff": patch.patch(diffs), "ignored": shown.ignored}
        except (CowfsError, OSError) as e:
            return _failure(e)

    def session_diff(self, working_dir: str, all: bool = False) -> dict:
        """What changed in *working_dir* since its oldest listed checkpoint (the state before the
        agent's first edit), as `diff`, plus `baseline` (that checkpoint's id); with no
        checkpoint or no change since, a success with `"empty": True`."""
        try:
            ws = self._open(_normalize(working_dir))
            sealed = [t for t in ws.turns() if t.sealed is not None][-self.max_snapshots:]
        except CowfsError:
            sealed = []
        if not sealed:
            return {"success": True, "stat": "", "diff": "", "empty": True}
        baseline = turn_hash(sealed[0])
        result = self.diff(working_dir, baseline, all=all)
        if result.get("success"):
            result["baseline"] = baseline
            if not result["diff"]:
                result["empty"] = True
        return result

    # -- going back ---------------------------------------------------------------------------
    def restore(self, working_dir: str, commit_hash: str, file_path: str | None = None,
                safe: bool = False) -> dict:
        """Make *working_dir* (or one *file_path* in it) what it was at checkpoint *commit_hash*.

        The state before is made a checkpoint first ("pre-rollback snapshot"), so the restore
        can be undone like any other. The whole directory: exactly the checkpoint's tree (a
        rollback when it is the mount's root; later files are removed). *safe* (whole
        directory only, as in the shadow-git manager): only the agent's changes are reverted,
        by the rule of `cowfs.agent`. Success: `success`, `restored_to` (short id), `reason`
        (the checkpoint's), `directory`, plus `file`, or `restored_files` and
        `skipped_user_edits` (relative to the directory) for a safe restore that could tell the
        agent apart. Failure: `success` False and `error`; nothing was touched.
        """
        try:
            check_hash(commit_hash)
            abs_dir = _normalize(working_dir)
            if file_path:
                _file_in(abs_dir, file_path)
            ws = self._open(abs_dir)
            turn = find_turn(ws, commit_hash)
            if file_path:
                return self._restore_file(ws, turn, abs_dir, file_path)
            if safe:
                return self._safe_restore(ws, turn, abs_dir)
            return self._restore_tree(ws, turn, abs_dir)
        except (CowfsError, OSError) as e:
            return _failure(e)

    def _restore_file(self, ws: api.Workspace, turn: api.Turn, abs_dir: Path, file_path: str) -> dict:
        target = _file_in(abs_dir, file_path)
        rel = ws.relative(target)
        then = ws.snapshot_path(turn.number)
        if not os.path.lexists(then / rel) and not os.path.lexists(target):
            raise BadInput(f"{file_path} is neither in checkpoint {_short(turn)} nor in {abs_dir}")
        if not agent.is_dir_at(then, agent.parent(rel)):
            raise BadInput(f"{agent.parent(rel)}/ did not exist at checkpoint {_short(turn)}: "
                           f"restore the directory instead")
        self._checkpoint_before(ws, turn)
        ws.restore(turn.number, [target])
        return {**_restored(turn, abs_dir), "file": file_path}

    def _restore_tree(self, ws: api.Workspace, turn: api.Turn, abs_dir: Path) -> dict:
        rel = ws.relative(abs_dir)
        if not agent.is_dir_at(ws.snapshot_path(turn.number), rel):
            raise BadInput(f"{abs_dir} did not exist at checkpoint {_short(turn)}")
        self._checkpoint_before(ws, turn)
        if rel:
            ws.restore(turn.number, [abs_dir])
        else:
            ws.rollback(turn.number)
        return _restored(turn, abs_dir)

    def _safe_restore(self, ws: api.Workspace, turn: api.Turn, abs_dir: Path) -> dict:
        """Revert the agent's changes since *turn* and keep the user's (`cowfs.agent` decides
        which is which). A file the agent created is removed (and the directories it made for
        it, once empty), one it deleted comes back, one it renamed goes back to its old name.
        With nothing to tell the agent by, a full restore, as the shadow-git manager does."""
        rel = ws.relative(abs_dir)
        self._begin_session(ws)
        plan = ws.safe_restore_plan(turn.number, _only(ws, rel))
        if plan.full:
            return self._restore_tree(ws, turn, abs_dir)
        result = {**_restored(turn, abs_dir), "restored_files": _relative_to(plan.agent, rel),
                  "skipped_user_edits": _relative_to(plan.user, rel), "skipped_oversize": []}
        if not plan.agent:
            return {**result, "reason": "nothing to restore (all changed files were user-edited)"}
        self._checkpoint_before(ws, turn)
        then = ws.snapshot_path(turn.number)
        orphans = [p for p in plan.agent
                   if not os.path.lexists(then / p) and not agent.is_dir_at(then, agent.parent(p))]
        for path in sorted(orphans):
            agent.remove_with_new_parents(ws.path, then, path, rel)
        in_place = sorted(set(plan.agent).difference(orphans))
        if in_place:
            ws.restore(turn.number, [ws.path / p for p in in_place])
        return result

    def safe_restore_plan(self, working_dir: str, commit_hash: str) -> dict:
        """What a safe restore to *commit_hash* would do, touching nothing: `{"success": True,
        "restore": [...], "skipped": [...]}` (relative to *working_dir*), or with
        `"ledger_empty": True` (and both empty) when nothing tells the agent apart and a safe
        restore restores everything; `{"success": False, "error": ...}` for a bad id."""
        try:
            ws, turn, rel = self._checkpoint_of(working_dir, commit_hash)
            plan = ws.safe_restore_plan(turn.number, _only(ws, rel))
        except (CowfsError, OSError) as e:
            return _failure(e)
        if plan.full:
            return {"success": True, "restore": [], "skipped": [], "ledger_empty": True}
        return {"success": True, "restore": _relative_to(plan.agent, rel),
                "skipped": _relative_to(plan.user, rel)}

    def _checkpoint_before(self, ws: api.Workspace, turn: api.Turn) -> None:
        ws.sync()
        if ws.status().pending_changes:
            ws.checkpoint(f"pre-rollback snapshot (restoring to {_short(turn)})")

    # -- what the harness knows ---------------------------------------------------------------
    def _begin_session(self, ws: api.Workspace) -> None:
        """This process is a harness session of *ws*: recorded in its store once per process."""
        key = (str(ws.path), os.getpid())
        if key not in self._sessions:
            ws.begin_harness_session()
            self._sessions.add(key)

    def record_agent_write(self, file_path: str) -> None:
        """The harness's write tool just wrote *file_path*: a safe restore reverts it while its
        content is still this and no other process changed it since. Kept in the workspace's
        store, so a later harness process knows it too. Call it right after the write. A file
        not under a cowfs mount is not recorded (no checkpoint could restore it). Never raises."""
        if not self.enabled:
            return
        try:
            path = _normalize(file_path)
            ws = self._open(path)
            self._begin_session(ws)
            ws.record_agent_write(path)
        except Exception as e:      # bookkeeping must never break the agent's tool call
            logger.debug("record_agent_write(%s) not recorded: %s", file_path, e)

    def get_working_dir_for_path(self, file_path: str) -> str:
        """The directory to checkpoint for a change to *file_path*: the root of the cowfs mount
        holding it, else the nearest enclosing project (a directory with .git, pyproject.toml,
        package.json, ...) below the home directory, else the file's directory."""
        path = _normalize(file_path)
        start = path if path.is_dir() else path.parent
        ws = _workspace(start)
        if ws is not None:
            return str(ws.path)
        home = Path.home().resolve()
        for candidate in (start, *start.parents):
            if candidate == home or candidate in home.parents:
                break
            if any((candidate / marker).exists() for marker in PROJECT_MARKERS):
                return str(candidate)
        return str(start)


# -- can cowfs serve here ---------------------------------------------------------------------
@dataclass(frozen=True)
class Availability:
    """Whether cowfs can keep checkpoints of a directory here; if not, `reason` says why in one
    line. True as a bool when it can."""
    ok: bool
    reason: str | None = None

    def __bool__(self) -> bool:
        return self.ok


def available(path) -> Availability:
    """Can cowfs keep checkpoints of directory *path* on this machine? Not without /dev/fuse (a
    container started without it), without fusermount3 (without root), over another FUSE
    filesystem, or for what is not a directory. A harness keeps its shadow-git manager as the
    fallback:

        from cowfs import compat
        if os.environ.get("HERMES_CHECKPOINT_BACKEND") == "cow" and compat.available(cwd):
            CheckpointManager = compat.CheckpointManager
    """
    from . import mounting
    reason = mounting.fuse_unavailable_reason(path)
    return Availability(reason is None, reason)


# -- housekeeping -----------------------------------------------------------------------------
def store_status(checkpoint_base=None, *, working_dir: str | None = None) -> dict:
    """The cowfs stores behind checkpoints: every cowfs mount this process sees (or only the one
    holding *working_dir*), each with its size, checkpoints and oldest checkpoint kept.

        {"base": None, "store_size_bytes": N, "total_size_bytes": N, "project_count": N,
         "projects": [{"hash", "workdir", "exists", "store_size_bytes", "turns", "commits",
                       "oldest_turn", "created_at", "last_touch", "capture_mode"}
                      or {"hash", "workdir", "error"}, ...],
         "legacy_size_bytes": 0, "pre_v2_projects": [], "legacy_archives": []}

    *checkpoint_base* (the shadow-git store's directory) is accepted and has no meaning here:
    each workspace's store is its own `.cowfs/`. `turns` (and `commits`, the shadow-git name)
    count the checkpoints kept; `created_at` and `last_touch` are the oldest and newest
    checkpoint's times; `hash` names the project as the shadow-git manager does (16 hex digits
    of its path). The shadow-git layouts' leftovers (`legacy_*`, `pre_v2_projects`) are always
    empty. Never raises.
    """
    from . import control
    if working_dir is None:
        roots = [m.mountpoint for m in control.cowfs_mounts()]
    else:
        ws = _workspace(_normalize(working_dir))
        roots = [] if ws is None else [str(ws.path)]
    projects = [_project_status(root) for root in roots]
    size = sum(p.get("store_size_bytes", 0) for p in projects)
    return {"base": None, "store_size_bytes": size, "total_size_bytes": size,
            "project_count": len(projects), "projects": projects, "legacy_size_bytes": 0,
            "pre_v2_projects": [], "legacy_archives": []}


def prune(working_dir: str, keep: int | None = None, older_than: float | str | None = None,
          max_store: int | str | None = None, dry_run: bool = False) -> dict:
    """Free the store of the cowfs mount holding *working_dir* of its oldest checkpoints:
    keep the newest *keep*, drop those older than *older_than* ("7d", seconds), or the oldest
    until the store fits *max_store* ("2G", bytes), as `cowfs prune` does. Never raises:

        {"success": True, "removed": [turn numbers], "oldest_turn": N, "freed_bytes": N}
        {"success": False, "error": "..."}
    """
    try:
        ws = _workspace(_normalize(working_dir))
        if ws is None:
            raise NotMounted(f"{working_dir} is not under a cowfs mount")
        result = ws.prune(keep=keep, older_than=older_than, max_store=max_store, dry_run=dry_run)
    except (CowfsError, OSError) as e:
        return _failure(e)
    return {"success": True, "removed": result.removed, "oldest_turn": result.oldest,
            "freed_bytes": result.freed_bytes, "dry_run": result.dry_run}


def prune_checkpoints(retention_days: int = 7, delete_orphans: bool = True, checkpoint_base=None,
                      max_total_size_mb: int = 0, orphan_allowlist=None) -> dict:
    """The shadow-git store's sweep, for cowfs: in every cowfs mount this process sees, prune the
    checkpoints sealed more than *retention_days* ago (the newest one always stays) and, with
    *max_total_size_mb*, the oldest until each store fits. A cowfs store lives in its workspace,
    so there are no orphan projects (`deleted_orphan` is 0; *delete_orphans*, *orphan_allowlist*
    and *checkpoint_base* have nothing to act on). `deleted_stale` counts the checkpoints
    pruned. Never raises:

        {"scanned": mounts, "deleted_orphan": 0, "deleted_stale": N, "errors": N, "bytes_freed": N}
    """
    from . import control
    out = {"scanned": 0, "deleted_orphan": 0, "deleted_stale": 0, "errors": 0, "bytes_freed": 0}
    older = f"{int(retention_days)}d" if retention_days and retention_days > 0 else None
    store = f"{int(max_total_size_mb)}M" if max_total_size_mb and max_total_size_mb > 0 else None
    try:
        mounts = control.cowfs_mounts()
    except Exception as e:      # maintenance must never break a harness's start
        logger.debug("cowfs: no mounts to prune: %s", e)
        return out
    for m in mounts:
        out["scanned"] += 1
        if older is None and store is None:
            continue
        result = prune(m.mountpoint, older_than=older, max_store=store)
        if not result["success"]:
            out["errors"] += 1
            continue
        out["deleted_stale"] += len(result["removed"])
        out["bytes_freed"] += result["freed_bytes"]
    return out


def maybe_auto_prune_checkpoints(retention_days: int = 7, min_interval_hours: int = 24,
                                 delete_orphans: bool = True, checkpoint_base=None,
                                 max_total_size_mb: int = 0) -> dict:
    """`prune_checkpoints` for a harness's start: `{"skipped": False, "result": ...}`. It is not
    rate-limited (*min_interval_hours* is accepted): a cowfs prune costs what it frees."""
    return {"skipped": False, "result": prune_checkpoints(retention_days, delete_orphans,
                                                          checkpoint_base, max_total_size_mb)}


def clear_all(checkpoint_base=None) -> dict:
    """Drop every checkpoint but the newest of every cowfs mount this process sees (a workspace's
    files are its newest state: nothing else can be deleted). `{"bytes_freed": N, "deleted": bool}`."""
    from . import control
    out = {"bytes_freed": 0, "deleted": False}
    for m in control.cowfs_mounts():
        result = prune(m.mountpoint, keep=1)
        if result["success"] and result["removed"]:
            out["bytes_freed"] += result["freed_bytes"]
            out["deleted"] = True
    return out


def clear_legacy(checkpoint_base=None) -> dict:
    """The shadow-git store's archives of older layouts: cowfs has none.
    `{"bytes_freed": 0, "deleted": 0}`."""
    return {"bytes_freed": 0, "deleted": 0}


def format_checkpoint_list(checkpoints: list[dict], directory: str) -> str:
    """The checkpoints `list_checkpoints` returned, numbered for a person to pick one."""
    if not checkpoints:
        return f"No checkpoints found for {directory}"
    lines = [f"Checkpoints of {directory} (newest first):", ""]
    for i, cp in enumerate(checkpoints, 1):
        when = cp["timestamp"][:16].replace("T", " ")
        n = cp.get("files_changed", 0)
        counts = (f"  ({n} file{'' if n == 1 else 's'}, +{cp.get('insertions', 0)}"
                  f"/-{cp.get('deletions', 0)})") if n else ""
        lines.append(f"  {i}. {cp['short_hash']}  {when}  {cp['reason']}{counts}")
    return "\n".join(lines)


def _project_status(root: str) -> dict:
    ident = hashlib.sha256(root.encode()).hexdigest()[:16]
    try:
        ws = api.Workspace(root)
        status = ws.status()
        sealed = [t for t in ws.turns() if t.sealed is not None]
    except CowfsError as e:
        return {"hash": ident, "workdir": root, "exists": os.path.isdir(root), "error": str(e)}
    return {"hash": ident, "workdir": root, "exists": True, "store_size_bytes": status.store_bytes,
            "turns": len(sealed), "commits": len(sealed), "oldest_turn": sealed[0].number,
            "created_at": sealed[0].sealed, "last_touch": sealed[-1].sealed,
            "capture_mode": status.capture_mode}


# -- helpers ----------------------------------------------------------------------------------
def _only(ws: api.Workspace, rel: str) -> tuple[str, ...]:
    """The diff filter for a working directory *rel* below the mount root ("" is the root)."""
    return (str(ws.path / rel),) if rel else ()


def _short(turn: api.Turn) -> str:
    return turn_hash(turn)[:SHORT_LENGTH]


def _restored(turn: api.Turn, abs_dir: Path) -> dict:
    return {"success": True, "restored_to": _short(turn), "reason": reason_of(turn),
            "directory": str(abs_dir)}


def _failure(e: Exception) -> dict:
    return {"success": False, "error": str(e) if isinstance(e, CowfsError) else f"failed: {e}"}


def _relative_to(paths: list[str], rel: str) -> list[str]:
    """Paths relative to the mount root, made relative to the working directory *rel*."""
    return [os.path.relpath(p, rel) if rel else p for p in paths]


def _rebase(diffs: list[patch.FileDiff], rel: str) -> list[patch.FileDiff]:
    if not rel:
        return diffs
    return [replace(fd, path=os.path.relpath(fd.path, rel),
                    old_path=None if fd.old_path is None else os.path.relpath(fd.old_path, rel))
            for fd in diffs]


def _shortstat(ws: api.Workspace, a: api.Turn, b: api.Turn, rel: str, everything: bool) -> dict:
    """What turn *b* changed since turn *a* below *rel*, as git's --shortstat counts it, and
    how many changes in ignored paths were left out (no counts if that cannot be told: a turn
    pruned meanwhile, say)."""
    try:
        shown = ws.shown_diff(a.number, b.number, _only(ws, rel), include_ignored=everything)
        diffs = ws.file_diffs(a.number, b.number, max_size=LINE_COUNT_LIMIT, changes=shown.changes)
    except (CowfsError, OSError) as e:
        logger.debug("no counts for checkpoint %s: %s", _short(b), e)
        return {}
    for fd in diffs:
        patch.file_patch(fd)        # counts its lines
    return {"files_changed": len(diffs), "insertions": sum(fd.insertions for fd in diffs),
            "deletions": sum(fd.deletions for fd in diffs), "ignored": shown.ignored}
