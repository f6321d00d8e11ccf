"""Scripted syscall sequences for the differential test (test_differential.py).

Run as `python posix_script.py DIR SCRIPT` (as whichever user the test chooses): it runs the
named script in DIR and prints one JSON line per step (what the call returned, or its errno
name) and then a manifest of DIR (names, types, modes, sizes, link counts, owners, contents,
xattrs, and which times moved), so that a plain directory and a cowfs mount can be compared.
"""

import ctypes
import errno
import fcntl
import hashlib
import json
import os
import socket
import stat
import sys
import time

libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
RENAME_NOREPLACE, RENAME_EXCHANGE, RENAME_WHITEOUT = 1, 2, 4
O_TMPFILE = getattr(os, "O_TMPFILE", 0o20200000)
UTIME_NOW, UTIME_OMIT = (1 << 30) - 1, (1 << 30) - 2


def renameat2(src, dst, flags):
    if libc.renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


class Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def utimensat(path, atime_nsec, mtime_nsec, seconds=0):
    times = (Timespec * 2)(Timespec(seconds, atime_nsec), Timespec(seconds, mtime_nsec))
    if libc.utimensat(AT_FDCWD, os.fsencode(path), times, 0) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def script_files():
    fd = os.open("a", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    yield "create", os.write(fd, b"hello\n")
    os.close(fd)
    yield "excl again", lambda: os.open("a", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    fd = os.open("a", os.O_WRONLY | os.O_APPEND)
    os.lseek(fd, 0, os.SEEK_SET)
    yield "append ignores offset", os.write(fd, b"more\n")
    os.close(fd)
    yield "nofollow on a symlink", (os.symlink("a", "ln"), lambda: os.open("ln", os.O_RDONLY | os.O_NOFOLLOW))[1]
    yield "read via link", open("ln", "rb").read()
    fd = os.open("a", os.O_RDWR)
    yield "ftruncate", os.ftruncate(fd, 3)
    yield "pwrite past end", os.pwrite(fd, b"Z", 10)
    os.close(fd)
    yield "sparse content", open("a", "rb").read()
    yield "truncate grow", os.truncate("a", 20)
    yield "name too long", lambda: open("x" * 256, "w")
    yield "long but ok", (open("y" * 255, "w").close(), len(os.listdir(".")))[1]
    yield "open a dir for write", lambda: os.open(".", os.O_WRONLY)
    yield "unlink a dir", (os.mkdir("d"), lambda: os.unlink("d"))[1]
    yield "rmdir not empty", (open("d/f", "w").close(), lambda: os.rmdir("d"))[1]
    yield "rmdir a file", lambda: os.rmdir("a")
    yield "mkdir exists", lambda: os.mkdir("d")
    yield "create in missing dir", lambda: open("nope/f", "w")
    yield "enotdir", lambda: open("a/f", "w")


def script_renames():
    for name in ("f", "g"):
        with open(name, "w") as f:
            f.write(name)
    os.mkdir("d")
    os.mkdir("e")
    open("e/inside", "w").close()
    yield "noreplace over existing", lambda: renameat2("f", "g", RENAME_NOREPLACE)
    yield "noreplace to new", renameat2("f", "h", RENAME_NOREPLACE)
    yield "exchange", renameat2("h", "g", RENAME_EXCHANGE)
    yield "contents after exchange", (open("h").read(), open("g").read())
    yield "exchange file and dir", renameat2("h", "d", RENAME_EXCHANGE)
    yield "exchange with missing", lambda: renameat2("g", "missing", RENAME_EXCHANGE)
    yield "whiteout", lambda: renameat2("g", "w", RENAME_WHITEOUT)
    yield "dir over non-empty dir", lambda: os.rename("h", "e")
    yield "file over dir", lambda: os.rename("g", "e")
    yield "dir into itself", lambda: os.rename("e", "e/sub")
    yield "rename over self", os.rename("g", "g")
    os.link("g", "g2")
    yield "rename onto own hard link", os.rename("g", "g2")
    yield "both names stay", sorted(n for n in os.listdir(".") if n.startswith("g"))


def script_times_and_attrs():
    open("f", "w").close()
    utimensat("f", 0, 0, seconds=1_000_000)
    yield "times set", (os.stat("f").st_atime_ns, os.stat("f").st_mtime_ns)
    utimensat("f", UTIME_OMIT, UTIME_NOW)
    st = os.stat("f")
    yield "omit atime, now mtime", (st.st_atime_ns, st.st_mtime_ns > 10**18)
    os.setxattr("f", "user.k", b"v")
    yield "xattr", os.getxattr("f", "user.k")
    yield "xattr create exists", lambda: os.setxattr("f", "user.k", b"w", os.XATTR_CREATE)
    yield "xattr replace missing", lambda: os.setxattr("f", "user.nope", b"w", os.XATTR_REPLACE)
    yield "xattr missing", lambda: os.getxattr("f", "user.nope")
    yield "remove missing xattr", lambda: os.removexattr("f", "user.nope")
    yield "list xattrs", sorted(n for n in os.listxattr("f") if n.startswith("user."))
    yield "xattr on symlink", (os.symlink("f", "l"), lambda: os.setxattr("l", "user.k", b"v",
                                                                        follow_symlinks=False))[1]
    os.chmod("f", 0o4755)
    yield "setuid bit kept by chmod", oct(os.stat("f").st_mode)
    yield "chown -1 -1", os.chown("f", -1, -1)
    yield "statfs names", os.statvfs(".").f_namemax


def script_links_and_special():
    with open("f", "w") as f:
        f.write("x")
    os.link("f", "g")
    os.link("g", "h")
    yield "nlink 3", os.stat("f").st_nlink
    os.unlink("g")
    yield "nlink 2", (os.stat("f").st_nlink, os.stat("h").st_nlink)
    yield "link exists", lambda: os.link("f", "h")
    yield "link a dir", (os.mkdir("d"), lambda: os.link("d", "d2"))[1]
    yield "dir nlink", os.stat("d").st_nlink
    os.mkfifo("fifo", 0o640)
    yield "fifo", stat.S_ISFIFO(os.lstat("fifo").st_mode)
    s = socket.socket(socket.AF_UNIX)
    s.bind("sock")
    s.close()
    yield "socket", stat.S_ISSOCK(os.lstat("sock").st_mode)
    yield "tmpfile opened", lambda: os.close(os.open(".", O_TMPFILE | os.O_WRONLY, 0o600))
    src = os.open("f", os.O_RDONLY)
    dst = os.open("copy", os.O_CREAT | os.O_WRONLY, 0o644)
    yield "copy_file_range", os.copy_file_range(src, dst, 10)
    os.close(src)
    os.close(dst)
    yield "posix_fallocate", (os.close(os.open("falloc", os.O_CREAT | os.O_WRONLY, 0o644)),
                              _posix_fallocate("falloc", 4096))[1]


def _posix_fallocate(path, size):
    fd = os.open(path, os.O_WRONLY)
    try:
        os.posix_fallocate(fd, 0, size)
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def script_locks():
    with open("f", "w") as f:
        f.write("x")
    a = os.open("f", os.O_RDWR)
    b = os.open("f", os.O_RDWR)
    fcntl.flock(a, fcntl.LOCK_EX)
    yield "flock held elsewhere", lambda: fcntl.flock(b, fcntl.LOCK_EX | fcntl.LOCK_NB)
    fcntl.flock(a, fcntl.LOCK_UN)
    yield "flock free", fcntl.flock(b, fcntl.LOCK_EX | fcntl.LOCK_NB)
    yield "posix lock free for another process", _lockf_in_child("f")
    fcntl.lockf(a, fcntl.LOCK_EX)
    yield "posix lock contended", _lockf_in_child("f")


def _lockf_in_child(path):
    """What a non-blocking POSIX lock of *path* gives in another process: "ok" or an errno name."""
    pid = os.fork()
    if pid == 0:
        c = os.open(path, os.O_RDWR)
        try:
            fcntl.lockf(c, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os._exit(0)
        except OSError as e:
            os._exit(e.errno)
    _, status = os.waitpid(pid, 0)
    return errno.errorcode.get(os.waitstatus_to_exitcode(status), "ok")


def script_permissions():
    """Run as an unprivileged user in a directory it owns, with a sticky, world-writable one."""
    os.mkdir("mine", 0o755)
    with open("mine/f", "w") as f:
        f.write("x")
    os.chmod("mine/f", 0o400)
    yield "write a read-only file", lambda: open("mine/f", "w")
    yield "chown to root", lambda: os.chown("mine/f", 0, 0)
    os.chmod("mine", 0o555)
    yield "create in a read-only dir", lambda: open("mine/g", "w")
    yield "unlink in a read-only dir", lambda: os.unlink("mine/f")
    os.chmod("mine", 0o755)
    yield "others' sticky file", lambda: os.unlink("sticky/theirs")
    yield "others' file rename", lambda: os.rename("sticky/theirs", "stolen")
    yield "read others' private", lambda: open("sticky/private").read()
    yield "own in sticky", (open("sticky/own", "w").close(), os.unlink("sticky/own"))[1]
    yield "setgid dir group", (open("sgid/f", "w").close(), os.stat("sgid/f").st_gid == os.stat("sgid").st_gid)[1]
    yield "chmod others' file", lambda: os.chmod("sticky/theirs", 0o777)
    yield "utime others' file", lambda: os.utime("sticky/theirs", (1, 1))
    yield "utime now others' writable", os.utime("sticky/writable")
    yield "link others' file", lambda: os.link("sticky/theirs", "hardlinked")


SCRIPTS = {name[len("script_"):]: fn for name, fn in globals().items() if name.startswith("script_")}


def outcome(value):
    """What a step gave: its value, or (for a call that was expected to fail) its errno name.
    A call that unexpectedly succeeded says so without its value (a descriptor number, a file)."""
    if callable(value):
        try:
            value()
        except OSError as e:
            return {"errno": errno.errorcode.get(e.errno, e.errno)}
        return {"ok": "succeeded"}
    return {"ok": _plain(value)}


def _plain(value):
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return type(value).__name__


def manifest(root):
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != ".snapshots"]
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            entry = {"mode": oct(st.st_mode), "uid": st.st_uid, "gid": st.st_gid,
                     "nlink": st.st_nlink if not stat.S_ISDIR(st.st_mode) else None}
            if stat.S_ISREG(st.st_mode):
                entry["size"] = st.st_size
                try:
                    with open(full, "rb") as f:
                        entry["sha"] = hashlib.sha1(f.read()).hexdigest()
                except OSError as e:
                    entry["sha"] = errno.errorcode[e.errno]
            elif stat.S_ISLNK(st.st_mode):
                entry["target"] = os.readlink(full)
            try:
                entry["xattrs"] = sorted(n for n in os.listxattr(full, follow_symlinks=False)
                                         if n.startswith("user."))
            except OSError as e:
                entry["xattrs"] = errno.errorcode[e.errno]
            out[os.path.relpath(full, root)] = entry
    return out


def main():
    root, script = sys.argv[1], sys.argv[2]
    os.chdir(root)
    os.umask(0o022)
    for step, value in SCRIPTS[script]():
        print(json.dumps({"step": step, **outcome(value)}))
    print(json.dumps({"manifest": manifest(".")}))


if __name__ == "__main__":
    main()
