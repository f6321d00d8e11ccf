"""Processes, timing, signals, the mount table and the throw-away XFS image.

Every resource the benchmark creates (loop device, XFS mount, FUSE mounts,
temporary directory) is owned by a context manager whose ``finally`` block
releases it.  SIGINT and SIGTERM are turned into an ``Interrupted`` exception
so those ``finally`` blocks run; while cleanup runs, further signals are
deferred (``shielded``) so a second Ctrl-C cannot leave a loop device behind.
"""

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


# --------------------------------------------------------------------------
# signals


class Interrupted(BaseException):
    """Raised in the main thread on SIGINT/SIGTERM (not an Exception, so the
    per-measurement error handling does not swallow it)."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


_shield_depth = 0
_pending_signal = None


def _on_signal(signum, _frame):
    global _pending_signal
    if _shield_depth:
        _pending_signal = signum
        warn(f"signal {signum} received during cleanup; finishing cleanup first")
        return
    raise Interrupted(signum)


def install_signal_handlers():
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _on_signal)


@contextlib.contextmanager
def shielded():
    """Defer SIGINT/SIGTERM while the body (cleanup code) runs."""
    global _shield_depth, _pending_signal
    _shield_depth += 1
    try:
        yield
    finally:
        _shield_depth -= 1
    if _shield_depth == 0 and _pending_signal is not None:
        signum, _pending_signal = _pending_signal, None
        raise Interrupted(signum)


# --------------------------------------------------------------------------
# logging

_T0 = time.monotonic()


def log(msg):
    print(f"[{time.monotonic() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def warn(msg):
    print(f"bench: warning: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# processes


def first_line(text):
    """The line of a command's stderr that goes into an error row: the first
    non-empty one, except after a Python traceback or an argparse usage block,
    where the last line is the one that says what went wrong."""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not lines:
        return ""
    if lines[0].startswith(("Traceback (most recent call last)", "usage:")):
        return lines[-1]
    return lines[0]


class CommandFailed(Exception):
    def __init__(self, argv, returncode, stderr):
        self.argv = argv
        self.returncode = returncode
        self.detail = first_line(stderr) or f"exit status {returncode}"
        super().__init__(f"error: {self.detail}")


def run(argv, *, cwd=None, env=None, ok=(0,), timeout=None, capture=True):
    """Run ``argv`` (a list, or a string for ``bash -o pipefail -c``); raise CommandFailed
    when the exit status is not in ``ok``.  stdout goes to a pipe (never to
    /dev/null: GNU grep stops at the first match when writing to /dev/null)."""
    if isinstance(argv, str):
        argv = ["bash", "-o", "pipefail", "-c", argv]
    argv = [str(a) for a in argv]
    try:
        cp = subprocess.run(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as e:
        raise CommandFailed(argv, None, f"timed out after {timeout} s") from e
    if cp.returncode not in ok:
        raise CommandFailed(argv, cp.returncode, cp.stderr)
    return cp


def timed(fn, *args, **kwargs):
    """Call fn; return (elapsed milliseconds, result)."""
    t0 = time.perf_counter()
    result = fn(*args, **kwargs)
    return (time.perf_counter() - t0) * 1000.0, result


def timed_run(argv, **kwargs):
    """Milliseconds taken by one whole command."""
    return timed(run, argv, **kwargs)[0]


# --------------------------------------------------------------------------
# filesystem facts

_libc = None


def syncfs(path):
    """syncfs(2) on the filesystem holding ``path`` (os.sync() as fallback)."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(path, os.O_RDONLY)
        try:
            if _libc.syncfs(fd) != 0:
                raise OSError(ctypes.get_errno(), "syncfs")
        finally:
            os.close(fd)
    except (OSError, AttributeError):
        os.sync()


