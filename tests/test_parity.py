"""The live view behaves as the backing filesystem where it used not to (issue 12's parity list)."""

import os
import stat
import subprocess
import sys
import time

import pytest


def test_o_direct_reads_and_writes(workspace):
    workspace.mount()
    p = workspace.path
    subprocess.run(["dd", "if=/dev/urandom", f"of={p}/x", "bs=4096", "count=4", "oflag=direct",
                    "status=none"], check=True)
    out = subprocess.run(["dd", f"if={p}/x", "bs=4096", "iflag=direct", "status=none"],
                         check=True, capture_output=True).stdout
    assert len(out) == 16384 and out == (p / "x").read_bytes()
    workspace.umount()
    assert (p / "x").read_bytes() == out

def test_times_past_2262_are_kept_in_history(workspace):
    """Nanoseconds past 2262 do not fit SQLite's INTEGER: the capture used to fail the open (EIO)."""
    p = workspace.path
    workspace.mount()
    (p / "f").write_bytes(b"x\n")
    far = 10_413_792_000 * 10**9          # 2300-01-01
    os.utime(p / "f", ns=(far, far))
    workspace.cli("checkpoint")
    with open(p / "f", "ab") as f:        # the first change of the turn captures that mtime
        f.write(b"y\n")
    workspace.cli("checkpoint")
    assert os.stat(workspace.snapshots / "turn-1" / "f").st_mtime_ns == far
    workspace.cli("rollback", "1")
    st = os.stat(p / "f")
    assert (st.st_mtime_ns, st.st_size) == (far, 2)

def test_the_daemon_log_is_not_world_writable(workspace):
    workspace.mount()
    workspace.umount()
    mode = stat.S_IMODE(os.stat(workspace.store / "daemon.log").st_mode)
    assert mode == 0o600, oct(mode)


ACL_SCRIPT = r"""
set -e
umask 022
touch f; chmod 644 f
setfacl -m u::rwx,g::rwx,o::rwx f
stat -c '%A' f
getfacl -cp f
printf '#!/bin/sh\necho ran\n' > s; chmod 755 s
setfacl -m u:{user}:rwx,m::rw- s
stat -c '%A' s
mkdir d
setfacl -d -m u::r,g::r,o::- d
touch d/x; mkdir d/sub
stat -c '%A' d/x d/sub
getfacl -cp d/x
mkdir g; chmod 2775 g; stat -c '%A' g
"""


