"""The daemon: one mount's life, from opening the workspace to the last seal.

Owns the order of start-up (open the workspace by descriptor *before*
mounting over it, lock the store, check for changes made while unmounted and
find the recorded objects in the tree, open every file it will need by name,
mount, serve) and shut-down (seal pending changes, record a clean unmount),
and the control-channel requests, which it turns into calls on Capture and
Rollback, served to root and the mount's owner only. pyfuse3 runs every
request on this one trio thread.
"""

import contextlib
import errno
import json
import logging
import os
import resource
import secrets
import socket
import sqlite3
import stat
import struct
import sys
import time
from dataclasses import dataclass, field

import pyfuse3
import trio

from . import libc, retention
from .capture import Capture
from .catalogue import FormatError, disk_full
from .control import MAX_MESSAGE, REFRESH_PREFIX
from .drift import find_drift, since_last_session
from .errors import BadInput, CowfsError, OperationFailed, UnknownTurn
from .fs import SNAPDIR, SNAPDIR_ID, CowFS, invalidate_entries
from .gitexport import DEFAULT_BRANCH, ExportError, ExportRunner, TargetError
from .history import HistoryRunner, TurnTrees
from .ignore import BadRules, load_rules
from .restore import Restore
from .rollback import Rollback
from .fsck import Fsck
from .store import STORE_NAME, CatalogueLost, Store, StoreBusy, tree_path

log = logging.getLogger("cowfs")

ALIVE_INTERVAL = 10.0
# Request names on the wire → the handler that serves them (_op_<name>), where the two differ:
# the wire names stay, so a client and a daemon of different versions still understand each
# other, while the handlers say what they do.
_HANDLER_OF = {"umount": "seal_before_unmount", "unmount": "unmount_for_owner"}
# Scheduler rounds a rollback waits for the FORGETs of the files whose entries it dropped.
FORGET_ROUNDS = 8


class MountError(Exception):
    """Mounting cannot go ahead; the message is meant for the user."""


@dataclass
class MountOptions:
    """The options of one mount, built by the client that starts the daemon (mounting.options).
    Root mode is not one of them: it is the process's effective uid (`as_root`)."""
    workspace: str
    mountpoint: str
    snapdir_visible: bool = False
    force: bool = False
    debug: bool = False
    export_git_on_checkpoint: bool = False
    owner_uid: int = 0          # served by the control channel, with root
    allow_other: bool = False   # other users may reach the mount (as permissions allow)
    initial_message: str = ""   # turn 0's message, if this mount creates the store
    prune_limits: retention.Limits = field(default_factory=retention.Limits)  # after each seal
    atime: str = ""             # -o noatime|relatime|strictatime; "": the backing mount's policy
    nodiratime: bool = False    # -o nodiratime: listing a directory never moves its atime

    @property
    def as_root(self) -> bool:
        """Root mode: a private mount namespace, objects owned by their creators."""
        return os.geteuid() == 0


