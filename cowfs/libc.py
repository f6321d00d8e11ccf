"""Linux system calls that the os module does not expose.

Owns the ctypes bindings for renameat2, syncfs, FICLONE, copy_file_range,
fchownat(AT_EMPTY_PATH), readlinkat, the private mount namespace of a root
daemon, and the mode argument of a caller's creating system call. No file handles: open_by_handle_at needs CAP_DAC_READ_SEARCH.
Every wrapper raises OSError with the real errno.
"""

import ctypes
import fcntl
import os
import platform

# The C library the interpreter already has loaded (find_library would run ldconfig).
_libc = ctypes.CDLL(None, use_errno=True)

AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_SYMLINK_FOLLOW = 0x400
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
FICLONE = 0x40049409


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_libc.syncfs.argtypes = [ctypes.c_int]


def renameat2(src_dir: int, src: bytes, dst_dir: int, dst: bytes, flags: int = 0) -> None:
    _check(_libc.renameat2(src_dir, src, dst_dir, dst, flags), "renameat2")


def syncfs(fd: int) -> None:
    _check(_libc.syncfs(fd), "syncfs")


def clone(src_fd: int, dst_fd: int) -> None:
    """Make *dst_fd* share all of *src_fd*'s extents (reflink). Raises OSError if unsupported."""
    fcntl.ioctl(dst_fd, FICLONE, src_fd)


def copy(src_fd: int, dst_fd: int) -> None:
    """Copy all of *src_fd* into *dst_fd* in the kernel, keeping holes where the filesystem can."""
    size = os.fstat(src_fd).st_size
    offset = 0
    while offset < size:
        done = os.copy_file_range(src_fd, dst_fd, size - offset, offset, offset)
        if done == 0:
            break
        offset += done
    os.ftruncate(dst_fd, size)


def proc_path(fd: int, name: bytes | None = None) -> bytes:
    """A path that reaches the object behind *fd* (or its entry *name*) even under the mount."""
    base = b"/proc/self/fd/%d" % fd
    return base if name is None else base + b"/" + name


_libc.fchownat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_int]
_libc.readlinkat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t]
_libc.readlinkat.restype = ctypes.c_ssize_t


def chown_fd(fd: int, uid: int, gid: int) -> None:
    """chown the object open as *fd* (O_PATH allowed; a symlink itself, not its target)."""
    _check(_libc.fchownat(fd, b"", uid & 0xFFFFFFFF, gid & 0xFFFFFFFF, AT_EMPTY_PATH), "fchownat")


def readlink_fd(fd: int) -> bytes:
    """The target of the symlink open as *fd* with O_PATH|O_NOFOLLOW."""
    buf = ctypes.create_string_buffer(4096)
    n = _check(_libc.readlinkat(fd, b"", buf, len(buf)), "readlinkat")
    return buf.raw[:n]


CLONE_NEWNS = 0x00020000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MNT_DETACH = 2
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def hide_mount_from_self(mountpoint: str, keep: list[str]) -> None:
    """Move this process into a private copy of its mount namespace without *mountpoint*.

    Other processes keep seeing the mount; this one sees the directory
    underneath again, so nothing it opens by path (SQLite re-opens its
    directory and journal files by name) can re-enter its own mount and
    deadlock. Every other mount not on the way to a path in *keep* is dropped
    from the copy too: a copy would keep it alive (another workspace's FUSE
    session, a loop device) after it is unmounted everywhere else.
    Must be called while the process has a single thread.
    """
    _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _check(_libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "mount(MS_PRIVATE)")
    _check(_libc.umount2(os.fsencode(mountpoint), MNT_DETACH), "umount2")
    needed = [os.path.join(os.path.realpath(p), "") for p in keep]
    for point in sorted(set(_mountpoints()), key=len, reverse=True):
        if not any(path.startswith(os.path.join(point, "")) for path in needed):
            _libc.umount2(os.fsencode(point), MNT_DETACH)   # gone already with a parent: fine


def _mountpoints() -> list[str]:
    with open("/proc/self/mountinfo", "rb") as f:
        return [os.fsdecode(line.split()[4].decode("unicode_escape").encode("latin-1"))
                for line in f]


# The creating system calls and which argument is the mode, by syscall number, per architecture.
_MODE_ARGUMENT = {
    "x86_64": {2: 2, 85: 1, 257: 3, 83: 1, 258: 2, 133: 1, 259: 2},   # open creat openat
    #                                                   mkdir mkdirat mknod mknodat
    "aarch64": {56: 3, 34: 2, 33: 2},                                  # openat mkdirat mknodat
}.get(platform.machine(), {})


def creation_mode(tid: int) -> int | None:
    """The mode argument of the creating system call (open, creat, mkdir, mknod and their *at
    forms) thread *tid* is blocked in, as it passed it; None if it is in none of them or
    cannot be read (another user's process for a rootless daemon; io_uring; openat2, whose
    mode is in the caller's memory)."""
    try:
        with open(b"/proc/%d/syscall" % tid, "rb") as f:
            fields = f.read().split()
    except OSError:
        return None
    if len(fields) < 7 or not fields[0].isdigit():
        return None       # "running", or -1: not in a system call
    index = _MODE_ARGUMENT.get(int(fields[0]))
    return None if index is None else int(fields[1 + index], 16)
