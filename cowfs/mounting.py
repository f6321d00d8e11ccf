"""Starting and stopping a mount: what `cowfs mount`/`umount` and `cowfs.mount()` share.

Owns the checks before a daemon starts (a directory, not mounted yet, not
inside another mount, a dead mount cleared), the options taken from the
caller (owner, allow_other), the daemon process and its ready pipe, and the
unmount (busy mounts explained, `--lazy`, the owner of a root mount). It
returns typed results and raises `cowfs.errors`; printing is the CLI's.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

from . import control
from .errors import BadInput, CowfsError, OperationFailed

READY_TIMEOUT = 120.0
EXIT_TIMEOUT = 60.0


@dataclass
class MountRequest:
    """What the caller asked for (`cowfs mount --help` says what each means)."""
    workspace: str
    at: str | None = None
    snapdir: str = "hidden"
    force: bool = False
    debug: bool = False
    export_git_on_checkpoint: bool = False
    owner: str | None = None
    allow_other: bool = False
    message: str = ""           # for turn 0 of a new store (the compat manager's reason)
    auto_checkpoint: float | None = None   # seal after this many quiet seconds (a watcher)
    keep: int | str | None = None         # prune limits after each checkpoint (retention.Limits)
    older_than: float | str | None = None
    max_store: int | str | None = None
    options: str = ""           # -o: comma-separated mount options (ATIME_OPTIONS)
    idle_umount: float | str | None = None  # unmount after this long idle (seconds, or "10m")


@dataclass
class Mounted:
    workspace: str
    mountpoint: str
    daemon_pid: int
    notes: list[str] = field(default_factory=list)      # one line each: recovered, cleared, ...
    stale_cwds: list[int] = field(default_factory=list)  # processes already inside: they bypass it


@dataclass
class Unmounted:
    mountpoint: str
    sealed: int | None = None   # the turn pending changes were sealed as
    detached: bool = False      # --lazy: still served until its last user leaves
    cleared_dead: bool = False  # its daemon had died: only the dead mount was removed


def options(req: MountRequest):
    """The daemon's MountOptions for *req*, after every check that needs no daemon."""
    from .daemon import MountOptions
    from .retention import Limits
    workspace = os.path.realpath(os.path.expanduser(req.workspace))
    if not os.path.isdir(workspace):
        raise BadInput(f"{req.workspace} is not a directory")
    mountpoint = os.path.realpath(req.at) if req.at else workspace
    if req.at and not os.path.isdir(mountpoint):
        raise BadInput(f"{req.at} is not a directory")
    if req.auto_checkpoint is not None and not req.auto_checkpoint > 0:
        raise BadInput(f"--auto-checkpoint {req.auto_checkpoint}: expected a number of seconds > 0")
    idle_seconds(req)
    if req.snapdir not in ("hidden", "visible"):
        raise BadInput(f"--snapdir {req.snapdir}: expected hidden or visible")
    reason = fuse_unavailable_reason(workspace)
    if reason:
        raise BadInput(reason)
    if req.export_git_on_checkpoint and not _has_git():
        raise BadInput("--export-git-on-checkpoint needs git, which is not installed (install git)")
    limits = Limits.parse(req.keep, req.older_than, req.max_store)
    atime, nodiratime = atime_options(req.options)
    return MountOptions(workspace, mountpoint, req.snapdir == "visible", req.force, req.debug,
                        req.export_git_on_checkpoint, owner_uid(req.owner), allow_other(req.allow_other),
                        req.message, prune_limits=limits, atime=atime, nodiratime=nodiratime)


ATIME_OPTIONS = ("noatime", "relatime", "strictatime", "nodiratime")


def atime_options(text: str) -> tuple[str, bool]:
    """The atime policy ("": the backing mount's) and nodiratime that `-o` options ask for;
    the last of noatime, relatime, strictatime wins, as with mount(8)."""
    atime, nodiratime = "", False
    for option in filter(None, text.split(",")):
        if option not in ATIME_OPTIONS:
            raise BadInput(f"-o {option}: cowfs takes {', '.join(ATIME_OPTIONS)}")
        if option == "nodiratime":
            nodiratime = True
        else:
            atime = option
    return atime, nodiratime


def _has_git() -> bool:
    import shutil
    return shutil.which("git") is not None


def owner_uid(owner: str | None) -> int:
    """Who the control channel serves besides root: --owner, sudo's caller, or ourselves."""
    import pwd
    if os.geteuid() != 0:
        if owner is not None and owner not in (str(os.getuid()), pwd.getpwuid(os.getuid()).pw_name):
            raise BadInput("--owner needs root (a rootless mount belongs to whoever mounts it)")
        return os.getuid()
    if owner is None:
        return int(os.environ.get("SUDO_UID", "0") or 0)
    try:
        return pwd.getpwnam(owner).pw_uid
    except KeyError:
        if owner.isdigit():
            return int(owner)
        raise BadInput(f"--owner {owner}: no such user") from None


