"""The control channel between the CLI and a mounted daemon.

Owns the wire format (one JSON object per line, one request and one reply
per connection) and how the CLI finds the daemon of a path: the innermost
cowfs mount containing it (from /proc/self/mountinfo), whose root answers
the extended attribute `user.cowfs.control` with the socket's address. The
socket is in the abstract namespace (the store is hidden under the mount);
the daemon serves only root and the mount's owner (SO_PEERCRED).

json is imported where it is used: checkpoint_in_one_shot, the path of a plain
`cowfs checkpoint`, does without it (and without socket.py and ctypes).
"""

import os

from .errors import CowfsError, DaemonUnreachable, NotMounted, OperationFailed, from_reply

FSTYPE = "fuse.cowfs"
CONTROL_XATTR = "user.cowfs.control"
MAX_MESSAGE = 1 << 20       # a request
MAX_REPLY = 1 << 30         # a reply (a diff of a huge turn is long)
# After a rollback the refresher (the client that asked for it) reaches each restored
# file the kernel still knows at REFRESH_PREFIX + its FUSE inode number in the root,
# whichever names the kernel knows it by: see Daemon.kernel_refresh_list.
REFRESH_PREFIX = b".cowfs-refresh-"




class Mount:
    """A cowfs mount as /proc/self/mountinfo shows it.

    A plain class, not a NamedTuple: importing typing would add ~2 ms to every command.
    """
    __slots__ = ("mountpoint", "source", "socket", "dev")

    def __init__(self, mountpoint: str, source: str, dev: int = 0):
        self.mountpoint, self.source, self.dev = mountpoint, source, dev   # dev: as st_dev
        self.socket: bytes | None = None    # the control socket's path once known (a watcher
                                            # polls without making requests of the mount)

    def __repr__(self):
        return f"Mount({self.mountpoint!r}, {self.source!r})"


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) + 1 and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def cowfs_mounts() -> list[Mount]:
    mounts = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, rfields = left.split(), right.split()
            if rfields and rfields[0] == FSTYPE:
                major, _, minor = fields[2].partition(":")
                mounts.append(Mount(_unescape(fields[4]), _unescape(rfields[1]),
                                    os.makedev(int(major), int(minor))))
    return mounts


def any_mount_at(path: str) -> bool:
    """True if anything at all is mounted at *path*."""
    with open("/proc/self/mountinfo") as f:
        return any(_unescape(line.split()[4]) == path for line in f)


def find_mount(path: str) -> Mount:
    """The innermost cowfs mount that contains *path*."""
    real = os.path.realpath(path)
    best = None
    for m in cowfs_mounts():
        if real == m.mountpoint or real.startswith(m.mountpoint.rstrip("/") + "/"):
            if best is None or len(m.mountpoint) > len(best.mountpoint):
                best = m
    if best is None:
        raise NotMounted(f"{path} is not inside a cowfs mount; {mounts_in_words()}")
    return best


def mounts_in_words() -> str:
    """The cowfs mounts there are, for an error that says where to go instead."""
    names = [m.mountpoint for m in cowfs_mounts()]
    if not names:
        return "no cowfs mount exists (cowfs mount WORKSPACE makes one)"
    more = f" and {len(names) - 5} more (cowfs status)" if len(names) > 5 else ""
    return f"cowfs mounts: {', '.join(names[:5])}{more} (-C PATH names one)"


def mount_of_daemon(daemon_pid: int) -> Mount | None:
    """The mount daemon *daemon_pid* serves, wherever it is now (a mount moves with its parent
    directory: `mv` of a directory above it); None if it serves none."""
    for m in cowfs_mounts():
        try:
            if request(m, "activity", timeout=10)["daemon_pid"] == daemon_pid:
                return m
        except (CowfsError, OSError):
            continue        # another user's, or a dead mount
    return None


def socket_path(mount: Mount) -> bytes:
    if mount.socket is not None:
        return mount.socket
    try:
        return os.getxattr(mount.mountpoint, CONTROL_XATTR)
    except OSError as e:
        raise DaemonUnreachable(f"cannot reach the cowfs daemon of {mount.mountpoint}: {e.strerror}") from None


def request(mount: Mount, op: str, timeout: float | None = None, **args) -> dict:
    """Send one request to the daemon of *mount*; return its reply, or raise the CowfsError its failure stands for."""
    import json
    return _decoded(_exchange(mount, json.dumps({"op": op, **args}).encode() + b"\n", timeout))


