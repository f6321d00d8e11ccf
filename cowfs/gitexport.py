"""Git export: every sealed turn as one git commit, streamed into `git fast-import`.

Owns how layers become fast-import commands, the checks of a target
repository, the turn -> commit mapping (kept in the catalogue), and how an
export runs inside the daemon: one at a time, in a worker thread with its
own catalogue connection and its own snapshot view, so FUSE requests go on.

Layer k says exactly what changed between turn k-1 and turn k, so a commit
costs O(what changed in its turn), not O(tree): each changed entry (D, name)
becomes `D old-path` and `M` lines for whatever the entry holds in turn k
(the whole subtree of a directory that arrived there: that part is O(subtree)
by nature); each file whose content or exec bit changed in place becomes an
`M` under each name it had at the end of the turn. Only the first exported
turn of a branch is written whole (`deleteall` and a walk of its snapshot).

What git cannot hold is left out and counted: FIFOs, sockets and devices;
empty directories; anything under a directory named `.git` (git refuses to
check such paths out, and `git fsck` flags them).

Commits are deterministic (tree, message, dates and parent all come from the
store), so exporting the same turns again gives the same commits.
"""

import logging
import os
import pwd
import shutil
import stat
import subprocess
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import trio

from . import libc
from .catalogue import Catalogue
from .history import TurnTrees, join as _join, under_dot_git as _under_dot_git
from .snapshot import SnapObject, SnapshotView
from .store import STORE_NAME, ObjectRef, Store

log = logging.getLogger(__name__)

DEFAULT_BRANCH = "cowfs"
DEFAULT_REPO = b"git"                    # inside the store: .cowfs/git
DEFAULT_KEY = STORE_NAME + b"/" + DEFAULT_REPO   # mapping key: moves with the workspace
IDENTITY = b"cowfs <cowfs@localhost>"
TRAILER = "Cowfs-Turn"
CHUNK = 1 << 20
SMALL_FILE = 1 << 20        # live content up to this size is read into memory, not cloned

# What `M` says for each kind of object git can hold.
MODE_FILE, MODE_EXEC, MODE_LINK = b"100644", b"100755", b"120000"
OTHER_KINDS = "FIFO/socket/device"
DOT_GIT = ".git"


class TargetError(Exception):
    """The target repository or branch is not acceptable (bad input); one line."""


class ExportError(Exception):
    """The export failed; nothing was changed in the target repository. One line."""


class ExportStopped(ExportError):
    """The daemon is shutting down; the turns not exported are exported next time."""


@dataclass(frozen=True)
class Target:
    git_dir: bytes          # absolute, in the mount namespace git runs in
    key: bytes              # the repository's key in the turn -> commit mapping
    branch: str
    shown: str              # how to name the repository to the user
    namespace: int | None = None         # descriptor of that namespace; None: this process's
    owner: tuple[int, int] | None = None  # (uid, gid) to run git as there; None: as ourselves


@dataclass
class TurnExport:
    turn: int
    sha: str
    written: int = 0         # paths whose blob was sent (files and symlinks)
    deleted: int = 0
    empty_dirs: int = 0      # empty directories that appeared in this turn
    left_out: Counter = field(default_factory=Counter)   # kind -> count


@dataclass
class ExportResult:
    repo: str
    branch: str
    turns: list[TurnExport]
    tip: tuple[int, str] | None      # (turn, sha) of the branch's last commit

    def as_dict(self) -> dict:
        return {"repo": self.repo, "branch": self.branch, "tip": self.tip,
                "turns": [{"turn": t.turn, "sha": t.sha, "written": t.written, "deleted": t.deleted,
                           "empty_dirs": t.empty_dirs, "left_out": dict(t.left_out)}
                          for t in self.turns]}