def allow_other(asked: bool) -> bool:
    if os.geteuid() == 0:
        return True     # as before: other users reach files as their permissions allow
    if not asked:
        return False
    try:
        with open("/etc/fuse.conf") as f:
            allowed = any(line.split("#")[0].strip() == "user_allow_other" for line in f)
    except OSError:
        allowed = False
    if not allowed:
        raise BadInput("--allow-other needs user_allow_other in /etc/fuse.conf")
    return True


def mount(req: MountRequest) -> Mounted:
    """Start a daemon for *req*; return once the mount is live (or raise)."""
    opts = options(req)
    notes = []
    for path in {opts.workspace, opts.mountpoint}:
        notes += refuse_mounted(path)
        refuse_around(path)
    pid, note = _spawn_daemon(req, opts)
    notes += [note] if note else []
    if req.auto_checkpoint or req.idle_umount:
        _spawn_watcher(opts.mountpoint, req.auto_checkpoint or 0, pid, idle_seconds(req))
    return Mounted(opts.workspace, opts.mountpoint, pid, notes, processes_with_cwd_in(opts.mountpoint, pid))


def refuse_mounted(path: str) -> list[str]:
    """Raise if *path* is mounted or inside a mount; clear a dead mount there (and say so)."""
    notes = []
    for m in control.cowfs_mounts():
        if m.mountpoint == path and is_dead(path):
            clear_dead_mount(path)
            notes.append(f"cleared the dead mount at {path} (its daemon had stopped)")
        elif m.mountpoint == path:
            raise BadInput(f"{path} is already mounted")
        if path.startswith(m.mountpoint.rstrip("/") + "/"):
            raise BadInput(f"{path} is inside the cowfs mount {m.mountpoint}")
    return notes


# How cowfs starts a process of its own: -P, so that `-m` imports the installed cowfs and not a
# `cowfs/` directory in the caller's working directory (PYTHONPATH, the editable install's .pth
# and a rootless user's site still count), from "/", which holds no mount the child would keep busy.
CHILD = (sys.executable, "-P")


def refuse_around(path: str) -> None:
    """Raise if a cowfs mount lies below *path*: a mount around it would make every file below
    it unreadable (one history per directory tree)."""
    inside = path.rstrip("/") + "/"
    for m in control.cowfs_mounts():
        if m.mountpoint.startswith(inside):
            raise BadInput(f"{m.mountpoint} is a cowfs mount inside {path}: unmount it first "
                           "(a mount around it would hide it; one history per directory tree)")


def _spawn_daemon(req: MountRequest, opts) -> tuple[int, str]:
    read_end, write_end = os.pipe()
    argv = [*CHILD, "-m", "cowfs", "mount", opts.workspace, "--at", opts.mountpoint,
            "--foreground", "--snapdir", req.snapdir, "--ready-fd", str(write_end)]
    flags = {"--force": req.force, "--debug": req.debug, "--allow-other": req.allow_other,
             "--export-git-on-checkpoint": req.export_git_on_checkpoint}
    argv += [flag for flag, on in flags.items() if on]
    argv += ["--owner", req.owner] if req.owner else []
    argv += ["--initial-message", req.message] if req.message else []
    argv += ["-o", req.options] if req.options else []
    limits = opts.prune_limits
    argv += ["--keep", str(limits.keep)] if limits.keep is not None else []
    argv += ["--older-than", f"{limits.older_than}s"] if limits.older_than is not None else []
    argv += ["--max-store", str(limits.max_store)] if limits.max_store is not None else []
    # What the daemon says before its own log exists (it lives in the store it has yet to
    # open) goes to a file of the caller's: kept, and named, only if the daemon fails to start.
    import tempfile
    err_fd, err_path = tempfile.mkstemp(prefix="cowfs-daemon-", suffix=".log")
    try:
        proc = subprocess.Popen(argv, pass_fds=(write_end,), start_new_session=True, cwd="/",
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err_fd)
    finally:
        os.close(err_fd)
        os.close(write_end)
    message = _read_ready(read_end, proc)
    if message == "ok" or message.startswith("ok "):
        os.unlink(err_path)
        return proc.pid, message.removeprefix("ok").strip()
    if message.startswith("error: "):
        os.unlink(err_path)
        raise BadInput(message.removeprefix("error: "))
    raise OperationFailed(f"the daemon failed to start ({message or 'no message'}"
                          f"{_last_line(err_path)}); see {err_path}")