def used_bytes(path):
    """Bytes allocated on the filesystem holding ``path`` (statvfs: shared
    reflink extents are counted once, unlike summing st_blocks)."""
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def _unescape_mountinfo(field):
    # mountinfo escapes space, tab, newline and backslash as \ooo
    out, i = bytearray(), 0
    raw = field.encode()
    while i < len(raw):
        octal = raw[i + 1:i + 4]
        if raw[i] == 0x5C and len(octal) == 3 and octal.isdigit():
            out.append(int(octal, 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return os.fsdecode(bytes(out))


def mount_table():
    """List of (mount point, fstype) from /proc/self/mountinfo, in mount order."""
    table = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            fstype = right.split()[0] if right else "?"
            table.append((_unescape_mountinfo(fields[4]), fstype))
    return table


def fstypes_at(path):
    path = os.path.abspath(path)
    return [fstype for mnt, fstype in mount_table() if mnt == path]


def is_fuse_mounted(path):
    return any(t.startswith("fuse") for t in fstypes_at(path))


def force_unmount(path):
    """umount, retrying while busy, then lazily; never raises."""
    for attempt in range(5):
        if not fstypes_at(path):
            return True
        try:
            run(["umount", path], timeout=60)
            continue
        except CommandFailed as e:
            if attempt == 4:
                warn(f"umount {path}: {e.detail}; detaching lazily")
        time.sleep(0.2 * (attempt + 1))
    if not fstypes_at(path):
        return True
    try:
        run(["umount", "-l", path], timeout=60)
    except CommandFailed as e:
        warn(f"umount -l {path}: {e.detail}")
        return False
    return True


def close_own_fds_beneath(root):
    """Close this process's descriptors on files below ``root``.  A signal that
    lands between os.open() and its try/finally leaks one, and a leaked
    descriptor would keep the filesystem busy at umount time."""
    prefix = os.path.abspath(root).rstrip("/") + "/"
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if target.startswith(prefix):
            warn(f"closing leaked descriptor {name} on {target}")
            with contextlib.suppress(OSError):
                os.close(int(name))


def processes_using(root):
    """Pids (other than ours) with a cwd, root or open file at or below ``root``."""
    prefix = os.path.abspath(root).rstrip("/") + "/"
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        links = [f"/proc/{entry}/cwd", f"/proc/{entry}/root"]
        with contextlib.suppress(OSError):
            links += [f"/proc/{entry}/fd/{fd}" for fd in os.listdir(f"/proc/{entry}/fd")]
        for link in links:
            try:
                target = os.readlink(link)
            except OSError:
                continue
            if target == prefix[:-1] or target.startswith(prefix):
                pids.append(int(entry))
                break
    return pids


def stop_processes_using(root):
    """Only this run knows its scratch filesystem, so whatever still uses it
    was started by this run: a cowfs daemon whose mount was interrupted, a
    command orphaned by a signal.  Stop those, by pid, so umount succeeds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = processes_using(root)
        if not pids:
            return
        warn(f"sending {sig.name} to {', '.join(map(str, pids))} (still using {root})")
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and any(os.path.exists(f"/proc/{p}") for p in pids):
            time.sleep(0.05)


def unmount_beneath(root):
    """Unmount everything mounted strictly below ``root``, deepest first
    (catches any cowfs mount that escaped its own context manager)."""
    prefix = os.path.abspath(root).rstrip("/") + "/"
    below = [mnt for mnt, _ in mount_table() if mnt.startswith(prefix)]
    for mnt in sorted(set(below), key=len, reverse=True):
        warn(f"unmounting leftover mount {mnt}")
        force_unmount(mnt)


# --------------------------------------------------------------------------
# the XFS image


@contextlib.contextmanager
def xfs_image(workdir, size_gib):
    """Sparse file -> mkfs.xfs -m reflink=1 -> loop device -> mounted at
    ``workdir/xfs``.  Yields the mount point; always unmounts and detaches."""
    workdir = Path(workdir)
    image = workdir / "xfs.img"
    mnt = workdir / "xfs"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(size_gib << 30)
    run(["mkfs.xfs", "-q", "-m", "reflink=1", image])
    dev = None
    try:
        with shielded():  # no signal between attaching and remembering `dev`
            dev = run(["losetup", "--find", "--show", image]).stdout.decode().strip()
        log(f"XFS image {image} ({size_gib} GiB sparse) on {dev}")
        run(["mount", dev, mnt])
        try:
            yield mnt
        finally:
            with shielded():
                close_own_fds_beneath(mnt)
                unmount_beneath(mnt)        # cowfs mounts: their daemons exit
                stop_processes_using(mnt)   # stragglers of an interrupted step
                unmount_beneath(mnt)
                force_unmount(mnt)
    finally:
        with shielded():
            if dev:
                try:
                    run(["losetup", "-d", dev], timeout=60)
                except CommandFailed as e:
                    warn(f"losetup -d {dev}: {e.detail}")
            image.unlink(missing_ok=True)