def _exchange(mount: Mount, message: bytes, timeout: float | None = None) -> bytes:
    """One connection: *message* (a line) out, the reply's bytes back."""
    import _socket      # socket.py would import enum and selectors: ~5 ms of a one-shot CLI
    address = socket_path(mount)
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(address)
        except OSError as e:
            raise DaemonUnreachable(f"cannot connect to the cowfs daemon of {mount.mountpoint}: "
                                    f"{e.strerror}") from None
        sock.sendall(message)
        return _read_line(sock, MAX_REPLY)
    finally:
        sock.close()


def _decoded(data: bytes) -> dict:
    import json
    reply = json.loads(data) if data.strip() else None
    if reply is None:
        raise DaemonUnreachable("the cowfs daemon closed the connection without answering")
    if not reply.get("ok"):
        raise from_reply(reply)
    return reply


def checkpoint(path: str, message: str = "") -> int:
    """End the current turn of the mount containing *path*; return the sealed turn.

    What `cowfs checkpoint` does, for harnesses that would rather not start a process.
    """
    return request(find_mount(path), "checkpoint", message=message)["turn"]


# The reply to a brief checkpoint, as the daemon's json.dumps writes it; anything else (an
# error) is decoded in full.
_BRIEF_REPLY = b'{"ok": true, "turn": '


def checkpoint_in_one_shot(path: str, message: str = "") -> int:
    """checkpoint() for a process that makes this one request: the daemon answers with the turn
    alone (`brief`), so a plain message and the usual reply need no json (~5 ms with the re it
    imports)."""
    mount = find_mount(path)
    text = message
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        quoted = f'"{text}"'
    else:
        import json
        quoted = json.dumps(text)
    line = f'{{"op": "checkpoint", "message": {quoted}, "brief": true}}\n'
    data = _exchange(mount, line.encode())
    turn = data[len(_BRIEF_REPLY):-2]
    if data.startswith(_BRIEF_REPLY) and data.endswith(b"}\n") and turn.isdigit():
        return int(turn)
    return _decoded(data)["turn"]


def rollback(path: str, turn: int) -> dict:
    """Make the mount containing *path* exactly sealed turn *turn*; return the daemon's reply
    (`turn`: the rollback's own turn, `target`, `sealed_pending`: the turn pending changes were
    sealed as first, or None)."""
    return _history_request(find_mount(path), "rollback", turn=turn)


def restore(mount: Mount, turn: int, paths: list[str]) -> dict:
    """Restore *paths* (relative to the root) of *mount* to sealed turn *turn*; the daemon's reply
    (`restored`: [path, what was done] per path). Like a rollback, the kernel is then told the
    restored files' sizes (refresh_kernel_view)."""
    return _history_request(mount, "restore", turn=turn, paths=paths)


def _history_request(mount: Mount, op: str, **args) -> dict:
    """A rollback or restore, then the refresh of the kernel's view it asks this thread for:
    also when it failed part-way, or the kernel would keep serving what it changed as before."""
    import threading
    try:
        reply = request(mount, op, tid=threading.get_native_id(), uid=os.getuid(), **args)
    except CowfsError as e:
        refresh_kernel_view(mount, e.details.get("refresh", []))
        raise
    refresh_kernel_view(mount, reply.get("refresh", []))
    return reply


def refresh_kernel_view(mount: Mount, targets: list) -> None:
    """Tell the kernel the size, mode and mtime of each restored file it still knows.

    With the writeback cache only a setattr through the mount changes what the
    kernel caches for a regular file. Each target is reached by its reserved
    name in the mount's root, which resolves (for this thread only, while the
    daemon expects it) to the inode the kernel caches, whatever names the
    kernel knows the file by. See Daemon.kernel_refresh_list.
    """
    if not targets:
        return
    try:
        for nodeid, size, mode, atime_ns, mtime_ns in targets:
            path = os.path.join(os.fsencode(mount.mountpoint), REFRESH_PREFIX + b"%d" % nodeid)
            try:
                _set_kernel_attrs(path, size, mode, atime_ns, mtime_ns)
            except FileNotFoundError:
                pass    # forgotten meanwhile: the next lookup takes the daemon's attributes
    finally:
        request(mount, "rollback_done")


def _set_kernel_attrs(path: bytes, size: int, mode: int, atime_ns: int, mtime_ns: int) -> None:
    if os.stat(path).st_size != size:
        try:
            os.truncate(path, size)
        except PermissionError:
            # A read-only file: the owner may make it writable for a moment (the
            # daemon passes the refresher's setattrs through uncaptured).
            os.chmod(path, mode | 0o200)
            try:
                os.truncate(path, size)
            finally:
                os.chmod(path, mode)
    os.utime(path, ns=(atime_ns, mtime_ns))


def _read_line(sock, limit: int = MAX_MESSAGE) -> bytes:
    chunks, size = [], 0
    while not chunks or not chunks[-1].endswith(b"\n"):
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise OperationFailed("control message too large")
    return b"".join(chunks)
