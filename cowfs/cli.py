"""The `cowfs` command line.

Owns argument parsing, the one-line errors and exit codes (2: bad input,
1: the operation failed), and the human-readable output. Everything but
`mount` talks to the daemon through control.py; `mount` starts the daemon
and returns once the mount is live.
"""

import argparse
import json
import os
import sys
import time

from . import __version__, control
from .errors import EXIT_FAILED, BadInput, CowfsError

# Commands whose arguments after "--" are not options: diff's paths, run's command.
_AFTER_DASHES = ("diff", "run")

def parse_turn(text: str) -> int:
    value = text.removeprefix("turn-")
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"not a turn: {text!r} (expected N or turn-N)")
    return int(value)


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors in one line as every other error of cowfs."""

    def error(self, message):
        print(f"cowfs: error: {message} (see: {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


class _Unparsed:
    """Stands for the parser of a command this run does not parse, never built: argparse takes
    ~0.5 ms for each (a gettext lookup, a help formatter), a third of a checkpoint's time in
    Python. Takes any call and ignores it."""

    def __getattr__(self, name):
        return self._ignore

    def _ignore(self, *args, **kwargs):
        return self


class _Commands:
    """The subparsers: only the command *only*, or all of them if None (`cowfs --help`, and
    a command line naming none, whose error lists them)."""

    def __init__(self, sub, only: str | None):
        self.sub, self.only = sub, only

    def add_parser(self, name: str, **kwargs):
        if self.only in (None, name):
            return self.sub.add_parser(name, **kwargs)
        return _Unparsed()


def command_named(argv: list[str]) -> str | None:
    """The command *argv* names: its first word that is not an option (or -C's value), if it
    is one of COMMANDS."""
    words = iter(argv)
    for word in words:
        if word == "-C":
            next(words, None)
        elif word == "--":
            return None
        elif not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = _Parser(
        prog="cowfs",
        description="Copy-on-write checkpoints of a workspace: mount cowfs over it, end each turn "
                    "with `cowfs checkpoint`, browse .snapshots/turn-N, `cowfs rollback N`.")
    parser.add_argument("--version", action="version", version=f"cowfs {__version__}")
    parser.add_argument("-C", dest="top_cwd", metavar="PATH",
                        help="run as if cowfs was started in PATH (as git -C); also after the command")
    sub = _Commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"),
                    only)

    p = sub.add_parser("mount", help="mount cowfs over a workspace (returns once mounted)",
                       description="Mount cowfs over WORKSPACE (or at --at) and start recording turns. "
                                   "The first mount of a workspace makes its current tree turn 0.")
    p.add_argument("workspace", metavar="WORKSPACE")
    p.add_argument("--at", metavar="MOUNTPOINT", help="mount here instead of over WORKSPACE itself")
    p.add_argument("--foreground", action="store_true", help="run the daemon in this process")
    p.add_argument("--snapdir", choices=("hidden", "visible"), default="hidden",
                   help="list .snapshots in the root directory (default: hidden, reachable by name)")
    p.add_argument("--force", action="store_true",
                   help="mount even if files changed while cowfs was not mounted")
    p.add_argument("--debug", action="store_true", help="log every request to the daemon log")
    p.add_argument("--export-git-on-checkpoint", action="store_true",
                   help="after each checkpoint, export the new turns to the store's git repository "
                        "in the background (see export-git)")
    p.add_argument("--owner", metavar="USER",
                   help="as root: the user served by the mount's control channel "
                        "(default: the one sudo ran for)")
    p.add_argument("--allow-other", action="store_true",
                   help="let other users reach the mount (as the files' permissions allow); "
                        "always on as root, else needs user_allow_other in /etc/fuse.conf")
    p.add_argument("--initial-message", default="", metavar="MSG",
                   help="the message of turn 0 when this mount starts the history")
    p.add_argument("--auto-checkpoint", type=float, metavar="SECONDS",
                   help="seal the open turn after SECONDS without changes following a change "
                        "(a watcher process does it, as `cowfs checkpoint` would)")
    _add_limits(p, "after each checkpoint, in the background, prune ")
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)

    p = sub.add_parser("umount", help="seal pending changes as a turn and unmount",
                       description="Seal pending changes as a turn, unmount, and stop the daemon.")
    p.add_argument("path", nargs="?", metavar="PATH", help="the mount (default: -C or .)")
    p.add_argument("--lazy", action="store_true",
                   help="if processes still use the mount, detach it now; the daemon serves them "
                        "until the last one leaves, then seals their changes as a last turn and stops")
    _add_c(p)

    p = sub.add_parser("checkpoint", help="end the current turn; prints the sealed turn",
                       description="Flush pending writes and seal the open turn. Prints turn-N.")
    _add_c(p)
    p.add_argument("-m", "--message", default="", help="what happened in this turn")

    p = sub.add_parser("rollback", help="make the live tree exactly turn N",
                       description="Seal pending changes, make the live tree exactly TURN, and "
                                   "record that as a new turn (so it can be rolled back too).")
    _add_c(p)
    p.add_argument("turn", type=parse_turn, metavar="TURN", help="N or turn-N")

    p = sub.add_parser("log", help="list the turns (-v: what each changed, and which process)",
                       description="One line a turn, oldest first. With -v, each turn's changes "
                                   "follow it: kind (A/M/D/R/T), path, and the process that made "
                                   "the change (command, pid, uid).",
                       epilog="example: cowfs log -v -n 3     # the last three turns, change by change",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_c(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="list each turn's changes with the process that made each")
    p.add_argument("-n", type=int, metavar="N", help="only the last N turns")

    p = sub.add_parser(
        "diff", help="what changed between two turns (default: the open turn so far)",
        description="What changed from turn A to turn B. No turn: from the last sealed turn to the "
                    "live tree (what the open turn did so far); A alone: from A to the live tree. "
                    "Paths after -- limit the diff to those files and directories. Renames are the "
                    "ones the filesystem saw, never guessed. On a terminal the output goes through "
                    "a pager ($COWFS_PAGER, $PAGER, else less -FRX).",
        epilog="examples:\n  cowfs diff                   # the open turn so far, as a patch\n"
               "  cowfs diff 3 5 --stat        # turn-3 to turn-5\n"
               "  cowfs diff 2 --name-status -- src",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_c(p)
    p.add_argument("turns", nargs="*", type=parse_turn, metavar="TURN", help="A [B]: N or turn-N")
    shown = p.add_mutually_exclusive_group()
    shown.add_argument("--name-status", action="store_true", help="one line a change: kind, path")
    shown.add_argument("--stat", action="store_true", help="a line a file with +/- counts")
    shown.add_argument("--json", action="store_true",
                       help="one object a change: kind, path, old_path, sizes, modes, process")
    p.add_argument("--no-pager", action="store_true", help="never page the output")

    p = sub.add_parser(
        "restore", help="make some paths exactly what they were at a turn",
        description="Make each PATH (file, symlink or whole directory) exactly what it was at TURN: "
                    "content, mode, mtime, xattrs; a directory's later additions are removed; a "
                    "path that did not exist at TURN is removed. The restore is a change of the "
                    "open turn: `cowfs diff` shows it and `cowfs rollback` to the last sealed turn "
                    "undoes it. PATHs are relative to the current directory when it is inside the "
                    "mount, else to the workspace root.",
        epilog="example: cowfs restore 4 src/app.py docs/",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_c(p)
    p.add_argument("turn", type=parse_turn, metavar="TURN", help="N or turn-N")
    p.add_argument("paths", nargs="+", metavar="PATH")

    p = sub.add_parser(
        "run", help="run one command in the workspace, then seal its turn",
        description="Run CMD with the current directory (if inside the mount, else the workspace "
                    "root) as its working directory, through the mount, then seal the open turn "
                    "with MSG (default: the command line). Exits with the command's status.",
        epilog="example: cowfs -C ~/proj run -m 'format' -- black src",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_c(p)
    p.add_argument("-m", "--message", help="the turn's message (default: the command line)")

    p = sub.add_parser("status", help="show the mount, current turn, capture mode and store size")
    _add_c(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("export-git", help="write every sealed turn as a git commit",
                       description="Write each sealed turn not yet exported as one commit on BRANCH "
                                   "(tree = the turn's snapshot, message = the turn's message with a "
                                   "Cowfs-Turn trailer). Default repository: a bare one in the store "
                                   "(WORKSPACE/.cowfs/git). Git cannot hold empty directories, "
                                   "FIFOs, sockets, devices or .git directories: they are left out "
                                   "and counted.")
    _add_c(p)
    p.add_argument("--to", metavar="REPO", help="an existing git repository outside the workspace")
    p.add_argument("--branch", default="cowfs", help="the branch to create or extend (default: cowfs)")

    p = sub.add_parser(
        "prune", help="free the store of the oldest turns",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Remove the oldest turns and everything only they needed (pre-images,\n"
                    "objects kept for them); print the turns removed and the bytes freed (from\n"
                    "the filesystem's free space). The open turn and the newest sealed turn are\n"
                    "never pruned; turn numbers are never reused. A pruned turn is gone from\n"
                    ".snapshots and `cowfs log`; asking for it is an error naming the oldest\n"
                    "turn kept. Several limits: the strictest wins.",
        epilog="examples:\n  cowfs prune --keep 20            # keep the newest 20 sealed turns\n"
               "  cowfs prune --older-than 7d --dry-run\n"
               "  cowfs prune --max-store 2G       # oldest turns first, until the store fits")
    _add_c(p)
    _add_limits(p, "prune ")
    p.add_argument("--dry-run", action="store_true",
                   help="say what would go and about how much it holds; change nothing")

    p = sub.add_parser(
        "fsck", help="check an unmounted workspace's store (and --repair it)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Check the store of an unmounted WORKSPACE: the catalogue file, turn records, "
                    "rows against the store's files (missing pre-images, orphans, objects gone), "
                    "and the tree against the last session (drift). One line per finding, then "
                    "a summary.",
        epilog="exit codes:\n"
               "  0  the store is consistent (with --repair: after the repairs)\n"
               "  1  problems found (with --repair: some could not be repaired)\n"
               "  2  bad input: not a directory, no store, mounted, a newer format\n\n"
               "--repair loses nothing: orphan files are moved into .cowfs/lost+found, a lost\n"
               "pre-image or object is recorded as lost (snapshots that need it answer EIO),\n"
               "a damaged catalogue is copied row by row into a new one (the old one kept).\n"
               "Drift is only reported: `cowfs mount --force` accepts it.")
    p.add_argument("workspace", nargs="?", default=".", metavar="WORKSPACE",
                   help="the workspace directory (default: the current directory)")
    p.add_argument("--repair", action="store_true",
                   help="mend what can be mended without losing anything")
    return parser


def _add_limits(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--keep", metavar="N", help=what + "all but the newest N sealed turns")
    p.add_argument("--older-than", metavar="DURATION",
                   help=what + "turns sealed longer ago than DURATION (30m, 12h, 7d, 2w)")
    p.add_argument("--max-store", metavar="SIZE",
                   help=what + "the oldest turns until pre-images and kept objects fit in SIZE "
                               "(500M, 2G)")


def _add_c(p: argparse.ArgumentParser) -> None:
    p.add_argument("-C", dest="cwd", metavar="PATH",
                   help="any path inside the mount (default: the current directory)")


# -- mount / umount ------------------------------------------------------------------------
def cmd_mount(args) -> int:
    from . import mounting
    req = mounting.MountRequest(args.workspace, args.at, args.snapdir, args.force, args.debug,
                                args.export_git_on_checkpoint, args.owner, args.allow_other,
                                args.initial_message, args.auto_checkpoint, keep=args.keep,
                                older_than=args.older_than, max_store=args.max_store)
    if args.foreground:
        from .daemon import run
        return run(mounting.options(req), args.ready_fd)
    m = mounting.mount(req)
    print(f"mounted {m.mountpoint}" + (f" (workspace {m.workspace})" if m.mountpoint != m.workspace else ""))
    for note in m.notes:
        print(f"cowfs: {note}", file=sys.stderr)
    if m.stale_cwds:
        print(f"cowfs: warning: {len(m.stale_cwds)} process(es) (e.g. pid {m.stale_cwds[0]}) were "
              f"already inside {m.mountpoint}: they bypass cowfs until they cd there again "
              f"(cd \"$PWD\")", file=sys.stderr)
    return 0


def cmd_umount(args) -> int:
    from . import mounting
    u = mounting.unmount(args.path or args.cwd, args.lazy)
    if u.cleared_dead:
        print(f"cleared the dead mount at {u.mountpoint} (its daemon had stopped; "
              "`cowfs mount` recovers its open turn)")
        return 0
    if u.sealed is not None:
        print(f"sealed turn-{u.sealed}")
    if u.detached:
        print(f"detached {u.mountpoint}; the daemon serves the processes still inside it and "
              "seals their changes as a last turn when the last one leaves")
    else:
        print(f"unmounted {u.mountpoint}")
    return 0


# -- commands that talk to the daemon ---------------------------------------------------------
def cmd_checkpoint(args) -> int:
    print(f"turn-{control.checkpoint(args.cwd, args.message)}")
    return 0


class working:
    """While long work runs in the daemon, a spinner with the time so far on stderr when it is a
    terminal (rich), and nothing otherwise. The daemon does the work in one request, without
    letting anything else in, so there is no count of done and total to show, only that it runs."""

    def __init__(self, what: str):
        self.what, self.status = what, None

    def __enter__(self):
        if sys.stderr.isatty():
            from rich.console import Console
            self.status = Console(stderr=True).status(self.what)
            self.status.__enter__()
        return self

    def __exit__(self, *exc):
        if self.status is not None:
            self.status.__exit__(*exc)


def cmd_rollback(args) -> int:
    with working(f"rolling back to turn-{args.turn}"):
        reply = control.rollback(args.cwd, args.turn)
    if reply.get("sealed_pending") is not None:
        print(f"sealed pending changes as turn-{reply['sealed_pending']}")
    print(f"rolled back to turn-{reply['target']} (recorded as turn-{reply['turn']})")
    return 0


def cmd_log(args) -> int:
    from .api import Workspace
    ws = Workspace(args.cwd)
    reply = ws._request("log")
    turns = reply["turns"]
    if args.n is not None:
        if args.n < 0:
            raise BadInput("-n needs a count of 0 or more")
        turns = turns[len(turns) - args.n:] if args.n else []
    if args.verbose:
        for t in turns:
            # The oldest turn kept has no predecessor left to compare with (pruned).
            t["changes_list"] = ([] if t["number"] <= reply.get("oldest_turn", 0)
                                 else _turn_changes(ws, t, turns))
    if args.json:
        print(json.dumps(turns, indent=2))
        return 0
    if reply.get("oldest_turn"):
        print(f"(turns before turn-{reply['oldest_turn']} were pruned)")
    for t in turns:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t["sealed"] or t["started"]))
        state = "" if t["sealed"] else " (open)"
        message = t["message"]
        if t["kind"] == "rollback":
            message = message or f"rollback to turn-{t['target']}"
        print(f"turn-{t['number']:<5} {when}  {t['changes']:>6} changed  {_size(t['bytes']):>9} captured"
              f"  {message}{state}")
        for c in t.get("changes_list", ()):
            print(f"    {_change_line(c)}{_by(c)}")
    return 0


def _turn_changes(ws, turn: dict, turns: list[dict]) -> list[dict]:
    """A turn's changes (against the turn before it; the open turn's against the live tree)."""
    if turn["number"] == 0:
        return []
    b = turn["number"] if turn["sealed"] else None
    return [c.as_dict() for c in ws.diff(turn["number"] - 1, b)]


def _change_line(c: dict) -> str:
    path = f"{c['old_path']} -> {c['path']}" if c["kind"] == "R" else c["path"]
    return f"{c['kind']}  {path}"


def _by(c: dict) -> str:
    p = c.get("process")
    return f"    ({p['comm']}, pid {p['pid']}, uid {p['uid']})" if p else ""


def cmd_diff(args) -> int:
    from . import patch
    from .api import Workspace
    if len(args.turns) > 2:
        raise BadInput("diff takes at most two turns: A [B]")
    ws = Workspace(args.cwd)
    a, b = (args.turns + [None, None])[:2]
    paths = [_absolute(ws, p, args.base) for p in args.after_dashes]
    if args.json or args.name_status:
        changes = ws.diff(a, b, paths)
        text = (json.dumps([c.as_dict() for c in changes], indent=2) + "\n" if args.json else
                "".join(f"{c.kind}\t{c.old_path}\t{c.path}\n" if c.kind == "R" else f"{c.kind}\t{c.path}\n"
                        for c in changes))
    else:
        diffs = ws.file_diffs(a, b, paths)
        text = patch.diffstat(diffs) if args.stat else patch.patch(diffs)
    _page(text, args.no_pager)
    return 0


def _absolute(ws, path: str, base: str | None) -> str:
    """A path as the user meant it (from -C or the working directory inside the mount, else
    from the root), made absolute so that the API reads it the same way."""
    return os.path.join(str(ws.path), ws.relative(path, base=base))


def _page(text: str, never: bool) -> None:
    """Through a pager on a terminal (as git does), straight out otherwise."""
    import shlex
    import subprocess
    data = text.encode("utf-8", "surrogateescape")
    pager = os.environ.get("COWFS_PAGER") or os.environ.get("PAGER") or "less -FRX"
    if never or not sys.stdout.isatty() or not text or pager.strip() in ("", "cat"):
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        return
    try:
        proc = subprocess.Popen(shlex.split(pager), stdin=subprocess.PIPE)
    except OSError:
        sys.stdout.buffer.write(data)
        return
    try:
        proc.communicate(data)
    except BrokenPipeError:
        pass


def cmd_restore(args) -> int:
    from .api import Workspace
    ws = Workspace(args.cwd)
    paths = [_absolute(ws, p, args.base) for p in args.paths]
    with working(f"restoring from turn-{args.turn}"):
        done = ws.restore(args.turn, paths)
    for path, what in done:
        print(f"{path or '.'}: {what} (turn-{args.turn})")
    return 0


def cmd_run(args) -> int:
    import shutil
    import subprocess
    from .api import Workspace, _inside
    if not args.after_dashes:
        raise BadInput("run needs a command after --: cowfs run -- CMD [ARGS...]")
    ws = Workspace(args.cwd)
    here = os.path.realpath(args.base or ".")
    cwd = here if _inside(here, str(ws.path)) else str(ws.path)
    argv = args.after_dashes
    if shutil.which(argv[0], path=os.environ.get("PATH")) is None and not os.path.exists(
            os.path.join(cwd, argv[0])):
        raise BadInput(f"{argv[0]}: command not found")
    try:
        rc = subprocess.call(argv, cwd=cwd)
    except OSError as e:
        raise BadInput(f"{argv[0]}: {e.strerror}") from None
    turn = ws.checkpoint(args.message if args.message is not None else shlex_join(argv))
    print(f"cowfs: sealed turn-{turn.number} (exit status {rc})", file=sys.stderr)
    return rc if rc >= 0 else 128 - rc


def shlex_join(argv: list[str]) -> str:
    import shlex
    return shlex.join(argv)


def cmd_status(args) -> int:
    mount = control.find_mount(args.cwd)
    s = control.request(mount, "status")
    s.pop("ok", None)
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    print(f"mount:        {s['mountpoint']}")
    print(f"backing dir:  {s['backing']}")
    print(f"current turn: turn-{s['open_turn']} (open, {s['pending_changes']} changes); "
          f"last sealed turn-{s['last_turn']}")
    if s.get("oldest_turn"):
        print(f"history:      from turn-{s['oldest_turn']} (the turns before it were pruned)")
    if s.get("auto_prune"):
        limits = {k: v for k, v in s["auto_prune"].items() if k != "last" and v is not None}
        print("auto-prune:   after each checkpoint: " + ", ".join(f"{k.replace('_', '-')} {v}"
                                                            for k, v in limits.items()))
    print(f"capture mode: {s['capture_mode']}" +
          ("" if s["capture_mode"] == "reflink" else " (this filesystem cannot clone: pre-images are copies)"))
    print(f"store size:   {_size(s['store_bytes'])}")
    print(f"snapshots:    .snapshots ({s['snapdir']})")
    rules = (s.get("ignore") or {}).get("rules") or []
    print("ignore rules: " + ("; ".join(rules) + " (.cowfsignore, in force in this turn)" if rules
                              else "none (nothing is ignored)"))
    print(f"daemon pid:   {s['daemon_pid']}")
    requests = sorted(s.get("requests", {}).items(), key=lambda kv: -kv[1])
    print(f"requests:     {sum(n for _, n in requests):,} since mount" +
          "".join(f"{';' if i else ':'} {op} {n:,}" for i, (op, n) in enumerate(requests[:4])))
    if s.get("drift"):
        print(f"warning:      {s['drift']}")
    mirror = s.get("git_mirror")
    if mirror:
        print("git mirror:   " + (f"error: {mirror['error']}" if "error" in mirror else
                                   f"turn-{mirror['turn']} -> {mirror['sha'][:7]} ({mirror['repo']})"))
    return 0


def cmd_export_git(args) -> int:
    from .gitexport import TargetError, check_branch, resolve_target
    mount = control.find_mount(args.cwd)
    try:
        check_branch(args.branch)
        repo = None
        if args.to is not None:
            backing = control.request(mount, "status")["backing"]
            repo = resolve_target(args.to, args.branch, [mount.mountpoint, backing])
    except TargetError as e:
        raise BadInput(str(e)) from None
    # The daemon reaches REPO through this process's mount namespace (its own lacks most mounts).
    with working("exporting turns to git"):
        reply = control.request(mount, "export_git", repo=repo, branch=args.branch, pid=os.getpid())
    _print_export(reply)
    return 0


def _print_export(reply: dict) -> None:
    turns, empty, left_out = reply["turns"], [], {}
    for t in turns:
        detail = f"{t['written']} written, {t['deleted']} deleted"
        if t["empty_dirs"]:
            detail += f", {t['empty_dirs']} empty director{'y' if t['empty_dirs'] == 1 else 'ies'} left out"
            empty.append(f"turn-{t['turn']}")
        for kind, count in t["left_out"].items():
            left_out[kind] = left_out.get(kind, 0) + count
            detail += f", {count} {kind} left out"
        print(f"turn-{t['turn']} -> {t['sha'][:7]}  ({detail})")
    where = f"branch {reply['branch']} of {reply['repo']}"
    tip = reply["tip"]
    if not turns:
        print(f"nothing to export: {where} is at turn-{tip[0]} ({tip[1][:7]})" if tip else
              f"nothing to export to {where}")
        return
    print(f"exported {len(turns)} turn(s) to {where}; tip turn-{tip[0]} ({tip[1][:7]})")
    if empty:
        print(f"note: git cannot hold empty directories; left out in {len(empty)} turn(s): "
              + ", ".join(empty))
    if left_out:
        print("note: git cannot hold " + ", ".join(f"{kind} entries ({n})" for kind, n in left_out.items())
              + ": left out")


def cmd_prune(args) -> int:
    from .api import Workspace
    from .retention import Limits
    limits = Limits.parse(args.keep, args.older_than, args.max_store)   # bad input: nothing sent
    if not limits:
        raise BadInput("prune needs a limit: --keep N, --older-than DURATION or --max-store SIZE")
    r = Workspace(args.cwd).prune(limits, dry_run=args.dry_run).as_dict()
    removed = r["removed"]
    span = (f"turn-{removed[0]}" if len(removed) == 1 else
            f"turn-{removed[0]} .. turn-{removed[-1]}") if removed else ""
    if args.dry_run:
        print(f"would prune {len(removed)} turn(s) ({span}); the oldest turn kept would be "
              f"turn-{r['oldest']}; they hold about {_size(r['freed_bytes'])} "
              f"(allocated, shared extents counted in full) of the store's {_size(r['store_bytes'])}"
              if removed else f"nothing to prune: the oldest turn kept is turn-{r['oldest']}")
        return 0
    if removed:
        print(f"pruned {len(removed)} turn(s) ({span}); the oldest turn kept is turn-{r['oldest']}; "
              f"freed {_size(r['freed_bytes'])}")
    else:
        print(f"nothing to prune: the oldest turn kept is turn-{r['oldest']}"
              + (f" (freed {_size(r['freed_bytes'])} left by an earlier prune)" if r["rows"] else ""))
    if r.get("note"):
        print(f"cowfs: note: {r['note']}", file=sys.stderr)
    return 0


def cmd_fsck(args) -> int:
    from . import api
    report = api.fsck(args.workspace, args.repair)
    for finding in report.findings:
        print(finding.line())
    print(report.summary())
    return 0 if report.clean else EXIT_FAILED


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


COMMANDS = {"mount": cmd_mount, "umount": cmd_umount, "checkpoint": cmd_checkpoint,
            "rollback": cmd_rollback, "log": cmd_log, "status": cmd_status,
            "export-git": cmd_export_git, "diff": cmd_diff, "restore": cmd_restore, "run": cmd_run,
            "prune": cmd_prune, "fsck": cmd_fsck}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse, keeping what follows "--" of diff and run apart; -C before the command or after it
    (after wins) names where the command runs, as git -C."""
    argv = list(sys.argv[1:] if argv is None else argv)
    tail: list[str] = []
    command = next((a for a in argv if a in COMMANDS), None)
    if command in _AFTER_DASHES and "--" in argv:
        cut = argv.index("--")
        argv, tail = argv[:cut], argv[cut + 1:]
    args = build_parser(command_named(argv)).parse_args(argv)
    args.after_dashes = tail
    args.base = getattr(args, "cwd", None) or args.top_cwd    # relative paths are taken from here
    if hasattr(args, "cwd"):
        args.cwd = args.cwd or args.top_cwd or "."
    if args.top_cwd and args.command == "mount":
        args.workspace = os.path.join(args.top_cwd, args.workspace)
        if args.at:
            args.at = os.path.join(args.top_cwd, args.at)
    if args.top_cwd and args.command == "fsck":
        args.workspace = os.path.join(args.top_cwd, args.workspace)
    if args.top_cwd and args.command == "umount" and args.path:
        args.path = os.path.join(args.top_cwd, args.path)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except CowfsError as e:
        print(f"cowfs: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        print(f"cowfs: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