def _acl_run(where, user):
    out = subprocess.run(["sh", "-c", ACL_SCRIPT.format(user=user)], cwd=where, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    ran = subprocess.run(["runuser", "-u", user, "--", f"{where}/s"], capture_output=True, text=True)
    return out.stdout, ran.returncode


def test_posix_acls_behave_as_on_the_backing_filesystem(workspace, test_users):
    """setfacl's mode change shows at once, a mask stops execution, a default ACL is inherited."""
    from conftest import OTHER_USER
    native = workspace.path.parent / "native-acl"
    native.mkdir()
    os.chmod(native, 0o755)
    workspace.mount()
    os.chmod(workspace.path, 0o755)
    expected = _acl_run(native, OTHER_USER)
    assert expected[1] != 0        # the mask took execution away natively
    assert _acl_run(workspace.path, OTHER_USER) == expected
    workspace.cli("checkpoint")
    snap = workspace.snapshots / "turn-1"
    got = subprocess.run(["getfacl", "-cp", snap / "d/x"], capture_output=True, text=True).stdout
    assert got == subprocess.run(["getfacl", "-cp", native / "d/x"], capture_output=True,
                                 text=True).stdout


def test_readdir_lists_dot_and_dotdot_with_their_inodes(workspace):
    (workspace.path / "a/b").mkdir(parents=True)
    workspace.mount()
    p = workspace.path
    for d, parent in ((p / "a", p), (p / "a/b", p / "a")):
        listing = subprocess.run(["ls", "-a1i", d], capture_output=True, text=True, check=True).stdout
        inos = {line.split()[1]: int(line.split()[0]) for line in listing.splitlines()}
        assert inos["."] == os.stat(d).st_ino and inos[".."] == os.stat(parent).st_ino, listing
    assert subprocess.run(["ls", "-a1", p], capture_output=True, text=True).stdout.split()[:2] == [".", ".."]


def _open_by_handle_after_eviction(path) -> int:
    """name_to_handle_at of *path*, the kernel's caches dropped, then open_by_handle_at:
    0, or the errno of the call that failed."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)

    class FileHandle(ctypes.Structure):
        _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int),
                    ("f_handle", ctypes.c_ubyte * 128)]
    fh, mount_id = FileHandle(128, 0), ctypes.c_int()
    if libc.name_to_handle_at(-100, os.fsencode(path), ctypes.byref(fh), ctypes.byref(mount_id), 0):
        return ctypes.get_errno()
    mount_fd = os.open(os.path.dirname(os.path.dirname(path)), os.O_RDONLY | os.O_DIRECTORY)
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("2\n")
        fd = libc.open_by_handle_at(mount_fd, ctypes.byref(fh), os.O_RDONLY)
        if fd < 0:
            return ctypes.get_errno()
        os.close(fd)
        return 0
    finally:
        os.close(mount_fd)


@pytest.mark.root_only
def test_the_documented_limits_file_handles_and_nodev(workspace):
    """README: file handles are not supported, and the mount is nosuid,nodev. These hold as
    documented (a change here must change the README too)."""
    import errno as errno_
    (workspace.path / "d").mkdir()
    (workspace.path / "d/f").write_text("f\n")
    os.link(workspace.path / "d/f", workspace.path / "d/g")
    workspace.mount()
    p = workspace.path
    assert _open_by_handle_after_eviction(p / "d/f") == errno_.ESTALE
    os.mknod(p / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    with pytest.raises(OSError) as e:
        open(p / "null", "rb")
    assert e.value.errno in (errno_.EACCES, errno_.EPERM)
    options = next(line.split()[5] for line in open("/proc/self/mountinfo")
                   if line.split()[4] == str(p))
    assert {"nosuid", "nodev"} <= set(options.split(","))


def _ctime_after_noop_chown(where, name) -> tuple[int, int]:
    path = os.path.join(where, name)
    before = os.lstat(path).st_ctime_ns
    time.sleep(0.02)
    os.chown(path, -1, -1, follow_symlinks=False)
    return before, os.lstat(path).st_ctime_ns


def test_chown_to_minus_one_stamps_ctime_as_natively(workspace):
    """chown(path, -1, -1) changes nothing but ctime, natively; through cowfs it changed nothing."""
    native = workspace.path.parent / f"{workspace.path.name}-native"
    p = workspace.path
    for top in (native, p):
        top.mkdir(exist_ok=True)
    workspace.mount()
    for top in (native, p):
        (top / "f").write_bytes(b"x")
        (top / "d").mkdir()
        os.mkfifo(top / "fifo")
        os.symlink("f", top / "link")
    for name in ("f", "d", "fifo", "link"):
        n_before, n_after = _ctime_after_noop_chown(native, name)
        m_before, m_after = _ctime_after_noop_chown(p, name)
        assert (n_after > n_before) == (m_after > m_before), (name, n_after > n_before)
    shown = {name: os.lstat(p / name).st_ctime_ns for name in ("d", "fifo", "link")}
    workspace.umount()
    for name, ctime in shown.items():      # the kernel takes these from the daemon's replies
        assert os.lstat(p / name).st_ctime_ns == ctime, name


def _atime_moved_by_read(top, name) -> bool:
    before = os.stat(top / name).st_atime_ns
    (top / name).read_bytes()
    return os.stat(top / name).st_atime_ns != before


def test_reads_move_atime_as_natively(workspace):
    """The kernel keeps no atime for a FUSE file and reads cached pages without asking the
    daemon: reading a file just written through the mount never moved its atime (relatime moves
    it at the first read after a change, then not again)."""
    native = workspace.path.parent / f"{workspace.path.name}-native"
    native.mkdir()
    p = workspace.path
    (p / "old").write_bytes(b"old\n")
    (native / "old").write_bytes(b"old\n")
    workspace.mount()
    for top in (native, p):
        (top / "new").write_bytes(b"new\n")
    time.sleep(0.05)                     # atime must be able to move past mtime
    moved = {top: [_atime_moved_by_read(top, name) for name in ("new", "new", "old", "old")]
             for top in (native, p)}
    assert moved[p] == moved[native], moved
    assert True in moved[native]         # the backing mount moves atime at all (not noatime)
    shown = os.stat(p / "new")
    assert shown.st_ctime_ns <= shown.st_atime_ns     # a read is no change: ctime stays
    workspace.umount()
    assert os.stat(p / "new").st_atime_ns == shown.st_atime_ns


def _aio_direct_write(path, offset: int, data: bytes) -> None:
    """One asynchronous O_DIRECT write (Linux AIO: io_submit, then io_getevents), as
    databases and fio do it: the kernel sends it to the daemon as an async direct write."""
    import ctypes
    import mmap
    libc = ctypes.CDLL(None, use_errno=True)
    SYS_io_setup, SYS_io_destroy, SYS_io_getevents, SYS_io_submit = 206, 207, 208, 209

    class IOCB(ctypes.Structure):
        _fields_ = [("data", ctypes.c_uint64), ("key", ctypes.c_uint32),
                    ("rw_flags", ctypes.c_int32), ("opcode", ctypes.c_uint16),
                    ("reqprio", ctypes.c_int16), ("fildes", ctypes.c_uint32),
                    ("buf", ctypes.c_uint64), ("nbytes", ctypes.c_uint64),
                    ("offset", ctypes.c_int64), ("reserved2", ctypes.c_uint64),
                    ("flags", ctypes.c_uint32), ("resfd", ctypes.c_uint32)]

    class Event(ctypes.Structure):
        _fields_ = [("data", ctypes.c_uint64), ("obj", ctypes.c_uint64),
                    ("res", ctypes.c_int64), ("res2", ctypes.c_int64)]

    def check(result):
        if result < 0:
            raise OSError(ctypes.get_errno(), "aio")
        return result
    buf = mmap.mmap(-1, len(data))          # page-aligned, as O_DIRECT wants
    buf.write(data)
    address = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    ctx = ctypes.c_ulong(0)
    check(libc.syscall(SYS_io_setup, 1, ctypes.byref(ctx)))
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        iocb = IOCB(opcode=1, fildes=fd, buf=address, nbytes=len(data), offset=offset)  # PWRITE
        pointers = (ctypes.POINTER(IOCB) * 1)(ctypes.pointer(iocb))
        assert check(libc.syscall(SYS_io_submit, ctx, 1, pointers)) == 1
        event = Event()
        assert check(libc.syscall(SYS_io_getevents, ctx, 1, 1, ctypes.byref(event), None)) == 1
        assert event.res == len(data), event.res
    finally:
        os.close(fd)
        libc.syscall(SYS_io_destroy, ctx)
        del address
        buf.close()


# Reads the range the test writes, buffered, again and again: each miss in the page cache
# (after the writer's invalidation) becomes a READ that may reach the daemon before the WRITE.
_READER = """
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
while True:
    os.pread(fd, 0x10000, 0x3c000)
"""


def test_buffered_reads_after_an_async_o_direct_write_see_it(workspace):
    """While other processes read a file, an asynchronous O_DIRECT write of a range, then a
    buffered read of it: natively the read returns the new bytes. The kernel invalidates the
    page cache before a direct write but, for an asynchronous one, not after, and a reader
    meanwhile fills it again from the old content (issue 20)."""
    native = workspace.path.parent / f"{workspace.path.name}-native"
    native.mkdir()
    workspace.mount()
    for top in (native, workspace.path):
        f = top / "f"
        f.write_bytes(b"\x55" * 0xa0000)
        readers = [subprocess.Popen([sys.executable, "-c", _READER, str(f)]) for _ in range(2)]
        try:
            stale = []
            for round_ in range(80):
                new = bytes([round_ % 251]) * 0x10000
                _aio_direct_write(f, 0x3c000, new)
                with open(f, "rb") as r:
                    r.seek(0x3c000)
                    if r.read(0x10000) != new:
                        stale.append(round_)
            assert not stale, (top, stale)
        finally:
            for reader in readers:
                reader.kill()
                reader.wait()


def _atime_moves(top) -> list[bool]:
    """Whether each of these moves atime: reading a file just written (twice), reading an old
    file (twice), executing a script, listing a directory (twice)."""
    def moved(path, act) -> bool:
        before = os.stat(path).st_atime_ns
        time.sleep(0.02)                 # past the clock tick atime is taken from
        act()
        return os.stat(path).st_atime_ns != before
    time.sleep(0.05)                     # atime must be able to move past mtime
    return [moved(top / "new", (top / "new").read_bytes), moved(top / "new", (top / "new").read_bytes),
            moved(top / "old", (top / "old").read_bytes), moved(top / "old", (top / "old").read_bytes),
            moved(top / "s", lambda: subprocess.run([top / "s"], check=True)),
            moved(top / "d", lambda: os.listdir(top / "d")), moved(top / "d", lambda: os.listdir(top / "d"))]


@pytest.mark.parametrize("backing_atime", ["relatime", "strictatime"])
@pytest.mark.parametrize("option", ["noatime", "relatime", "strictatime", "nodiratime"])
def test_atime_mount_options_behave_as_on_a_native_mount_with_them(workspace, option, backing_atime):
    """`cowfs mount -o OPTION`: reads, executions and listings move atime as they do on a bind
    mount of a plain directory with that option (issue 20: they followed the backing mount's
    policy, so a noatime mount moved atime). The backing mount is relatime or strictatime (a
    bind mount of the workspace). strictatime cannot do more than the backing mount lets a
    read do (only a utime could, and it moves ctime): over a relatime backing mount it
    behaves as relatime (README)."""
    native = workspace.path.parent / f"{workspace.path.name}-native"
    native.mkdir()
    reference = "relatime" if option == "strictatime" and backing_atime == "relatime" else option
    if option == "nodiratime":
        reference = f"{backing_atime},nodiratime"
    p = workspace.path
    for top in (native, p):
        (top / "old").write_bytes(b"old\n")
        (top / "s").write_text("#!/bin/sh\ntrue\n")
        os.chmod(top / "s", 0o755)
        (top / "d").mkdir()
        (top / "d/x").write_bytes(b"x")
    past = time.time_ns() - 2 * 86400 * 10**9     # relatime moves atime a day after the last read
    for top in (native, p):
        for name in ("old", "s", "d"):
            os.utime(top / name, ns=(past, past))
    workspace.backing          # opened before the bind mount and the mount hide it
    binds = [(native, reference), (p, backing_atime)]
    try:
        for top, options in binds:
            subprocess.run(["mount", "--bind", top, top], check=True)
            subprocess.run(["mount", "-o", f"remount,bind,{options}", top], check=True)
        workspace.mount("-o", option)
        for top in (native, p):
            (top / "new").write_bytes(b"new\n")
        expected = _atime_moves(native)
        assert expected != [True] * 7 or "strictatime" in reference
        assert _atime_moves(p) == expected
    finally:
        workspace.umount(check=False)
        for top, _ in binds:
            subprocess.run(["umount", top], check=False)


def test_o_direct_writes_beside_a_buffered_writer_of_the_same_file(workspace):
    """A buffered writer keeps the file open while direct writes go on: the kernel may write the
    buffered pages back through the O_DIRECT handle, and dropping the pages then must not wait
    for that write's own reply (fs._after_direct_write). Each step returns promptly, and the
    file ends as natively."""
    native = workspace.path.parent / f"{workspace.path.name}-native"
    native.mkdir()
    workspace.mount()
    results = []
    for top in (native, workspace.path):
        f = top / "f"
        f.write_bytes(b"\x55" * 0xa0000)
        buffered = os.open(f, os.O_WRONLY)
        try:
            started = time.monotonic()
            for i in range(20):
                os.pwrite(buffered, bytes([i + 100]) * 8192, 0x1000 * i)
                _aio_direct_write(f, 0x3c000, bytes([i]) * 0x10000)
            assert time.monotonic() - started < 10
        finally:
            os.close(buffered)
        results.append(f.read_bytes())
    assert results[0] == results[1]