class Daemon:
    def __init__(self, opts: MountOptions):
        self.opts = opts
        self.root_fd = -1
        self.store: Store | None = None
        self.drift_note = ""
        self.crashed_turn: int | None = None    # the open turn of a daemon that died
        self.startup_note = ""     # one line for the user, after "mounted ..."
        self._store_size: tuple[tuple, int] | None = None   # (what it was measured at, bytes)

    # -- start-up ------------------------------------------------------------------
    def prepare(self) -> None:
        """Everything that can fail before the mount exists. Raises MountError."""
        opts = self.opts
        try:
            self.root_fd = os.open(opts.workspace, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise MountError(f"cannot open {opts.workspace}: {e.strerror}") from None
        try:
            os.stat(SNAPDIR, dir_fd=self.root_fd, follow_symlinks=False)
            raise MountError(f"{opts.workspace} already has an entry named {SNAPDIR.decode()}; "
                             "cowfs needs that name for snapshots")
        except FileNotFoundError:
            pass
        try:
            self._open_store()
            self._check_drift()
            retention.recover(self.store)     # what a prune that died left in the store's trash
            self._check_store()
            self._setup_logging()
            self.capture = Capture(self.store, os.fsencode(self.opts.workspace))
            self._open_turn_rules()
        except sqlite3.Error as e:
            raise MountError(f"the catalogue {opts.workspace}/.cowfs/catalogue.db cannot be read "
                             f"({e}): `cowfs fsck --repair {opts.workspace}` recovers what it can") from None
        self.control = _control_socket()

    def _open_store(self) -> None:
        opts = self.opts
        try:
            self.store = Store(self.root_fd)
        except StoreBusy:
            raise MountError(f"{opts.workspace} is already mounted by another cowfs daemon") from None
        except OSError as e:
            raise MountError(f"cannot open the store {opts.workspace}/.cowfs: {e.strerror}") from None
        except FormatError as e:
            raise MountError(f"{opts.workspace}/.cowfs: {e}") from None
        except CatalogueLost as e:
            raise MountError(f"{opts.workspace}/.cowfs: {e}; `cowfs fsck {opts.workspace}` says "
                             "more, and --repair sets the files aside so that a new history can start") from None
        if self.store.catalogue.created and opts.initial_message:
            self.store.catalogue.name_initial_turn(opts.initial_message)

    def _open_turn_rules(self) -> None:
        """The open turn's ignore rules: `.cowfsignore` as it is now, unless the turn already has
        changes (a turn a daemon that died left open keeps the rules it had)."""
        turn = self.capture.turn
        if self.store.catalogue.layer_size(turn) != (0, 0):
            return
        try:
            rules = load_rules(self.root_fd)
        except BadRules as e:
            raise MountError(f"{e}; nothing was mounted (the rules recorded before stay in force): "
                             "fix it and mount again") from None
        self.capture.ignore.open_turn_rules(turn, rules)

    def _check_drift(self) -> None:
        """Refuse (unless --force) a tree changed behind cowfs's back since it last had it in
        hand: since the clean unmount, or since the mount of a daemon that died. The same walk
        holds the recorded objects of the tree: one in the tree is reached through the
        descriptor found here (ObjectRef), one in the store by its name."""
        catalogue = self.store.catalogue
        catalogue.open_turn()       # the dead daemon may have sealed its last turn and no more
        since, records = since_last_session(catalogue)
        wanted = catalogue.recorded_objects()
        if not (since or wanted):
            return      # a new store
        ignored, seen = catalogue.ignored_things(), set()

        def visit(dir_fd, name, st):
            self.store.find_recorded(dir_fd, name, st, wanted)
            if st.st_ino in ignored:
                seen.add(st.st_ino)
        drift = find_drift(self.root_fd, since, records, visit, ignored=ignored)
        for ino in ignored.keys() - seen:
            catalogue.drop_ignored(ino)     # gone: its number may be another object's now
        if records is not None and records.crashed:
            self.crashed_turn = records.open_turn
            changes = catalogue.recount(records.open_turn)
            self.startup_note = (f"recovered: the previous daemon stopped without unmounting; its open "
                                 f"turn-{records.open_turn} is kept ({changes} change(s) recorded)")
            log.info("%s", self.startup_note)
        count, examples = drift.count, drift.examples
        if not count:
            return
        shown = ", ".join(repr(p) for p in examples)
        what = drift.when()
        if not self.opts.force:
            raise MountError(
                f"{count} path(s) changed {what} (e.g. {shown}); "
                "snapshots of earlier turns would show them wrongly. "
                "Mount with --force to accept the tree as it is now")
        self.drift_note = f"accepted {count} path(s) changed {what} (e.g. {shown})"
        catalogue.set_meta("drift", f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {self.drift_note}")

    def _check_store(self) -> None:
        """Before serving: the quick check after an unclean stop (what the dead daemon could have
        left: O(rows of its open turn)); the whole check when a daemon marked the store after an
        internal fault. Refuse to mount a store with problems: `cowfs fsck --repair` first."""
        marks = self.store.needs_check()
        if not marks and self.crashed_turn is None:
            return
        check = Fsck(self.store, self.opts.workspace)
        report = check.run(drift=False) if marks else check.quick(self.crashed_turn)
        why = f"the last session noted a fault ({marks[-1]})" if marks else "after the unclean stop"
        if report.clean:
            log.info("checked the store %s: clean", why)
            return
        first = report.left[0].message
        raise MountError(f"checked the store {why}: {len(report.left)} problem(s), e.g. {first}; "
                         f"`cowfs fsck --repair {self.opts.workspace}` mends what it can")

    def _setup_logging(self) -> None:
        # The daemon's umask is 0 (it creates files for their callers): the log is its own, 0600.
        log_path = self.store.path + b"/daemon.log"
        os.close(os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
        os.chmod(log_path, 0o600)     # a log made by an earlier version was 0666
        handler = logging.FileHandler(os.fsdecode(log_path))
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger()
        root.addHandler(handler)
        root.setLevel(logging.DEBUG if self.opts.debug else logging.INFO)

    def mount(self) -> None:
        self.fs = CowFS(self.root_fd, self.store, self.capture, self.control.getsockname(),
                        self.opts.snapdir_visible, self.opts.atime, self.opts.nodiratime)
        self.fs.debug = self.opts.debug
        self.git_export = ExportRunner(
            self.store, os.fsencode(self.opts.workspace), [self.opts.mountpoint, self.opts.workspace],
            self.fs.inodes.root_ino, self.fs.view.root_handle)
        self.history = HistoryRunner(self.store, os.fsencode(self.opts.workspace),
                                     self.fs.inodes.root_ino, self.fs.view.root_handle)
        self._open_by_name_before_mounting()
        self.pruner = retention.Pruner(
            self.store, self.capture, self.fs.view, self.fs.inodes.root_ino,
            self.git_export.history_lock, self.git_export.catalogue, self._forget_turns,
            self.opts.prune_limits)
        # Recovery after a crash judges changes since this moment by the rows of turns from this one.
        self.store.catalogue.set_meta("mounted_at", str(time.time_ns()))
        self.store.catalogue.set_meta("mounted_turn", str(self.capture.turn))
        try:
            pyfuse3.init(self.fs, self.opts.mountpoint, fuse_options(self.opts))
        except RuntimeError as e:
            raise MountError(f"cannot mount on {self.opts.mountpoint}: {e}") from None
        mountpoint = os.fsencode(self.opts.mountpoint)
        self.fs.mount_path = (None, mountpoint)
        if self.opts.as_root:
            # Where the mount is seen: to unmount it for its owner (_op_unmount_for_owner), and the root
            # its own threads reach it from (CowFS.flush_open_writes).
            self.host_namespace = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
            self.fs.mount_path = (os.open("/", os.O_PATH | os.O_CLOEXEC), mountpoint.lstrip(b"/"))
            # Belt and braces: nothing this process opens by name can reach its mount.
            libc.hide_mount_from_self(self.opts.mountpoint,
                                      _paths_the_daemon_needs(self.opts.workspace))
        log.info("mounted %s on %s (turn %d, capture mode %s)", self.opts.workspace,
                 self.opts.mountpoint, self.capture.turn, self.capture.mode)

    def _open_by_name_before_mounting(self) -> None:
        """Once mounted, a name under the workspace leads into the daemon's own mount: a
        request it made there would wait for itself (its one thread serves every request).
        So every file it opens by name is opened now and kept open: SQLite's WAL and
        shared-memory files (a write and a checkpoint now also do the first sync, which
        opens the directory by name), the export's connection, the store's git repository."""
        catalogue = self.store.catalogue
        catalogue.set_meta("alive_at", str(time.time_ns()))
        catalogue.db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        self.history.prepare()
        try:
            self.git_export.prepare()
        except (ExportError, OSError) as e:
            raise MountError(f"cannot prepare the store's git repository: {e}") from None

    # -- serving -------------------------------------------------------------------
    async def serve(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listener = trio.socket.from_stdlib_socket(self.control)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._accept_loop, listener, nursery)
            nursery.start_soon(self._heartbeat)
            if self.opts.export_git_on_checkpoint:
                nursery.start_soon(self.git_export.keep_mirror)
            if self.opts.prune_limits:
                nursery.start_soon(self.pruner.keep_limits)
            task_status.started()
            await pyfuse3.main()
            self.git_export.stop()
            nursery.cancel_scope.cancel()
        listener.close()

    async def _heartbeat(self) -> None:
        # After a crash, `cowfs log` shows the open turn's counts as of the last beat.
        while True:
            await trio.sleep(ALIVE_INTERVAL)
            try:
                self.capture.flush_counts()
            except Exception as e:
                if not disk_full(e):
                    raise
                log.warning("the disk is full: the open turn's counts wait for the next beat")

    async def _accept_loop(self, listener, nursery) -> None:
        while True:
            conn, _ = await listener.accept()
            nursery.start_soon(self._handle_connection, conn)

    @staticmethod
    def _peer(conn) -> tuple[int, int]:
        """(pid, uid) of the client, from the kernel (SO_PEERCRED), not from what it says."""
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _ = struct.unpack("3i", creds)
        return pid, uid

    def _may_command(self, peer: tuple[int, int]) -> bool:
        """Root and the mount's owner are served; the socket is reachable by anyone."""
        return peer[1] in (0, self.opts.owner_uid)

    async def _handle_connection(self, conn) -> None:
        # One bad client must never take the mount down with it.
        try:
            async with trio.SocketStream(conn) as stream:
                data = b""
                while not data.endswith(b"\n") and len(data) < MAX_MESSAGE:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        return
                    data += chunk
                # Read first: a client still sending when we close would see EPIPE, not this.
                peer = self._peer(conn)
                reply = (await self._reply(data, peer) if self._may_command(peer)
                         else {"ok": False, "error": "permission denied"})
                await stream.send_all(json.dumps(reply).encode() + b"\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            log.warning("control connection failed: %s", e)

    async def _reply(self, data: bytes, peer: tuple[int, int] | None = None) -> dict:
        try:
            req = json.loads(data)
            if isinstance(req, dict) and peer is not None:
                _vouch(req, *peer)
            return await self.handle_request(req)
        except CowfsError as e:
            return {"ok": False, "error": str(e), "kind": e.kind, **({"details": e.details} if e.details else {})}
        except Exception as e:
            if disk_full(e):
                return {"ok": False, "kind": OperationFailed.kind,
                        "error": f"the disk holding {self.opts.workspace}/.cowfs is full: the catalogue "
                                 "cannot record this; nothing was changed. Free some space and run it again"}
            log.exception("control request failed")
            return {"ok": False, "error": f"internal error: {e}"}

    async def handle_request(self, req: dict) -> dict:
        op = req.get("op")
        op = _HANDLER_OF.get(op, op) if isinstance(op, str) else None
        handler = getattr(self, f"_op_{op}", None) if op is not None else None
        if handler is None:
            raise BadInput(f"unknown request {op!r}")
        sealed_before = self.capture.turn
        reply = {"ok": True, **await handler(req)}
        if self.opts.export_git_on_checkpoint and self.capture.turn != sealed_before:
            self.git_export.sealed()    # wakes the mirror task; the reply does not wait for it
        if self.opts.prune_limits and self.capture.turn != sealed_before:
            self.pruner.sealed()        # the mount's limits, in the background too
        return reply

    # -- control requests ------------------------------------------------------------
    async def _op_status(self, req: dict) -> dict:
        turns = self.store.catalogue.sealed_turns()
        ignore = self.capture.ignore
        return {
            "ignore": {"rules": ignore.rules.patterns(), "ignored_things": len(ignore.things)},
            "workspace": self.opts.workspace,
            "mountpoint": self.opts.mountpoint,
            "backing": self.opts.workspace,
            "open_turn": self.capture.turn,
            "last_turn": turns[-1],
            "turns": len(turns),
            "pending_changes": self.capture.changes + self._persisted_changes(),
            "capture_mode": self.capture.mode,
            "store_bytes": await self._store_bytes() if req.get("size", True) else None,
            "daemon_pid": os.getpid(),
            "snapdir": "visible" if self.opts.snapdir_visible else "hidden",
            "drift": self.store.catalogue.get_meta("drift"),
            "git_mirror": self.git_export.mirror if self.opts.export_git_on_checkpoint else None,
            "requests": dict(self.fs.requests),
            "quiet_seconds": time.monotonic() - self.fs.last_change,
            "oldest_turn": turns[0],
            "auto_prune": ({**self.opts.prune_limits.as_dict(), "last": self.pruner.last}
                           if self.opts.prune_limits else None),
        }

    async def _store_bytes(self) -> int:
        """What the store holds, measured as a prune measures it (retention.measure: pre-images
        and kept objects, a kept directory's whole tree), in a worker thread, and again only
        after something may have changed it: a request that changed the tree, a change the
        daemon made itself (restore, rollback), a prune."""
        key = (self.capture.turn, self.fs.epoch, self.capture.changes + self._persisted_changes(),
               self.store.catalogue.oldest_turn())
        if self._store_size is None or self._store_size[0] != key:
            usage = await trio.to_thread.run_sync(retention.measure, self.store)
            self._store_size = (key, usage.total)
        return self._store_size[1]

    async def _op_activity(self, req: dict) -> dict:
        """What the watcher (autocheckpoint.py) asks every second or so: cheap, no store walk.
        `requests` counts what processes asked the mount (not the kernel's forgets)."""
        requests = self.fs.requests
        return {"daemon_pid": os.getpid(), "open_files": len(self.fs.open_files),
                "requests": sum(requests.values()) - requests.get("forget", 0),
                "pending_changes": self.capture.changes + self._persisted_changes(),
                "quiet_seconds": time.monotonic() - self.fs.last_change}

    def _persisted_changes(self) -> int:
        row = self.store.catalogue.db.execute("SELECT changes FROM turns WHERE turn=?",
                                              (self.capture.turn,)).fetchone()
        return row[0] if row else 0

    async def _op_checkpoint(self, req: dict) -> dict:
        """Seal the open turn. `brief`: reply with the turn alone (control.checkpoint_in_one_shot)."""
        message = str(req.get("message") or "")
        await self.fs.flush_open_writes()
        try:
            rules = load_rules(self.root_fd)
        except BadRules as e:
            raise BadInput(f"{e}; turn-{self.capture.turn} was not sealed, and its rules stay in force "
                           "for it") from None
        turn = self.capture.seal(message, rules=rules)
        if req.get("brief"):
            return {"turn": turn}
        return {"turn": turn, "record": self.store.catalogue.turn(turn).__dict__}

    async def _op_log(self, req: dict) -> dict:
        turns = self.store.catalogue.turns()
        return {"turns": [t.__dict__ for t in turns], "oldest_turn": turns[0].number}

    def _sealed_turn(self, turn) -> int:
        """*turn*, a sealed turn still kept; else UnknownTurn (PrunedTurn, naming the oldest kept)."""
        return retention.require_sealed(self.store.catalogue, turn)

    @staticmethod
    def _paths(req: dict) -> list[bytes]:
        """The request's paths, relative to the root (the client resolved them), as bytes."""
        paths = req.get("paths") or []
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise BadInput("paths must be a list of strings")
        out = []
        for path in paths:
            parts = [p for p in os.fsencode(path).split(b"/") if p not in (b"", b".")]
            if b".." in parts or (parts and parts[0] in (SNAPDIR, STORE_NAME)):
                raise BadInput(f"{path}: not a path of the live tree")
            out.append(b"/".join(parts))
        return out

    async def _op_diff(self, req: dict) -> dict:
        """What changed between sealed turn `a` and sealed turn `b` (None: the live tree)."""
        a = self._sealed_turn(req.get("a"))
        b = req.get("b")
        if b is None:
            await self.fs.flush_open_writes()   # what the kernel still holds is part of the live tree
        b = self.capture.turn if b is None else self._sealed_turn(b)
        changes = await self.history.diff(a, b, self._paths(req), self.capture.turn,
                                          self.capture.writers)
        return {"a": a, "b": None if b == self.capture.turn else b, "changes": changes}

    async def _op_restore(self, req: dict) -> dict:
        """Make each path exactly what it was at sealed turn `turn`, as changes of the open turn."""
        turn = self._sealed_turn(req.get("turn"))
        paths = self._paths(req)
        if not paths:
            raise BadInput("restore needs at least one path")
        for path in paths:
            self._refuse_ignored(turn, path)
        await self._settle()
        trees = TurnTrees(self.fs.view, self.store, os.fsencode(self.opts.workspace))
        restore = Restore(self.store, self.capture, self._writers, os.fsencode(self.opts.workspace),
                          trees)
        restore.check(turn, paths)
        async with self._history_change(restore.result, req, restore.progress) as reply:
            restore.run_paths(turn, paths)
        return {"turn": turn, "open_turn": self.capture.turn,
                "restored": [[os.fsdecode(p), what] for p, what in restore.done], **reply}

    async def _op_agent(self, req: dict) -> dict:
        """Who the agent is (agent.py): `session` adds a harness session (pid, start time),
        `record` a file of the ledger; the reply holds both records whole."""
        catalogue, action = self.store.catalogue, req.get("action")
        if action == "session":
            catalogue.add_harness_session(int(req["session_pid"]), int(req["session_started"]), time.time())
        elif action == "record":
            path = os.fsdecode(self._paths({"paths": [req.get("path")]})[0])
            catalogue.record_agent_write(path, req.get("sha256"), req.get("writer_pid"),
                                         req.get("writer_started"), time.time())
        elif action != "read":
            raise BadInput(f"unknown agent request {action!r}")
        return {"sessions": catalogue.harness_sessions(), "ledger": catalogue.agent_writes()}

    def _refuse_ignored(self, turn: int, path: bytes) -> None:
        """A path the rules ignore now, or that turn *turn*'s snapshot hides, has no history."""
        history = self.capture.ignore.history
        for rules, when in ((self.capture.ignore.rules, "now"),
                            (history.snapshot_rules(turn), f"in turn-{turn}")):
            parts = path.split(b"/") if path else []
            for i in range(len(parts)):
                if rules.hides(b"/".join(parts[:i + 1]), None if i == len(parts) - 1 else True):
                    raise BadInput(f"{os.fsdecode(path)} is ignored {when} (.cowfsignore): "
                                   "cowfs keeps no history of it")

    def _attribute(self, result, tid, uid) -> None:
        """Changes the daemon made on a client's request are that client's (log -v shows it)."""
        if isinstance(tid, int) and isinstance(uid, int):
            for parent, name in result.entries:
                self.capture.writers.entry(parent, name, tid, uid)
            for ino in result.objects:
                self.capture.writers.object(ino, tid, uid)

    async def _op_rollback(self, req: dict) -> dict:
        target = self._sealed_turn(req.get("turn"))
        await self._settle()
        rollback = Rollback(self.store, self.capture, self._writers, os.fsencode(self.opts.workspace))
        try:
            rollback.refuse_losing_ignored(target)
        except BaseException:
            rollback.close()
            raise
        pending = self._seal_pending("changes before rollback")
        progress = lambda: (f"what it changed is a change of the open turn turn-{self.capture.turn}: "
                            f"`cowfs rollback {self.capture.turn - 1}` undoes it")
        async with self._history_change(rollback.result, req, progress) as reply:
            rollback.run(target)
            turn = self.capture.seal(f"rollback to turn-{target}", kind="rollback", target=target)
        return {"turn": turn, "target": target, "sealed_pending": pending,
                "entries": len(rollback.result.entries), "objects": len(rollback.result.objects),
                **reply}

    async def _settle(self) -> None:
        """Before a history operation: what the kernel holds is written back, no capture runs."""
        await self.fs.flush_open_writes()
        while self.capture.captures_in_flight():
            await trio.sleep(0.005)

    @contextlib.asynccontextmanager
    async def _history_change(self, result, req: dict, progress):
        """Around the body of a rollback or restore, which must not await (every other request
        waits meanwhile): whatever it changed on disk becomes the caller's change and visible to
        the kernel on every exit path, success or failure. Otherwise a failure part-way would
        leave the kernel serving the old size and pages, and the next write would put the old
        content back. Yields the reply's part it fills (`refresh`: see kernel_refresh_list); a
        failure is re-raised as a CowfsError naming what was done (*progress*) and carrying it.
        """
        reply, failure = {}, None
        try:
            yield reply
        except CowfsError as e:
            failure = type(e)(f"{e}; {progress()}")
        except Exception as e:
            log.exception("history operation failed part-way")
            failure = OperationFailed(f"failed part-way ({e}); {progress()}")
        tid = req.get("tid")
        self._attribute(result, tid, req.get("uid", 0))
        self.fs.epoch += 1          # what readdir knew of the live tree is history now
        self.fs.generation += 1
        if result.entries or result.detached:
            # Directories the kernel holds prove again that they are in the tree: anything
            # removed, moved or detached (a restore removes what was born this turn without
            # keeping it, and may move directories) may have taken one out.
            self.fs.inodes.tree_epoch += 1
        self.fs.detached = result.detached      # until the kernel has dropped their dentries
        try:
            await self._invalidate(result)
        finally:
            self.fs.detached = set()
        reply["refresh"] = self.kernel_refresh_list(result, tid)
        if failure is not None:
            failure.details["refresh"] = reply["refresh"]
            raise failure

    async def _op_export_git(self, req: dict) -> dict:
        repo, branch, pid = req.get("repo"), req.get("branch") or DEFAULT_BRANCH, req.get("pid")
        if not (repo is None or isinstance(repo, str) and isinstance(pid, int)) or \
                not isinstance(branch, str):
            raise BadInput("export_git takes a repository path (with the caller's pid) and a branch")
        try:
            return (await self.git_export.export(repo, branch, pid)).as_dict()
        except TargetError as e:
            raise BadInput(str(e)) from None
        except ExportError as e:
            raise OperationFailed(str(e)) from None

    async def _op_prune(self, req: dict) -> dict:
        # Limits refuses anything but whole turns, seconds and bytes (BadInput).
        limits = retention.Limits(req.get("keep"), req.get("older_than"), req.get("max_store"))
        if not limits:
            raise BadInput("prune needs a limit: --keep N, --older-than DURATION or --max-store SIZE")
        return (await self.pruner.prune(limits, dry_run=bool(req.get("dry_run")))).as_dict()

    async def _forget_turns(self, turns: list[int]) -> None:
        """Pruned turns leave `.snapshots`: the kernel caches a turn's entry for a year."""
        known = {obj.turn for obj in self.fs.snap_nodes.nodes.values()} & set(turns)
        names = [(SNAPDIR_ID, b"turn-%d" % t) for t in sorted(known)]
        if names:
            await trio.to_thread.run_sync(invalidate_entries, names)

    async def _op_flush(self, req: dict) -> dict:
        """Have the kernel write back what it holds of files open for writing (Workspace.sync)."""
        await self.fs.flush_open_writes()
        return {}

    async def _op_seal_before_unmount(self, req: dict) -> dict:
        """The first half of `cowfs umount` (mounting.unmount unmounts after it): pending
        changes become a last turn while the mount is still whole."""
        await self.fs.flush_open_writes()
        return {"sealed": self._seal_pending("unmount"), "pid": os.getpid()}

    async def _op_unmount_for_owner(self, req: dict) -> dict:
        """Unmount for an owner who cannot (fusermount3 unmounts only its caller's mounts)."""
        if not self.opts.as_root:
            raise BadInput("only a root daemon unmounts on request; use fusermount3 -u")
        argv = ["nsenter", f"--mount=/proc/self/fd/{self.host_namespace}", "--",
                "fusermount3", "-u", *(["-z"] if req.get("lazy") else []), self.opts.mountpoint]
        result = await trio.run_process(argv, check=False, capture_stderr=True,
                                        pass_fds=(self.host_namespace,), cwd="/")
        if result.returncode:
            lines = result.stderr.decode(errors="replace").strip().splitlines()
            raise OperationFailed(lines[-1] if lines else "fusermount3 failed")
        return {"pid": os.getpid()}

    def _seal_pending(self, message: str) -> int | None:
        if self.capture.has_changes() or self._persisted_changes():
            return self.capture.seal(message)
        return None

    def _writers(self, ino: int) -> int:
        node = self.fs.inodes.get(self.fs.inodes.nodeid(ino))
        return node.writers if node is not None else 0

    def kernel_refresh_list(self, result, tid) -> list:
        """The restored regular files the kernel still knows, whose size and mtime it must be told.

        With the writeback cache the kernel trusts its own size and mtime of a
        cached regular file and ignores ours, and an appending write would land
        at the size it has: only a setattr through the mount changes them. The
        daemon cannot make one (it never enters its own mount), so the client
        that asked for the rollback does, on thread *tid*, through each file's
        reserved name (REFRESH_PREFIX), and `fs` lets exactly those through
        uncaptured. Returns [(nodeid, size, mode, atime_ns, mtime_ns)] of the
        backing files.
        """
        inodes, targets = self.fs.inodes, []
        if not isinstance(tid, int):
            return targets
        for ino in result.restored:
            node = inodes.get(inodes.nodeid(ino))
            if node is None:
                continue    # forgotten: a new lookup takes everything from the daemon
            st = os.stat(node.fd)
            if stat.S_ISREG(st.st_mode):
                targets.append((inodes.nodeid(ino), st.st_size, stat.S_IMODE(st.st_mode),
                                st.st_atime_ns, st.st_mtime_ns))
        self.fs.refreshing = {t[0] for t in targets}
        self.fs.refresher_tid = tid
        return targets

    async def _op_rollback_done(self, req: dict) -> dict:
        """The refresher is done: its reserved names stop resolving, and the kernel drops them."""
        names = [(pyfuse3.ROOT_INODE, REFRESH_PREFIX + str(n).encode()) for n in self.fs.refreshing]
        self.fs.refreshing, self.fs.refresher_tid = set(), 0
        await trio.to_thread.run_sync(invalidate_entries, names)
        return {}

    def _live_path(self, node) -> bytes | None:
        """The node's path relative to the root, if its descriptor still names it (renames
        move the name along; an unlinked name does not count)."""
        rel = tree_path(node.fd, self.capture.root_prefix)
        if not rel:
            return None     # out of the tree, or the root (no entry to drop)
        try:
            same = os.stat(rel, dir_fd=self.root_fd, follow_symlinks=False).st_ino == node.ino
        except OSError:
            return None
        return rel if same else None

    async def _invalidate(self, result) -> None:
        """Make the kernel drop what the rollback changed.

        Restored files lose their entries too, although their names did not
        change: the kernel evicts a FUSE inode with its last entry (the daemon
        sees the FORGET), and a new one takes size and mtime from the daemon.
        So only the files it still knows afterwards (other names, open, watched)
        need the CLI's refresh through the mount, which costs round trips.
        """
        inodes = self.fs.inodes
        changed = [(inodes.nodeid(parent), name) for parent, name in result.entries
                   if inodes.get(inodes.nodeid(parent)) is not None]
        files = self._entries_of_restored_files(result)
        names = changed + [e for _, *e in files]
        # Synchronously, so the kernel has forgotten them before the CLI returns; in two
        # threads, as the kernel's work per entry is most of it and the GIL is free meanwhile.
        async with trio.open_nursery() as nursery:
            for half in (names[0::2], names[1::2]):
                nursery.start_soon(trio.to_thread.run_sync, invalidate_entries, half)
        if files:
            await self._take_forgets([nodeid for nodeid, _, _ in files])
        known = [inodes.nodeid(i) for i in result.objects if inodes.get(inodes.nodeid(i)) is not None]
        await trio.to_thread.run_sync(_invalidate_inodes, known)

    def _entries_of_restored_files(self, result) -> list[tuple[int, int, bytes]]:
        """(nodeid, parent nodeid, name) of each restored file the kernel knows, by the live path
        its node's descriptor knows. Only an optimisation: a file missed here (the kernel knows it
        by another name) stays known and is refreshed through the mount instead."""
        inodes, paths = self.fs.inodes, {}
        for ino in result.restored:
            node = inodes.get(inodes.nodeid(ino))
            if node is not None:
                paths[ino] = self._live_path(node)
        names, parents = [], {}
        for ino, path in paths.items():
            if path is None:
                continue
            dir_path, _, name = path.rpartition(b"/")
            if dir_path not in parents:
                try:
                    parents[dir_path] = inodes.nodeid(os.stat(dir_path or b".", dir_fd=self.root_fd).st_ino)
                except OSError:
                    parents[dir_path] = None
            parent = parents[dir_path]
            if parent is not None and inodes.get(parent) is not None:
                names.append((inodes.nodeid(ino), parent, name))
        return names

    async def _take_forgets(self, nodeids: list[int]) -> None:
        """Let the FUSE loop read the FORGETs that invalidating entries queued.

        The kernel queues them before the invalidation returns and hands them
        out before other requests; a few scheduler rounds read them. Any not
        read by then only cost a refresh that was not needed.
        """
        inodes = self.fs.inodes
        left = len(nodeids)
        for _ in range(FORGET_ROUNDS):
            await trio.sleep(0)
            now = sum(inodes.get(n) is not None for n in nodeids)
            if now == 0 or now == left < len(nodeids):
                break   # all read, or the rest stays known
            left = now

    # -- shut-down ---------------------------------------------------------------------
    def finish(self, unmount: bool) -> int | None:
        """Seal what is pending, record a clean unmount, release everything."""
        sealed = None
        try:
            pyfuse3.close(unmount=unmount)
        except Exception:
            log.exception("closing the FUSE session failed")
        if self.store is not None and hasattr(self, "capture"):
            sealed = self._seal_pending("unmount")
            self.fs.inodes.close_all()
            self.fs.view.close()
            self.store.catalogue.set_meta("unmounted_at", str(time.time_ns()))
            self.store.catalogue.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self.git_export.close()
            self.history.close()
            self.control.close()
            log.info("unmounted %s; sealed %s", self.opts.mountpoint, sealed)
        if self.store is not None:
            self.store.close()
        return sealed


def _vouch(req: dict, pid: int, uid: int) -> None:
    """Make the request's caller claims true: its uid and pid are the peer's, and a thread it
    names (the refresher of a rollback, the writer of a restore) must be one of the peer's own."""
    req["uid"] = uid
    if "pid" in req:
        req["pid"] = pid        # whose mount namespace an export's --to is resolved in
    tid = req.get("tid")
    if not (isinstance(tid, int) and not isinstance(tid, bool) and tid > 0
            and os.path.exists(f"/proc/{pid}/task/{tid}")):
        req["tid"] = pid


def _invalidate_inodes(nodeids: list[int]) -> None:
    for nodeid in nodeids:
        try:
            pyfuse3.invalidate_inode(nodeid, attr_only=False)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENOSYS):
                log.warning("invalidate_inode(%d): %s", nodeid, e)


def fuse_options(opts: MountOptions) -> set[str]:
    options = set(pyfuse3.default_options) | {"fsname=cowfs", "subtype=cowfs"}
    if opts.allow_other:
        options.add("allow_other")
    if opts.atime == "noatime":
        # Shown in /proc/mounts (libfuse 3.14 takes no relatime, strictatime or nodiratime);
        # the kernel keeps no atime for FUSE files: the daemon does what they say (fs.CowFS.atime).
        options.add("noatime")
    return options


def _control_socket() -> socket.socket:
    """The control socket, in the abstract namespace: no path reaches the store from outside
    (the mount hides it), and SO_PEERCRED, not a file mode, decides who is served."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.bind(b"\0cowfs-%d-%s" % (os.getpid(), secrets.token_hex(8).encode()))
    sock.listen(16)
    return sock


def _paths_the_daemon_needs(workspace: str) -> list[str]:
    """What must stay reachable by path in the daemon's own mount namespace."""
    return [workspace, "/proc", sys.prefix, sys.base_prefix, sys.exec_prefix,
            *(p for p in sys.path if p),
            "/dev/null"]    # git (the git export) cannot start without it


def _raise_fd_limit() -> None:
    """The store holds a descriptor per recorded object in the tree, and the inode table up to
    half the limit (InodeTable.budget): allow as many as the system lets this process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        with open("/proc/sys/fs/nr_open") as f:
            wanted = int(f.read())
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
    except (OSError, ValueError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run(opts: MountOptions, ready_fd: int | None) -> int:
    """Mount and serve until unmounted. Reports start-up success or failure on *ready_fd*."""
    os.umask(0)
    _raise_fd_limit()
    daemon = Daemon(opts)
    try:
        daemon.prepare()
        daemon.mount()
    except MountError as e:
        _report(ready_fd, f"error: {e}")
        _close_quietly(daemon)
        return 2

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.serve)
            _report(ready_fd, f"ok {daemon.startup_note}".rstrip())
    try:
        trio.run(main)
    except BaseException:
        log.exception("daemon failed")
        raise
    finally:
        daemon.finish(unmount=True)
    return 0


def _close_quietly(daemon: Daemon) -> None:
    if daemon.store is not None:
        daemon.store.close()
    if daemon.root_fd >= 0:
        os.close(daemon.root_fd)


def _report(fd: int | None, message: str) -> None:
    if fd is None:
        if message.startswith("error: "):
            print(f"cowfs: {message.removeprefix('error: ')}", flush=True)
        return
    try:
        os.write(fd, message.encode() + b"\n")
        os.close(fd)
    except OSError:
        pass