def _last_line(path: str) -> str:
    """The last line the daemon wrote to stderr (a traceback's names the exception), after ": "."""
    try:
        with open(path, errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        return ""
    return f": {lines[-1]}" if lines else ""


def idle_seconds(req: MountRequest) -> float | None:
    """--idle-umount in seconds (None: never); BadInput unless a duration > 0."""
    from .retention import parse_duration
    idle = req.idle_umount
    if idle is None:
        return None
    seconds = parse_duration(idle) if isinstance(idle, str) else float(idle)
    if not seconds > 0:
        raise BadInput(f"--idle-umount {idle}: expected a duration > 0 (e.g. 90s, 10m)")
    return seconds


def _spawn_watcher(mountpoint: str, quiet: float, daemon_pid: int, idle: float | None) -> None:
    """The watcher of --auto-checkpoint and --idle-umount (autocheckpoint.py), outside the mount
    so it never keeps it busy."""
    argv = [*CHILD, "-m", "cowfs.autocheckpoint", mountpoint, str(quiet), str(daemon_pid)]
    subprocess.Popen(argv + ([str(idle)] if idle else []), cwd="/", start_new_session=True,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


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


def processes_with_cwd_in(mountpoint: str, daemon_pid: int) -> list[int]:
    """Processes already inside the mount point: they still see the directory underneath."""
    return [pid for pid, _, what in processes_inside(mountpoint, {os.getpid(), daemon_pid},
                                                      fds=False)]


# -- dead mounts ---------------------------------------------------------------------------
def is_dead(mountpoint: str) -> bool:
    """A FUSE mount whose daemon is gone: the kernel answers ENOTCONN for it. Asked with a
    getxattr, which the kernel never answers from its cache (a stat of the root would be)."""
    try:
        os.getxattr(mountpoint, control.CONTROL_XATTR)
    except OSError as e:
        return e.errno == errno.ENOTCONN
    return False


def clear_dead_mount(mountpoint: str) -> None:
    """Detach a dead mount (nothing can be flushed through it any more: its daemon is gone).
    What was written through it is on disk already or was lost with the daemon's process."""
    for argv in (["fusermount3", "-u", "-z", mountpoint], ["umount", "-l", mountpoint]):
        if subprocess.run(argv, capture_output=True).returncode == 0:
            return
    raise OperationFailed(f"cannot clear the dead mount at {mountpoint}: "
                          f"try `fusermount3 -u -z {mountpoint}`")


# -- unmounting ----------------------------------------------------------------------------
def unmount(path: str, lazy: bool = False) -> Unmounted:
    """Seal pending changes, unmount the mount containing *path*, wait for its daemon to end."""
    mount = control.find_mount(path)
    if is_dead(mount.mountpoint):
        clear_dead_mount(mount.mountpoint)
        return Unmounted(mount.mountpoint, cleared_dead=True)
    reply = control.request(mount, "umount")      # served by Daemon._op_seal_before_unmount
    argv = ["fusermount3", "-u", *(["-z"] if lazy else []), mount.mountpoint]
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        if os.geteuid() == 0 or not _unmount_by_daemon(mount, lazy):
            raise OperationFailed(_why_not_unmounted(mount.mountpoint, result.stderr, reply["pid"]))
    if not lazy:
        wait_exit(reply["pid"])
    return Unmounted(mount.mountpoint, reply.get("sealed"), detached=lazy)


def _unmount_by_daemon(mount: control.Mount, lazy: bool) -> bool:
    """The owner of a root mount: fusermount3 refuses them, their root daemon may not.
    True if the mount is gone (or detached) afterwards."""
    try:
        control.request(mount, "unmount", lazy=lazy, timeout=EXIT_TIMEOUT)    # _op_unmount_for_owner
    except CowfsError:
        pass    # refused (busy, say), or the daemon ended with its mount before it answered
    return not any(m.mountpoint == mount.mountpoint for m in control.cowfs_mounts())


def _why_not_unmounted(mountpoint: str, stderr: str, daemon_pid: int) -> str:
    holders = processes_inside(mountpoint, {os.getpid(), daemon_pid})
    if not holders:
        reason = stderr.strip().splitlines()[-1] if stderr.strip() else "unknown"
        return (f"cannot unmount {mountpoint}: {reason} (by processes this user cannot see); "
                "pending changes were sealed. `cowfs umount --lazy` detaches it now")
    shown = "; ".join(f"pid {pid} ({comm}) {what}" for pid, comm, what in holders[:5])
    more = f" and {len(holders) - 5} more" if len(holders) > 5 else ""
    return (f"cannot unmount {mountpoint}: in use by {shown}{more}; pending changes were sealed. "
            "Stop them, or `cowfs umount --lazy` to detach now")


def processes_inside(mountpoint: str, exclude: set[int], fds: bool = True) -> list[tuple[int, str, str]]:
    """(pid, command, what it holds) of each process with its cwd, root or (if *fds*) an open
    file inside (the daemon's own descriptors name the directory underneath by the same path:
    exclude it)."""
    inside = mountpoint.rstrip("/") + "/"
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) in exclude:
            continue
        what = _held_inside(int(pid), mountpoint, inside, fds)
        if what:
            try:
                with open(f"/proc/{pid}/comm") as f:
                    comm = f.read().strip()
            except OSError:
                continue
            found.append((int(pid), comm, what))
    return found


def _held_inside(pid: int, mountpoint: str, inside: str, fds: bool) -> str | None:
    """What process *pid* holds inside the mount, in words; None if nothing we can see."""
    links = [(name, f"/proc/{pid}/{name}") for name in ("cwd", "root")]
    if fds:
        try:
            links += [("fd", f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            pass
    for kind, proc_link in links:
        try:
            link = os.readlink(proc_link)
        except OSError:
            continue
        if link == mountpoint or link.startswith(inside):
            return {"cwd": f"has its working directory at {link}",
                    "root": f"has its root at {link}"}.get(kind, f"has {link} open")
    return None


def wait_exit(pid: int) -> None:
    deadline = time.monotonic() + EXIT_TIMEOUT
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ")[-1].startswith("Z"):
                    return
        except OSError:
            return
        time.sleep(0.02)


# -- can FUSE mount here? ------------------------------------------------------------------
CONTAINER_FIX = "docker run --device /dev/fuse --cap-add SYS_ADMIN"


def fuse_unavailable_reason(path) -> str | None:
    """Why cowfs cannot mount over directory *path* on this machine, and the fix, in one line;
    None when nothing that can be seen without mounting stands in the way (or *path* is in a
    cowfs mount already). Looks at the directory, /dev/fuse and its driver, fusermount3, root's
    capability, the filesystem holding *path* (another FUSE filesystem cannot be stacked on) and
    whether it can be written. A syscall or two a check."""
    import shutil
    path = os.path.realpath(os.path.expanduser(os.fspath(path)))
    if not os.path.isdir(path):
        return f"{path} is not a directory"
    fstype = _fstype_of(path)
    if fstype == "fuse.cowfs":
        return None
    root = os.geteuid() == 0
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC))
    except FileNotFoundError:
        return ("there is no /dev/fuse: load the FUSE kernel module (modprobe fuse) or, in a "
                f"container, pass the device in ({CONTAINER_FIX})")
    except OSError as e:
        if e.errno in (errno.ENODEV, errno.ENXIO):
            return "/dev/fuse has no driver: load the FUSE kernel module (modprobe fuse)"
        if root or e.errno == errno.EPERM:      # a container's device rules
            return f"cannot open /dev/fuse ({e.strerror}): in a container, allow it ({CONTAINER_FIX})"
        return (f"cannot open /dev/fuse ({e.strerror}): make it usable by everyone as udev does "
                "(as root: chmod 0666 /dev/fuse), or mount as root")
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed (it mounts and unmounts FUSE): install fuse3"
    if root and not _capability(21):            # CAP_SYS_ADMIN
        return f"root without CAP_SYS_ADMIN (in a container?) cannot mount FUSE: {CONTAINER_FIX}"
    if fstype and (fstype == "fuse" or fstype.startswith(("fuse.", "fuseblk"))):
        return f"{path} is on a {fstype} filesystem: cowfs does not mount over another FUSE filesystem"
    try:
        read_only = os.statvfs(path).f_flag & os.ST_RDONLY
    except OSError:
        return None     # a dead mount there (mount() clears it), say: the mount tells what it is
    if read_only:
        return f"{path} is on a read-only filesystem: cowfs keeps the history beside it, in .cowfs"
    if not root and not os.access(path, os.W_OK):
        return f"{path} is not writable by you: mount a directory you own (or mount as root)"
    return None


def _capability(bit: int) -> bool:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> bit & 1)
    return False


def _fstype_of(path: str) -> str | None:
    """The type of the filesystem *path* is on (the deepest mount holding it), per mountinfo."""
    best, fstype = "", None
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            for line in f:
                fields = line.split()
                point = fields[4].decode(errors="surrogateescape")
                point = point.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n")
                inside = path == point or path.startswith(point.rstrip("/") + "/")
                if inside and len(point) >= len(best):
                    best, fstype = point, fields[fields.index(b"-") + 1].decode()
    except (OSError, ValueError, IndexError):
        return None
    return fstype