# -- running git ----------------------------------------------------------------------------
def _git_env(uid: int | None) -> dict:
    # The daemon's environment came from whoever mounted: GIT_DIR and friends
    # there must not redirect the export.
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    if uid is not None:
        try:
            env["HOME"] = pwd.getpwuid(uid).pw_dir
        except KeyError:
            env["HOME"] = "/"
        env.pop("XDG_CONFIG_HOME", None)
    return env


def git_command(target: Target | None, *args) -> tuple[list, dict]:
    """argv and Popen arguments running `git ARGS` on *target* (no target: no repository).

    A repository named with `--to` is reached in the mount namespace of the
    CLI that named it (the daemon's own keeps only the mounts it needs), and
    written as its owner, so that the new files belong to them and git's
    safe.directory check passes. cwd "/": the daemon's own cwd may lie under
    its mount, which it must never enter.
    """
    argv = ["git"] + ([b"--git-dir=" + target.git_dir] if target is not None else []) + list(args)
    owner = target.owner if target is not None else None
    # umask: the daemon's is 0 (it creates files for others); git's files get git's usual modes.
    kwargs = {"cwd": "/", "env": _git_env(owner[0] if owner else None), "umask": 0o022}
    if target is None or target.namespace is None:
        return argv, kwargs
    prefix = ["nsenter", f"--mount=/proc/self/fd/{target.namespace}"]
    if owner:
        prefix += ["-S", str(owner[0]), "-G", str(owner[1])]    # and no supplementary groups
    return prefix + ["--"] + argv, {**kwargs, "pass_fds": (target.namespace,)}


NO_GIT = "git is not installed: the export to git needs it (install git)"


def git(target: Target | None, *args, check: bool = True) -> subprocess.CompletedProcess:
    argv, kwargs = git_command(target, *args)
    try:
        result = subprocess.run(argv, capture_output=True, **kwargs)
    except FileNotFoundError:
        raise TargetError(NO_GIT if argv[0] == "git" else f"{argv[0]} is not installed") from None
    if check and result.returncode != 0:
        raise ExportError(f"git {os.fsdecode(args[0])} failed: {_last_line(result.stderr)}")
    return result


def _last_line_of(file) -> str:
    file.seek(0)
    return _last_line(file.read())


