"""The `cowfs` command line.

Owns argument parsing, the one-line errors and exit codes (2: bad input,
1: the operation failed), and the human-readable output. Everything but
`mount` talks to the daemon through control.py; `mount` starts the daemon
and returns once the mount is live.
"""

import argparse
import errno
import json
import os
import sys
import time

from . import __version__, control
from .errors import EXIT_FAILED, BadInput, CowfsError, OperationFailed

READY_TIMEOUT = 120.0
EXIT_TIMEOUT = 60.0


UsageError = BadInput       # exit 2
Failed = OperationFailed    # exit 1


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
    return parser


def _add_c(p: argparse.ArgumentParser) -> None:
    p.add_argument("-C", dest="cwd", metavar="PATH", default=".",
                   help="any path inside the mount (default: the current directory)")


# -- mount / umount ------------------------------------------------------------------------
def cmd_mount(args) -> int:
    from .daemon import MountOptions, run
    workspace = os.path.realpath(args.workspace)
    if not os.path.isdir(workspace):
        raise UsageError(f"{args.workspace} is not a directory")
    mountpoint = os.path.realpath(args.at) if args.at else workspace
    if args.at and not os.path.isdir(mountpoint):
        raise UsageError(f"{args.at} is not a directory")
    for path in {workspace, mountpoint}:
        _refuse_mounted(path)
    opts = MountOptions(workspace, mountpoint, args.snapdir == "visible", args.force, args.debug,
                        args.export_git_on_checkpoint, _owner_uid(args.owner), _allow_other(args))
    if args.foreground:
        return run(opts, args.ready_fd)
    return _spawn_daemon(args, workspace, mountpoint)


def _owner_uid(owner: str | None) -> int:
    """Who the control channel serves besides root: --owner, sudo's caller, or ourselves."""
    import pwd
    if os.geteuid() != 0:
        if owner is not None and owner not in (str(os.getuid()), pwd.getpwuid(os.getuid()).pw_name):
            raise UsageError("--owner needs root (a rootless mount belongs to whoever mounts it)")
        return os.getuid()
    if owner is None:
        return int(os.environ.get("SUDO_UID", "0") or 0)
    try:
        return pwd.getpwnam(owner).pw_uid
    except KeyError:
        if owner.isdigit():
            return int(owner)
        raise UsageError(f"--owner {owner}: no such user") from None


def _allow_other(args) -> bool:
    if os.geteuid() == 0:
        return True     # as before: other users reach files as their permissions allow
    if not args.allow_other:
        return False
    try:
        with open("/etc/fuse.conf") as f:
            allowed = any(line.split("#")[0].strip() == "user_allow_other" for line in f)
    except OSError:
        allowed = False
    if not allowed:
        raise UsageError("--allow-other needs user_allow_other in /etc/fuse.conf")
    return True


def _refuse_mounted(path: str) -> None:
    for m in control.cowfs_mounts():
        if m.mountpoint == path and _is_dead(path):
            _clear_dead_mount(path)
            print(f"cowfs: cleared the dead mount at {path} (its daemon had stopped)", file=sys.stderr)
        elif m.mountpoint == path:
            raise UsageError(f"{path} is already mounted")
        if path.startswith(m.mountpoint.rstrip("/") + "/"):
            raise UsageError(f"{path} is inside the cowfs mount {m.mountpoint}")


def _spawn_daemon(args, workspace: str, mountpoint: str) -> int:
    import subprocess
    read_end, write_end = os.pipe()
    argv = [sys.executable, "-m", "cowfs", "mount", workspace, "--at", mountpoint, "--foreground",
            "--snapdir", args.snapdir, "--ready-fd", str(write_end)]
    argv += ["--force"] if args.force else []
    argv += ["--debug"] if args.debug else []
    argv += ["--export-git-on-checkpoint"] if args.export_git_on_checkpoint else []
    argv += ["--owner", args.owner] if args.owner else []
    argv += ["--allow-other"] if args.allow_other else []
    proc = subprocess.Popen(argv, pass_fds=(write_end,), start_new_session=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    os.close(write_end)
    message = _read_ready(read_end, proc)
    if message == "ok" or message.startswith("ok "):
        print(f"mounted {mountpoint}" + (f" (workspace {workspace})" if mountpoint != workspace else ""))
        if message != "ok":
            print(f"cowfs: {message.removeprefix('ok ')}", file=sys.stderr)
        _warn_stale_cwds(mountpoint, proc.pid)
        return 0
    if message.startswith("error: "):
        raise UsageError(message.removeprefix("error: "))
    raise Failed(f"the daemon failed to start ({message or 'no message'}); "
                 f"see {workspace}/.cowfs/daemon.log")


def _read_ready(fd: int, proc) -> str:
    deadline = time.monotonic() + READY_TIMEOUT
    data = b""
    with os.fdopen(fd, "rb", buffering=0) as f:
        while b"\n" not in data and time.monotonic() < deadline:
            chunk = f.read(4096)
            if not chunk:
                break
            data += chunk
    if not data:
        code = proc.poll()
        return f"exit code {code}" if code is not None else "timed out"
    return data.decode(errors="replace").strip()


def _warn_stale_cwds(mountpoint: str, daemon_pid: int) -> None:
    """Processes already inside the mount point still see the directory underneath."""
    stale = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) in (os.getpid(), daemon_pid):
            continue
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        if cwd == mountpoint or cwd.startswith(mountpoint.rstrip("/") + "/"):
            stale.append(pid)
    if stale:
        print(f"cowfs: warning: {len(stale)} process(es) (e.g. pid {stale[0]}) were already inside "
              f"{mountpoint}: they bypass cowfs until they cd there again (cd \"$PWD\")",
              file=sys.stderr)


