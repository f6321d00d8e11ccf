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





def parse_turn(text: str) -> int:
    value = text.removeprefix("turn-")
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"not a turn: {text!r} (expected N or turn-N)")
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cowfs",
        description="Copy-on-write checkpoints of a workspace: mount cowfs over it, end each turn "
                    "with `cowfs checkpoint`, browse .snapshots/turn-N, `cowfs rollback N`.")
    parser.add_argument("--version", action="version", version=f"cowfs {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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

    p = sub.add_parser("log", help="list the turns", description="One line a turn.")
    _add_c(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")

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


def _add_c(p: argparse.ArgumentParser) -> None:
    p.add_argument("-C", dest="cwd", metavar="PATH", default=".",
                   help="any path inside the mount (default: the current directory)")


# -- mount / umount ------------------------------------------------------------------------
def cmd_mount(args) -> int:
    from . import mounting
    req = mounting.MountRequest(args.workspace, args.at, args.snapdir, args.force, args.debug,
                                args.export_git_on_checkpoint, args.owner, args.allow_other,
                                args.initial_message)
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


def cmd_rollback(args) -> int:
    reply = control.rollback(args.cwd, args.turn)
    if reply.get("sealed_pending") is not None:
        print(f"sealed pending changes as turn-{reply['sealed_pending']}")
    print(f"rolled back to turn-{reply['target']} (recorded as turn-{reply['turn']})")
    return 0


def cmd_log(args) -> int:
    turns = control.request(control.find_mount(args.cwd), "log")["turns"]
    if args.json:
        print(json.dumps(turns, indent=2))
        return 0
    for t in turns:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t["sealed"] or t["started"]))
        state = "" if t["sealed"] else " (open)"
        message = t["message"]
        if t["kind"] == "rollback":
            message = message or f"rollback to turn-{t['target']}"
        print(f"turn-{t['number']:<5} {when}  {t['changes']:>6} changed  {_size(t['bytes']):>9} captured"
              f"  {message}{state}")
    return 0


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
    print(f"capture mode: {s['capture_mode']}" +
          ("" if s["capture_mode"] == "reflink" else " (this filesystem cannot clone: pre-images are copies)"))
    print(f"store size:   {_size(s['store_bytes'])}")
    print(f"snapshots:    .snapshots ({s['snapdir']})")
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
            "export-git": cmd_export_git, "fsck": cmd_fsck}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