def _last_line(data: bytes) -> str:
    lines = [line for line in data.decode(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no message"


# -- targets --------------------------------------------------------------------------------
def check_branch(branch: str) -> None:
    if not branch or git(None, "check-ref-format", "--branch", branch, check=False).returncode:
        raise TargetError(f"{branch!r} is not a valid branch name")


def _inside(path: str, roots: list[str]) -> str | None:
    for root in roots:
        root = root.rstrip("/")
        if path == root or path.startswith(root + "/"):
            return root
    return None


def resolve_target(repo: str, branch: str, forbidden: list[str]) -> str:
    """Check `--to REPO --branch BRANCH` where the user named them; the git directory's real path.

    *forbidden* are the mount point and the backing directory. Runs in the CLI
    (bad input: exit code 2); the daemon checks again (named_target).
    """
    check_branch(branch)
    real = os.path.realpath(repo)
    root = _inside(real, forbidden)
    if root is None and os.path.isdir(real):
        # A root CLI asks about a user's repository: ownership is not the question here.
        found = git(None, "-c", "safe.directory=*", "-C", real, "rev-parse", "--absolute-git-dir",
                    check=False)
        if found.returncode == 0:
            git_dir = os.path.realpath(os.fsdecode(found.stdout.rstrip(b"\n")))
            root = _inside(git_dir, forbidden)
            if root is None:
                _refuse_checked_out(Target(os.fsencode(git_dir), b"", branch, repo))
                return git_dir
    if root is not None:
        raise TargetError(f"{repo} is inside the cowfs workspace {root}: writing there would "
                          "bypass cowfs (use a repository outside it)")
    raise TargetError(f"{repo} is not a git repository")


def named_target(git_dir: str, branch: str, forbidden: list[str], pid: int) -> Target:
    """The daemon's side of `--to`: *git_dir* as resolved by the CLI of process *pid*.

    The caller closes Target.namespace.
    """
    check_branch(branch)
    root = _inside(git_dir, forbidden)
    if root is not None:
        raise TargetError(f"{git_dir} is inside the cowfs workspace {root}: writing there would "
                          "bypass cowfs (use a repository outside it)")
    try:
        namespace = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        st = os.stat(f"/proc/{pid}/root{git_dir}")
    except OSError as e:
        raise TargetError(f"cannot reach {git_dir} from the cowfs daemon: {e.strerror}") from None
    if os.stat(namespace).st_ino == os.stat("/proc/self/ns/mnt").st_ino:
        # A rootless daemon shares the CLI's namespace (and could not nsenter anyway).
        os.close(namespace)
        namespace = None
    owner = (st.st_uid, st.st_gid) if os.geteuid() == 0 and st.st_uid != 0 else None
    target = Target(os.fsencode(git_dir), os.fsencode(git_dir), branch, git_dir, namespace, owner)
    try:
        if git(target, "rev-parse", "--git-dir", check=False).returncode != 0:
            raise TargetError(f"{git_dir} is not a git repository")
        _refuse_checked_out(target)
    except BaseException:
        if namespace is not None:
            os.close(namespace)
        raise
    return target


def _refuse_checked_out(target: Target) -> None:
    # Moving a branch that a worktree has checked out would make its files look changed.
    listing = git(target, "-c", "safe.directory=*", "worktree", "list", "--porcelain", check=False)
    if f"branch refs/heads/{target.branch}\n".encode() in listing.stdout + b"\n":
        raise TargetError(f"branch {target.branch} is checked out in {target.shown}; "
                          "export to another --branch")


def default_target(store_path: bytes, branch: str, shown: bytes) -> Target:
    """The bare repository inside the store (ExportRunner.prepare created it)."""
    check_branch(branch)
    git_dir = store_path.rstrip(b"/") + b"/" + DEFAULT_REPO
    return Target(git_dir, DEFAULT_KEY, branch, os.fsdecode(shown.rstrip(b"/") + b"/" + DEFAULT_REPO))


def create_default_repo(store_path: bytes) -> None:
    """The store's bare repository, made before mounting: `git init` resolves the real path of
    the directory it makes, which under the mount would be hidden (and the daemon's own).
    Without git, nothing: only the export needs it (ExportRunner._export says so)."""
    git_dir = store_path.rstrip(b"/") + b"/" + DEFAULT_REPO
    if not os.path.isdir(git_dir) and shutil.which("git", path=_git_env(None).get("PATH")):
        git(None, "init", "--quiet", "--bare", git_dir)


# -- fast-import syntax ---------------------------------------------------------------------
_PLAIN = frozenset(range(0x20, 0x7f)) - {ord('"'), ord("\\")}


def quote_path(path: bytes) -> bytes:
    """A C-style quoted path for fast-import; names are bytes and are never decoded."""
    out = bytearray(b'"')
    for byte in path:
        if byte in _PLAIN:
            out.append(byte)
        elif byte in (ord('"'), ord("\\")):
            out += b"\\" + bytes([byte])
        else:
            out += b"\\%03o" % byte
    return bytes(out + b'"')


def _mark(turn: int) -> int:
    return turn + 1       # fast-import marks start at 1


def _git_mode(mode: int) -> bytes | None:
    if stat.S_ISREG(mode):
        return MODE_EXEC if mode & 0o111 else MODE_FILE
    if stat.S_ISLNK(mode):
        return MODE_LINK
    return None


# -- one turn's changes -----------------------------------------------------------------------
@dataclass
class TurnChanges:
    full: bool
    deletes: set[bytes] = field(default_factory=set)
    puts: dict[bytes, tuple[SnapObject, int]] = field(default_factory=dict)   # path -> (obj, mode)
    empty_dirs: set[bytes] = field(default_factory=set)
    left_out: Counter = field(default_factory=Counter)

    def put(self, path: bytes, obj: SnapObject, mode: int) -> None:
        if _git_mode(mode) is None:
            self.left_out[OTHER_KINDS] += 1
        else:
            self.puts[path] = (obj, mode)

    def dot_git(self, path: bytes) -> None:
        self.left_out[DOT_GIT] += 1


class TurnDiff:
    """What a commit must say for one turn: from layer k (incremental) or a whole walk."""

    def __init__(self, trees: TurnTrees, store: Store):
        self.trees = trees
        self.view = trees.view
        self.catalogue = trees.catalogue
        self.store = store

    def whole(self, turn: int) -> TurnChanges:
        changes = TurnChanges(full=True)
        root = self.trees.root(turn)
        self._put_tree(changes, turn, b"", root.ino, root.handle, os.stat(
            self.view.object_fd(root.ino, root.handle)))
        return changes

    def _put_tree(self, changes: TurnChanges, turn: int, path: bytes, ino: int, handle: bytes,
                  st: os.stat_result) -> None:
        for found, obj, mode in self.trees.walk(turn, path, ino, handle, st,
                                                changes.empty_dirs.add, changes.dot_git):
            changes.put(found, obj, mode)

    def incremental(self, turn: int) -> TurnChanges:
        """Turn *turn* against turn - 1, from layer *turn* alone."""
        changes = TurnChanges(full=False)
        for parent, name, before in self.catalogue.entry_changes(turn):
            self._entry(changes, turn, parent, name, before)
        self._objects(changes, turn)
        return changes

    def _entry(self, changes: TurnChanges, turn: int, parent: int, name: bytes,
               before: int | None) -> None:
        handle = self.catalogue.ref(parent)
        if before is not None:
            old_dir = self.trees.dir_path(turn - 1, parent, handle)
            if old_dir is not None and not _under_dot_git(_join(old_dir, name)):
                changes.deletes.add(_join(old_dir, name))
        new_dir = self.trees.dir_path(turn, parent, handle)
        if new_dir is None:
            return
        path = _join(new_dir, name)
        try:
            ino, obj_handle, st = self.view.child(turn, SnapObject(turn, parent, handle), name)
        except FileNotFoundError:
            if new_dir and self.trees.is_empty(turn, parent, handle):
                changes.empty_dirs.add(new_dir)
            return
        self._put_tree(changes, turn, path, ino, obj_handle, st)

    def _objects(self, changes: TurnChanges, turn: int) -> None:
        """Files whose content or exec bit changed in place: under every name they had at the
        end of the turn (a walk of the turn finds them when that is the only way)."""
        elsewhere: set[int] = set()
        for ino, mode_before, content_changed, hint in self.catalogue.object_changes(turn):
            if not stat.S_ISREG(mode_before):
                continue      # directories, symlinks, FIFOs: nothing git sees changes in place
            handle = self.catalogue.ref(ino)
            st = os.stat(self.view.object_fd(ino, handle))
            mode = self.view.attrs(turn, ino, st).mode
            if not content_changed and _git_mode(mode) == _git_mode(mode_before):
                continue      # owner, mtime, xattrs, other mode bits: invisible to git
            names = self.trees.names_of(turn, ino, handle, st, hint)
            if names is None:
                elsewhere.add(ino)
                continue
            for path in names:
                if not _under_dot_git(path):
                    changes.put(path, SnapObject(turn, ino, handle), mode)
        if elsewhere:
            self._find_and_put(changes, turn, elsewhere)

    def _find_and_put(self, changes: TurnChanges, turn: int, inos: set[int]) -> None:
        # The fallback for hard links and missing hints: one walk of the turn's
        # tree, names and stats only (contents are read for the found ones alone).
        root = self.trees.root(turn)
        st = os.stat(self.view.object_fd(root.ino, root.handle))
        for path, obj, mode in self.trees.walk(turn, b"", root.ino, root.handle, st,
                                               lambda path: None, lambda path: None):
            if obj.ino in inos:
                changes.put(path, obj, mode)


# -- the export -------------------------------------------------------------------------------
class Exporter:
    """One export run: every sealed turn not yet on the branch, into one fast-import process."""

    def __init__(self, store: Store, catalogue: Catalogue, view: SnapshotView, root_path: bytes,
                 stop: threading.Event | None = None):
        self.store = store
        self.catalogue = catalogue
        self.view = view
        self.trees = TurnTrees(view, store, root_path)
        self.diff = TurnDiff(self.trees, store)
        self.stop = stop or threading.Event()

    def run(self, target: Target) -> ExportResult:
        self.catalogue.ensure_git_exports()
        key, branch = target.key, os.fsencode(target.branch)
        last = self._last_exported(target)
        turns = {t.number: t for t in self.catalogue.turns() if t.sealed is not None}
        todo = [n for n in sorted(turns) if last is None or n > last[0]]
        oldest = self.catalogue.oldest_turn()     # its layer was pruned with the turns before it
        result = ExportResult(target.shown, target.branch, [], last)
        if not todo:
            return result
        # Its stderr goes to an unnamed file in the store: /tmp may not exist in our namespace.
        errors = os.fdopen(os.open(self.store.path, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600),
                           "w+b")
        argv, kwargs = git_command(target, "fast-import", "--quiet", "--date-format=raw", "--done")
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors,
                                **kwargs)
        recorded = False
        try:
            parent = last
            parent_ref = last[1].encode() if last else None   # later: marks, within this stream
            for n in todo:
                full = parent is None or parent[0] != n - 1 or n <= oldest
                changes = self.diff.whole(n) if full else self.diff.incremental(n)
                sha = self._commit(proc, errors, target, turns[n], changes, parent_ref)
                parent_ref = b":%d" % _mark(n)
                result.turns.append(TurnExport(n, sha, len(changes.puts), len(changes.deletes),
                                               len(changes.empty_dirs), changes.left_out))
                parent = (n, sha)
                self.trees.forget(keep={n})
            # The mapping is written before git moves the branch: if we die in
            # between, the branch is behind the mapping, and the next run drops
            # the rows after the branch's tip and exports those turns again.
            self.catalogue.record_exports(key, branch, [(t.turn, t.sha) for t in result.turns])
            recorded = True
            proc.stdin.write(b"done\n")
            proc.stdin.close()
            if proc.wait() != 0:
                raise ExportError(f"git fast-import failed: {_last_line_of(errors)}")
        except BaseException:
            # With --done, git writes nothing (no branch move) for an unfinished stream.
            proc.kill()
            proc.wait()
            if recorded:
                self.catalogue.forget_exports(key, branch, after=last[0] if last else -1)
            raise
        finally:
            proc.stdout.close()
            errors.close()
        result.tip = parent
        return result

    def _last_exported(self, target: Target) -> tuple[int, str] | None:
        """(turn, sha) at the branch's tip, None for a new branch; refuses a branch moved by others."""
        key, branch = target.key, os.fsencode(target.branch)
        found = git(target, "rev-parse", "--verify", "--quiet",
                    f"refs/heads/{target.branch}^{{commit}}", check=False)
        if found.returncode != 0:
            # No such branch (never made, or deleted since): export from the
            # start. Commits are deterministic, so the same turns give the same commits.
            self.catalogue.forget_exports(key, branch)
            return None
        tip = found.stdout.decode().strip()
        turn = self.catalogue.exported_turn(key, branch, tip)
        if turn is None:
            raise ExportError(
                f"branch {target.branch} of {target.shown} is at {tip[:7]}, which is not a commit "
                f"exported from this workspace (moved by someone else?); refusing to rewrite it: "
                f"export to another --branch")
        self.catalogue.forget_exports(key, branch, after=turn)
        return turn, tip

    # -- writing one commit --------------------------------------------------------------------
    def _commit(self, proc, errors, target: Target, turn, changes: TurnChanges,
                parent_ref: bytes | None) -> str:
        out = proc.stdin
        mark = _mark(turn.number)
        when = b"%d +0000" % int(turn.sealed)
        message = (turn.message or f"turn {turn.number}").rstrip("\n")
        message = f"{message}\n\n{TRAILER}: {turn.number}\n".encode()
        out.write(b"commit refs/heads/%s\nmark :%d\n" % (os.fsencode(target.branch), mark))
        out.write(b"author %s %s\ncommitter %s %s\n" % (IDENTITY, when, IDENTITY, when))
        out.write(b"data %d\n%s" % (len(message), message))
        if parent_ref is not None:
            out.write(b"from %s\n" % parent_ref)
        if changes.full:
            out.write(b"deleteall\n")
        # Deletions first: a path deleted and then filled again in the same turn
        # must end up filled.
        for path in sorted(changes.deletes):
            out.write(b"D %s\n" % quote_path(path))
        for path in sorted(changes.puts):
            if self.stop.is_set():
                raise ExportStopped("the export was stopped (the daemon is shutting down)")
            obj, mode = changes.puts[path]
            self._put(out, path, obj, mode)
        out.write(b"\nget-mark :%d\n" % mark)
        out.flush()
        sha = proc.stdout.readline().decode().strip()
        if len(sha) < 40:
            proc.wait()
            raise ExportError(f"git fast-import failed: {_last_line_of(errors)}")
        return sha

    def _put(self, out, path: bytes, obj: SnapObject, mode: int) -> None:
        git_mode = _git_mode(mode)
        header = b"M %s inline %s\ndata %d\n"
        if git_mode == MODE_LINK:
            target = self.view.readlink(obj)
            out.write(header % (git_mode, quote_path(path), len(target)) + target + b"\n")
            return
        content = self._stable_content(obj)
        if isinstance(content, bytes):
            out.write(header % (git_mode, quote_path(path), len(content)) + content + b"\n")
            return
        try:
            size = os.fstat(content).st_size
            out.write(header % (git_mode, quote_path(path), size))
            offset = 0
            while offset < size:
                chunk = os.pread(content, min(CHUNK, size - offset), offset)
                if not chunk:
                    raise ExportError(f"{os.fsdecode(path)} shrank while it was exported")
                out.write(chunk)
                offset += len(chunk)
            out.write(b"\n")
        finally:
            os.close(content)

    def _stable_content(self, obj: SnapObject) -> bytes | int:
        """*obj*'s content in its turn, as bytes (small) or a descriptor nothing else can change.

        A pre-image never changes. The live file can (the workspace goes on):
        what is read from it (into memory, or a clone) counts only if no
        pre-image appeared meanwhile, since every change records its pre-image first.
        """
        while True:
            fd, is_copy = self.view.content_source(obj)
            if is_copy:
                return fd
            try:
                if os.fstat(fd).st_size <= SMALL_FILE:
                    content = _read_all(fd)
                else:
                    content = self._clone(fd)
            finally:
                os.close(fd)
            if self.view.preimage_name(obj) is None:
                return content
            if not isinstance(content, bytes):
                os.close(content)

    def _clone(self, fd: int) -> int:
        """An unnamed file in the store with *fd*'s content: a reflink where possible."""
        tmp = os.open(self.store.path, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        try:
            try:
                libc.clone(fd, tmp)
            except OSError:
                libc.copy(fd, tmp)
        except BaseException:
            os.close(tmp)
            raise
        return tmp


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, CHUNK):
        chunks.append(chunk)
    return b"".join(chunks)


def export_in_thread(store: Store, catalogue: Catalogue, root_path: bytes, root_ino: int,
                     root_handle: ObjectRef, target: Target,
                     stop: threading.Event | None = None) -> ExportResult:
    """Run one export with *catalogue*, a connection of its own, and a snapshot view of its own.

    The daemon's connection and descriptor cache belong to its trio thread;
    sharing them across threads would interleave their statements.
    """
    view = SnapshotView(store, root_ino, root_handle)
    view.catalogue = catalogue
    try:
        return Exporter(store, catalogue, view, root_path, stop).run(target)
    finally:
        view.close()


class ExportRunner:
    """Exports inside the daemon: one at a time, each in a worker thread, and the mirror
    kept after each seal (`--export-git-on-checkpoint`) off the checkpoint's path."""

    def __init__(self, store: Store, root_path: bytes, forbidden: list[str], root_ino: int,
                 root_handle: ObjectRef):
        """Made before mounting: it opens by name what it needs (see `prepare`)."""
        self.store = store
        self.root_path = root_path        # the backing directory, as the kernel names our fds
        # git (a child, same user or root) reaches the store through our descriptor:
        # the store's own path lies under the mount, where `.cowfs` is hidden.
        self.store_dir = b"/proc/%d/fd/%d" % (os.getpid(), store.fd)
        self.catalogue: Catalogue | None = None
        self.forbidden = forbidden        # the mount point and the backing directory
        self.root_ino = root_ino
        self.root_handle = root_handle
        self.mirror: dict | None = None   # the last background export, for `cowfs status`
        self._lock = trio.Lock()
        self._wanted = trio.Event()
        self._stop = threading.Event()

    @property
    def history_lock(self) -> trio.Lock:
        """Held by each export and each prune (retention.py): one of them at a time."""
        return self._lock

    async def export(self, repo: str | None, branch: str, pid: int | None = None) -> ExportResult:
        """Export to the store's repository, or to *repo* as named by the CLI of process *pid*."""
        async with self._lock:
            return await trio.to_thread.run_sync(self._export, repo, branch, pid)

    def _export(self, repo: str | None, branch: str, pid: int | None) -> ExportResult:
        if self._stop.is_set():
            raise ExportStopped("the daemon is shutting down")
        target = (default_target(self.store_dir, branch, self.root_path + b"/" + STORE_NAME)
                  if repo is None
                  else named_target(repo, branch, self.forbidden, pid))
        if repo is None and not os.path.isdir(target.git_dir):
            # Made before mounting only (create_default_repo): git was installed since.
            raise TargetError("the store's git repository is made when cowfs mounts with git "
                              "installed: remount (cowfs umount, cowfs mount), or export-git --to REPO")
        try:
            return export_in_thread(self.store, self.catalogue, self.root_path, self.root_ino,
                                    self.root_handle, target, self._stop)
        finally:
            if target.namespace is not None:
                os.close(target.namespace)

    def prepare(self) -> None:
        """Before mounting, open by name what exports need later: after it, names in the
        workspace lead into the daemon's own mount."""
        create_default_repo(self.store_dir)
        self.catalogue = Catalogue(os.fsdecode(self.store.path + b"/catalogue.db"))
        self.catalogue.turns()      # opens its WAL and shared-memory files now

    def close(self) -> None:
        if self.catalogue is not None:
            self.catalogue.close()

    def sealed(self) -> None:
        """A turn was sealed: wake the mirror task (never waits; several seals make one export)."""
        self._wanted.set()

    async def keep_mirror(self) -> None:
        self._wanted.set()    # first catch up with turns sealed while no mirror ran
        while True:
            await self._wanted.wait()
            self._wanted = trio.Event()
            try:
                result = await self.export(None, DEFAULT_BRANCH)
            except ExportStopped:
                return
            except (ExportError, TargetError, OSError) as e:
                log.warning("git export after checkpoint failed: %s", e)
                self.mirror = {"error": str(e)}
                continue
            except Exception as e:
                # A bug here must not take the mount down with it.
                log.exception("git export after checkpoint failed")
                self.mirror = {"error": f"internal error: {e}"}
                continue
            if result.tip is not None:
                self.mirror = {"turn": result.tip[0], "sha": result.tip[1], "repo": result.repo}

    def stop(self) -> None:
        """Make a running export give up at its next file (the mount is going away)."""
        self._stop.set()