def _is_dead(mountpoint: str) -> bool:
    """A FUSE mount whose daemon is gone: the kernel answers ENOTCONN for it. Asked with a
    getxattr, which the kernel never answers from its cache (a stat of the root would be)."""
    try:
        os.getxattr(mountpoint, control.CONTROL_XATTR)
    except OSError as e:
        return e.errno == errno.ENOTCONN
    return False


def _clear_dead_mount(mountpoint: str) -> None:
    """Detach a dead mount (nothing can be flushed through it any more: its daemon is gone).
    What was written through it is on disk already or was lost with the daemon's process."""
    import subprocess
    for argv in (["fusermount3", "-u", "-z", mountpoint], ["umount", "-l", mountpoint]):
        if subprocess.run(argv, capture_output=True).returncode == 0:
            return
    raise Failed(f"cannot clear the dead mount at {mountpoint}: try `fusermount3 -u -z {mountpoint}`")


def cmd_umount(args) -> int:
    mount = control.find_mount(args.path or args.cwd)
    if _is_dead(mount.mountpoint):
        _clear_dead_mount(mount.mountpoint)
        print(f"cleared the dead mount at {mount.mountpoint} (its daemon had stopped; "
              "`cowfs mount` recovers its open turn)")
        return 0
    control.syncfs(mount)
    reply = control.request(mount, "umount")
    import subprocess
    argv = ["fusermount3", "-u", *(["-z"] if args.lazy else []), mount.mountpoint]
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        if os.geteuid() == 0 or not _unmount_by_daemon(mount, args.lazy):
            raise Failed(_why_not_unmounted(mount.mountpoint, result.stderr, reply["pid"]))
    if reply.get("sealed") is not None:
        print(f"sealed turn-{reply['sealed']}")
    if args.lazy:
        print(f"detached {mount.mountpoint}; the daemon serves the processes still inside it and "
              "seals their changes as a last turn when the last one leaves")
        return 0
    _wait_exit(reply["pid"])
    print(f"unmounted {mount.mountpoint}")
    return 0


def _unmount_by_daemon(mount: control.Mount, lazy: bool) -> bool:
    """The owner of a root mount: fusermount3 refuses them, their root daemon may not.
    True if the mount is gone (or detached) afterwards."""
    try:
        control.request(mount, "unmount", lazy=lazy, timeout=EXIT_TIMEOUT)
    except CowfsError:
        pass    # refused (busy, say), or the daemon ended with its mount before it answered
    return not any(m.mountpoint == mount.mountpoint for m in control.cowfs_mounts())


def _why_not_unmounted(mountpoint: str, stderr: str, daemon_pid: int) -> str:
    holders = _processes_inside(mountpoint, {os.getpid(), daemon_pid})
    if not holders:
        reason = stderr.strip().splitlines()[-1] if stderr.strip() else "unknown"
        return (f"cannot unmount {mountpoint}: {reason} (by processes this user cannot see); "
                "pending changes were sealed. `cowfs umount --lazy` detaches it now")
    shown = "; ".join(f"pid {pid} ({comm}) {what}" for pid, comm, what in holders[:5])
    more = f" and {len(holders) - 5} more" if len(holders) > 5 else ""
    return (f"cannot unmount {mountpoint}: in use by {shown}{more}; pending changes were sealed. "
            "Stop them, or `cowfs umount --lazy` to detach now")


def _processes_inside(mountpoint: str, exclude: set[int]) -> list[tuple[int, str, str]]:
    """(pid, command, what it holds) of each process with its cwd, root or an open file inside
    (the daemon's own descriptors name the directory underneath by the same path: excluded)."""
    inside = mountpoint.rstrip("/") + "/"
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) in exclude:
            continue
        what = _held_inside(int(pid), mountpoint, inside)
        if what:
            try:
                with open(f"/proc/{pid}/comm") as f:
                    comm = f.read().strip()
            except OSError:
                continue
            found.append((int(pid), comm, what))
    return found


def _held_inside(pid: int, mountpoint: str, inside: str) -> str | None:
    def within(link: str) -> bool:
        return link == mountpoint or link.startswith(inside)
    for name in ("cwd", "root"):
        try:
            link = os.readlink(f"/proc/{pid}/{name}")
        except OSError:
            continue
        if within(link):
            return f"has its {'working directory' if name == 'cwd' else 'root'} at {link}"
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if within(link):
            return f"has {link} open"
    return None


def _wait_exit(pid: int) -> None:
    deadline = time.monotonic() + EXIT_TIMEOUT
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ")[-1].startswith("Z"):
                    return
        except OSError:
            return
        time.sleep(0.02)


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
        raise UsageError(str(e)) from None
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


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


COMMANDS = {"mount": cmd_mount, "umount": cmd_umount, "checkpoint": cmd_checkpoint,
            "rollback": cmd_rollback, "log": cmd_log, "status": cmd_status,
            "export-git": cmd_export_git}


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
