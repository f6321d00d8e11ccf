"""The hard cases of brief section 3, one scenario each, through a real mount."""

import errno
import json
import os
import re
import stat
import subprocess
import threading
import time

import pytest

from conftest import drop_kernel_caches, traced
from treeview import tree


def sh(cwd, script: str) -> None:
    subprocess.run(["sh", "-c", script], cwd=cwd, check=True)


def checkpoint(ws, message="") -> int:
    out = ws.cli("checkpoint", "-m", message).stdout.strip()
    assert out.startswith("turn-"), out
    return int(out.removeprefix("turn-"))


def rollback(ws, turn) -> None:
    ws.cli("rollback", str(turn))


def snap(ws, turn) -> dict:
    return tree(ws.snapshots / f"turn-{turn}")


def live(ws, **kw) -> dict:
    """The live tree as the backing directory holds it (underneath the mount, the store left
    out): what a scenario expects, never read through the mount it tests."""
    return tree(ws.backing, hidden={b".cowfs"}, **kw)


def assert_live(ws, want: dict, **kw) -> None:
    """The mount shows *want*, and the backing directory holds it."""
    assert tree(ws.path, **kw) == want
    assert live(ws, **kw) == want


def read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def write(path, data: bytes, mode="wb") -> None:
    with open(path, mode) as f:
        f.write(data)


@pytest.fixture
def mounted(workspace):
    """A workspace with a small tree, mounted; turn 0 is that tree."""
    p = workspace.path
    (p / "src").mkdir()
    write(p / "src" / "app.py", b"print('v0')\n")
    write(p / "src" / "util.py", b"def f(): pass\n")
    write(p / "README", b"readme v0\n")
    workspace.mount()
    return workspace


def test_turn_zero_and_checkpoint_round_trip(mounted):
    ws, p = mounted, mounted.path
    before = live(ws)
    write(p / "src" / "app.py", b"print('v1')\n")
    write(p / "new.txt", b"new\n")
    assert checkpoint(ws, "one") == 1
    assert snap(ws, 0) == before
    assert snap(ws, 1) == live(ws)
    assert sorted(os.listdir(ws.snapshots)) == ["latest", "turn-0", "turn-1"]
    assert os.readlink(ws.snapshots / "latest") == "turn-1"


def test_directory_renamed_after_children_edited_and_edited_again(mounted):
    ws, p = mounted, mounted.path
    t0 = live(ws)
    write(p / "src" / "app.py", b"print('edited before rename')\n")
    os.rename(p / "src", p / "lib")
    write(p / "lib" / "app.py", b"print('edited after rename')\n")
    write(p / "lib" / "util.py", b"# appended\n", "ab")
    t1 = live(ws)
    checkpoint(ws)
    assert snap(ws, 0) == t0
    assert snap(ws, 1) == t1
    os.rename(p / "lib", p / "src2")
    write(p / "src2" / "app.py", b"turn 2\n")
    checkpoint(ws)
    assert snap(ws, 1) == t1
    rollback(ws, 0)
    assert_live(ws, t0)


def test_file_renamed_over_another(mounted):
    ws, p = mounted, mounted.path
    t0 = live(ws)
    os.rename(p / "src" / "util.py", p / "src" / "app.py")
    checkpoint(ws)
    assert snap(ws, 0) == t0
    assert read(p / "src" / "app.py") == b"def f(): pass\n"
    rollback(ws, 0)
    assert_live(ws, t0)


def test_editor_style_save_via_temp_and_rename(mounted):
    ws, p = mounted, mounted.path
    t0 = live(ws)
    write(p / "src" / ".app.py.swp", b"print('saved')\n")
    os.rename(p / "src" / ".app.py.swp", p / "src" / "app.py")
    checkpoint(ws)
    assert snap(ws, 0) == t0
    assert read(ws.snapshots / "turn-1" / "src" / "app.py") == b"print('saved')\n"


def test_hardlinks_edited_through_one_name_stay_linked(mounted):
    ws, p = mounted, mounted.path
    os.link(p / "README", p / "README.link")
    t1 = live(ws)
    checkpoint(ws)
    write(p / "README.link", b"changed through link\n", "r+b")
    assert read(p / "README") == b"changed through link\n"
    checkpoint(ws)
    assert snap(ws, 1) == t1
    assert os.stat(p / "README").st_ino == os.stat(p / "README.link").st_ino
    rollback(ws, 1)
    assert_live(ws, t1)
    assert os.stat(p / "README").st_ino == os.stat(p / "README.link").st_ino
    assert os.stat(p / "README").st_nlink == 2


def link_counts(top) -> dict:
    """path -> st_nlink of everything below *top* (the store left out)."""
    counts = {".": os.stat(top).st_nlink}     # top may be a /proc/PID/fd link
    for dirpath, dirs, files in os.walk(top):
        dirs[:] = [d for d in dirs if not (dirpath == str(top) and d == ".cowfs")]
        for name in dirs + files:
            path = os.path.join(dirpath, name)
            counts[os.path.relpath(path, top)] = os.lstat(path).st_nlink
    return counts


def test_snapshots_show_the_link_counts_of_their_turn(mounted):
    """Hard links and subdirectories come and go over turns; each snapshot shows the
    st_nlink the backing tree had at its checkpoint, also once the kernel forgot the files
    (a later unlink then reaches the file by name only)."""
    ws, p = mounted, mounted.path
    os.link(p / "README", p / "src" / "README.2")
    os.mkdir(p / "src" / "sub")
    os.mkdir(p / "src" / "sub2")
    want = {checkpoint(ws): link_counts(ws.backing)}
    drop_kernel_caches()
    os.unlink(p / "src" / "README.2")
    os.rmdir(p / "src" / "sub2")
    os.link(p / "src" / "app.py", p / "app.py.2")
    os.link(p / "src" / "app.py", p / "src" / "sub" / "app.py.3")
    want[checkpoint(ws)] = link_counts(ws.backing)
    drop_kernel_caches()
    os.rename(p / "src" / "sub", p / "sub")
    os.unlink(p / "app.py.2")
    os.rename(p / "src" / "util.py", p / "src" / "app.py")      # over a hard-linked file
    want[checkpoint(ws)] = link_counts(ws.backing)
    rollback(ws, 1)
    want[checkpoint(ws)] = link_counts(ws.backing)
    assert want[max(want)] == want[1]
    drop_kernel_caches()
    for turn, counts in want.items():
        assert link_counts(ws.snapshots / f"turn-{turn}") == counts, turn


def test_a_rollback_giving_a_file_its_names_back_keeps_older_link_counts(mounted):
    """The file's only name at turn 1 is detached by the rollback (kept in the store), then
    attached at its two names of turn 0: turn 1 still shows one name (found by the model test)."""
    ws, p = mounted, mounted.path
    os.link(p / "README", p / "src" / "README.2")
    want = {checkpoint(ws): link_counts(ws.backing)}
    os.unlink(p / "src" / "README.2")
    os.rename(p / "README", p / "README.moved")
    want[checkpoint(ws)] = link_counts(ws.backing)
    rollback(ws, 1)
    want[checkpoint(ws)] = link_counts(ws.backing)
    assert want[max(want)] == want[1]
    for turn, counts in want.items():
        assert link_counts(ws.snapshots / f"turn-{turn}") == counts, turn


def test_symlinks_dangling_and_retargeted(mounted):
    ws, p = mounted, mounted.path
    os.symlink("src/app.py", p / "link")
    os.symlink("does/not/exist", p / "dangling")
    os.symlink("src", p / "dirlink")
    t1 = live(ws)
    checkpoint(ws)
    os.unlink(p / "link")
    os.symlink("README", p / "link")
    write(p / "src" / "app.py", b"target changed\n")
    os.unlink(p / "dangling")
    checkpoint(ws)
    assert snap(ws, 1) == t1
    assert os.readlink(ws.snapshots / "turn-1" / "dangling") == "does/not/exist"
    assert read(ws.snapshots / "turn-1" / "link") == b"print('v0')\n"
    rollback(ws, 1)
    assert_live(ws, t1)


def test_rm_rf_of_a_large_tree(mounted):
    ws, p = mounted, mounted.path
    for d in range(20):
        (p / "big" / f"d{d}").mkdir(parents=True)
        for f in range(50):
            write(p / "big" / f"d{d}" / f"f{f}", b"%d/%d\n" % (d, f))
    t1 = live(ws)
    checkpoint(ws)
    sh(p, "rm -rf big")
    assert not (p / "big").exists()
    checkpoint(ws)
    assert snap(ws, 1) == t1
    rollback(ws, 1)
    assert_live(ws, t1)


def test_file_replaced_by_directory_and_back(mounted):
    ws, p = mounted, mounted.path
    t0 = live(ws)
    os.unlink(p / "README")
    (p / "README").mkdir()
    write(p / "README" / "inside", b"inside\n")
    t1 = live(ws)
    checkpoint(ws)
    sh(p, "rm -rf README && echo back > README")
    t2 = live(ws)
    checkpoint(ws)
    assert snap(ws, 0) == t0 and snap(ws, 1) == t1 and snap(ws, 2) == t2
    rollback(ws, 1)
    assert_live(ws, t1)
    rollback(ws, 0)
    assert_live(ws, t0)


def test_empty_directories(mounted):
    ws, p = mounted, mounted.path
    (p / "empty").mkdir()
    (p / "a" / "b" / "c").mkdir(parents=True)
    t1 = live(ws)
    checkpoint(ws)
    os.rmdir(p / "empty")
    os.rmdir(p / "a" / "b" / "c")
    checkpoint(ws)
    assert snap(ws, 1) == t1
    rollback(ws, 1)
    assert_live(ws, t1)


def test_file_open_for_writing_across_a_checkpoint(mounted):
    ws, p = mounted, mounted.path
    fd = os.open(p / "log.txt", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"turn one\n")
        checkpoint(ws)
        os.write(fd, b"turn two\n")
        checkpoint(ws)
        os.write(fd, b"turn three\n")
    finally:
        os.close(fd)
    assert read(ws.snapshots / "turn-1" / "log.txt") == b"turn one\n"
    assert read(ws.snapshots / "turn-2" / "log.txt") == b"turn one\nturn two\n"
    assert read(p / "log.txt") == b"turn one\nturn two\nturn three\n"


def test_append_only_log(mounted):
    ws, p = mounted, mounted.path
    expected = b""
    for turn in range(1, 6):
        line = b"entry %d\n" % turn
        write(p / "app.log", line, "ab")
        expected += line
        assert checkpoint(ws) == turn
    for turn in range(1, 6):
        assert read(ws.snapshots / f"turn-{turn}" / "app.log") == b"".join(
            b"entry %d\n" % t for t in range(1, turn + 1))


def test_sparse_file_edits(mounted):
    ws, p = mounted, mounted.path
    with open(p / "sparse", "wb") as f:
        f.truncate(64 << 20)
        f.seek(32 << 20)
        f.write(b"middle")
    checkpoint(ws)
    with open(p / "sparse", "r+b") as f:
        f.seek(32 << 20)
        f.write(b"MIDDLE")
        f.seek(100 << 20)
        f.write(b"end")
    checkpoint(ws)
    with open(ws.snapshots / "turn-1" / "sparse", "rb") as f:
        assert os.fstat(f.fileno()).st_size == 64 << 20
        f.seek(32 << 20)
        assert f.read(6) == b"middle"
    assert os.stat(p / "sparse").st_size == (100 << 20) + 3
    rollback(ws, 1)
    assert os.stat(p / "sparse").st_size == 64 << 20
    with open(p / "sparse", "rb") as f:
        f.seek(32 << 20)
        assert f.read(6) == b"middle"


@pytest.mark.parametrize("backing", ["xfs"], indirect=True)
def test_one_byte_edit_of_a_1gib_file_costs_o1_on_xfs(workspace):
    p = workspace.path
    with open(p / "huge", "wb") as f:
        block = os.urandom(1 << 20)
        for _ in range(1024):
            f.write(block)
    os.sync()
    workspace.mount()
    free_before = os.statvfs(p).f_bfree * os.statvfs(p).f_frsize
    with open(p / "huge", "r+b") as f:
        f.seek(512 << 20)
        f.write(b"X")
    os.sync()
    used = free_before - os.statvfs(p).f_bfree * os.statvfs(p).f_frsize
    assert used < 2 << 20, f"a one-byte edit of a 1 GiB file used {used} bytes on XFS"
    checkpoint(workspace)
    with open(workspace.snapshots / "turn-0" / "huge", "rb") as f:
        f.seek(512 << 20)
        assert f.read(1) == block[0:1]


def test_mode_mtime_and_xattr_changes_alone(mounted):
    ws, p = mounted, mounted.path
    os.setxattr(p / "README", "user.tag", b"v0")
    os.utime(p / "README", ns=(1_000_000_000, 1_000_000_000))
    t1 = live(ws, xattrs=True, mtimes=True)
    checkpoint(ws)
    os.chmod(p / "README", 0o755)
    os.utime(p / "README", ns=(2_000_000_000, 2_000_000_000))
    os.setxattr(p / "README", "user.tag", b"v1")
    os.setxattr(p / "README", "user.more", b"x")
    checkpoint(ws)
    assert tree(ws.snapshots / "turn-1", xattrs=True, mtimes=True) == t1
    rollback(ws, 1)
    assert_live(ws, t1, xattrs=True, mtimes=True)


def test_fifos(mounted):
    ws, p = mounted, mounted.path
    os.mkfifo(p / "pipe", 0o640)
    checkpoint(ws)
    os.unlink(p / "pipe")
    checkpoint(ws)
    st = os.lstat(ws.snapshots / "turn-1" / "pipe")
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640
    rollback(ws, 1)
    assert stat.S_ISFIFO(os.lstat(p / "pipe").st_mode)


def test_names_with_spaces_newlines_and_non_utf8_bytes(mounted):
    ws, p = mounted, mounted.path
    names = [b"with space", b"new\nline", b"latin1-\xe9\xff", b"-leading-dash"]
    root = os.fsencode(p)
    for n in names:
        write(os.path.join(root, n), n)
    t1 = live(ws)
    checkpoint(ws)
    for n in names:
        os.unlink(os.path.join(root, n))
    checkpoint(ws)
    assert snap(ws, 1) == t1
    rollback(ws, 1)
    assert_live(ws, t1)


def test_rollback_while_another_process_holds_files_open(mounted):
    ws, p = mounted, mounted.path
    t0 = live(ws)
    holder = subprocess.Popen(
        ["python3", "-c",
         "import sys,time\n"
         "r=open('README','rb'); w=open('src/app.py','ab')\n"
         "print('ready', flush=True); sys.stdin.readline()\n"
         "w.write(b'late write\\n'); w.flush(); print(r.read().decode(), end='', flush=True)"],
        cwd=p, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"ready\n"
        write(p / "README", b"changed\n")
        write(p / "extra", b"x\n")
        rollback(ws, 0)
        assert_live(ws, t0)
        holder.stdin.write(b"go\n")
        holder.stdin.flush()
        out, _ = holder.communicate(timeout=30)
        assert holder.returncode == 0
    finally:
        holder.kill()
    # The writer kept its file: the late write landed in the live file, after the rollback.
    assert read(p / "src" / "app.py") == b"print('v0')\nlate write\n"
    assert snap(ws, max_turn(ws)) == t0


def max_turn(ws) -> int:
    return max(int(n.removeprefix("turn-")) for n in os.listdir(ws.snapshots) if n.startswith("turn-"))


def test_rollback_to_turn_zero_removes_everything_new(mounted):
    ws, p = mounted, mounted.path
    t0 = live(ws)
    sh(p, "mkdir -p node_modules/a/b && for i in $(seq 50); do echo $i > node_modules/a/b/f$i; done")
    sh(p, "rm src/util.py && echo changed > README && ln -s README rl && mkdir build")
    checkpoint(ws)
    sh(p, "mv src source && touch source/new")
    checkpoint(ws)
    rollback(ws, 0)
    assert_live(ws, t0)


def test_rollback_of_a_rollback(mounted):
    ws, p = mounted, mounted.path
    write(p / "src" / "app.py", b"v1\n")
    write(p / "added", b"added\n")
    checkpoint(ws)
    t1 = live(ws)
    rollback(ws, 0)
    rolled = max_turn(ws)
    assert snap(ws, rolled) == snap(ws, 0)
    rollback(ws, 1)
    assert_live(ws, t1)
    log = ws.cli("log").stdout
    assert f"rollback to turn-0" in log and "rollback to turn-1" in log


def test_rollback_seals_pending_changes_first(mounted):
    ws, p = mounted, mounted.path
    write(p / "wip", b"work in progress\n")
    out = ws.cli("rollback", "0").stdout
    assert "sealed pending changes as turn-1" in out
    assert read(ws.snapshots / "turn-1" / "wip") == b"work in progress\n"
    assert not (p / "wip").exists()


def test_remount_then_browse_and_roll_back_old_turns(mounted):
    ws, p = mounted, mounted.path
    t0 = live(ws)
    write(p / "README", b"turn 1\n")
    checkpoint(ws)
    t1 = live(ws)
    write(p / "README", b"pending at unmount\n")
    out = ws.umount().stdout
    assert "sealed turn-2" in out
    ws.mount()
    assert snap(ws, 0) == t0 and snap(ws, 1) == t1
    assert read(ws.snapshots / "turn-2" / "README") == b"pending at unmount\n"
    assert checkpoint(ws) == 3
    rollback(ws, 0)
    assert_live(ws, t0)


def test_changes_behind_our_back_are_reported(mounted):
    ws, p = mounted, mounted.path
    ws.umount()
    time.sleep(0.05)
    write(p / "README", b"edited while unmounted\n")
    r = ws.mount(check=False)
    assert r.returncode == 2
    assert "changed while cowfs was not mounted" in r.stderr and "README" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    ws.mount("--force")
    assert "warning" in ws.cli("status").stdout


def test_changes_beside_the_mount_are_reported_at_the_next_mount(workspace):
    """A process already inside the directory when it was mounted writes to the directory
    underneath: history changed behind cowfs's back, and the next mount says so, apart from
    everything that went through the mount (creations, edits, renames, a rollback). (A thing
    changed both through the mount and beside it in one session is not told apart.)"""
    p = workspace.path
    (p / "src").mkdir()
    write(p / "src" / "app.py", b"v0\n")
    write(p / "notes", b"notes v0\n")
    write(p / "other", b"other\n")
    inside = subprocess.Popen(["sh", "-c", "read go; echo beside >> notes; chmod 600 other"],
                              cwd=p, stdin=subprocess.PIPE)
    try:
        workspace.mount()
        # Through the mount: all of it recorded, none of it drift.
        (p / "new").mkdir()
        write(p / "new" / "file", b"new\n")
        write(p / "src" / "app.py", b"v1\n")
        os.rename(p / "src", p / "lib")
        checkpoint(workspace)
        rollback(workspace, 0)
        write(p / "README.md", b"after the rollback\n")
        inside.communicate(b"go\n", timeout=30)
        assert inside.returncode == 0
    finally:
        inside.kill()
    workspace.umount()
    r = workspace.mount(check=False)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "2 path(s) changed beside the mount while it was up" in r.stderr, r.stderr
    assert "'notes'" in r.stderr and "'other'" in r.stderr, r.stderr
    workspace.mount("--force")
    workspace.umount()
    workspace.mount()       # accepted once: nothing new to say


def test_a_clean_session_is_no_drift(workspace):
    """Everything a session does through the mount is explained by its records, whatever it did."""
    p = workspace.path
    (p / "d").mkdir()
    write(p / "d" / "f", b"0\n")
    write(p / "linked", b"l\n")
    workspace.mount()
    for i in range(3):
        write(p / "d" / "f", b"%d\n" % i)
        os.link(p / "linked", p / f"link{i}")
        (p / f"dir{i}" / "sub").mkdir(parents=True)
        write(p / f"dir{i}" / "sub" / "x", b"x\n")
        os.chmod(p / "d", 0o700 + i)
        os.setxattr(p / "linked", b"user.i", b"%d" % i)
        checkpoint(workspace)
    os.rename(p / "dir0", p / "d" / "moved")
    sh(p, "rm -rf dir1")
    rollback(workspace, 1)
    workspace.cli("restore", "2", "dir2")
    os.symlink("nowhere", p / "was-a-link")
    os.link(p / "linked", p / "other-name")
    workspace.umount()
    workspace.mount()
    # A rename of one name of a file moves the ctime its other names show (found by the model).
    os.rename(p / "other-name", p / "renamed")
    # In the next session, a directory made where something older was, with a new file moved
    # into it in the same turn: neither needed a row (found by the model test).
    os.unlink(p / "was-a-link")
    os.mkdir(p / "was-a-link")
    write(p / "born", b"born\n")
    os.rename(p / "born", p / "was-a-link" / "b")
    workspace.umount()
    workspace.mount()


def test_snapshots_are_read_only_and_hidden(mounted):
    ws, p = mounted, mounted.path
    checkpoint(ws)
    assert ".snapshots" not in os.listdir(p)
    assert ".cowfs" not in os.listdir(p)
    s1 = ws.snapshots / "turn-1"
    for attempt in (lambda: open(s1 / "README", "ab"), lambda: open(s1 / "new", "wb"),
                    lambda: os.mkdir(s1 / "d"), lambda: os.unlink(s1 / "README"),
                    lambda: os.chmod(s1 / "README", 0o777), lambda: os.rename(s1 / "README", s1 / "x")):
        with pytest.raises(OSError) as e:
            attempt()
        assert e.value.errno == errno.EROFS
    out = subprocess.run(["find", "."], cwd=p, capture_output=True, text=True, check=True).stdout
    assert ".snapshots" not in out and ".cowfs" not in out


def test_snapdir_visible_option(workspace):
    workspace.mount("--snapdir", "visible")
    assert ".snapshots" in os.listdir(workspace.path)


def test_the_store_cannot_be_reached_or_shadowed(mounted):
    p = mounted.path
    assert not (p / ".cowfs").exists()
    with pytest.raises(OSError) as e:
        os.mkdir(p / ".cowfs")
    assert e.value.errno == errno.EPERM
    with pytest.raises(OSError):
        os.mkdir(p / ".snapshots")


def test_errors_are_errnos_and_the_mount_survives(mounted):
    p = mounted.path
    cases = [(lambda: os.rmdir(p / "src"), errno.ENOTEMPTY),
             (lambda: os.unlink(p / "missing"), errno.ENOENT),
             (lambda: os.rename(p / "README", p / "src"), errno.EISDIR),
             (lambda: os.rename(p / "src", p / "README"), errno.ENOTDIR),
             (lambda: os.mkdir(p / "src"), errno.EEXIST),
             (lambda: os.unlink(p / "src"), errno.EISDIR)]
    for call, expected in cases:
        with pytest.raises(OSError) as e:
            call()
        assert e.value.errno == expected
    assert read(p / "README") == b"readme v0\n"


def test_fsync_and_fdatasync_reach_the_backing_file(mounted):
    """Not only no error: the data is in the backing file once fsync returns, and the daemon
    synced that very file (fsync for fsync, fdatasync for fdatasync: strace, attached first),
    and the directory for fsync of a directory."""
    ws, p = mounted, mounted.path
    pid = json.loads(ws.cli("status", "--json").stdout)["daemon_pid"]
    log = ws.path.parent / "fsync.strace"
    d = os.open(p / "src", os.O_RDONLY | os.O_DIRECTORY)
    with open(p / "README", "r+b", buffering=0) as f:
        with traced(pid, ["-y", "-e", "trace=fsync,fdatasync", "-o", log]):
            f.write(b"R")
            os.fsync(f.fileno())
            assert read(ws.backing / "README") == b"Readme v0\n"
            f.write(b"E")
            os.fdatasync(f.fileno())
            assert read(ws.backing / "README") == b"REadme v0\n"
            os.fsync(d)
    os.close(d)
    calls = re.findall(rb"(fsync|fdatasync)\(\d+<([^>]*)>\) = 0", log.read_bytes())
    synced = [(call, os.path.basename(path)) for call, path in calls]
    for want in [(b"fsync", b"README"), (b"fdatasync", b"README"), (b"fsync", b"src")]:
        assert want in synced, (want, calls)


@pytest.mark.root_only   # objects owned by others: only a root daemon makes them
def test_objects_created_belong_to_the_caller(mounted):
    p = mounted.path
    os.chmod(p, 0o777)
    subprocess.run(["setpriv", "--reuid=1234", "--regid=1234", "--clear-groups",
                    "sh", "-c", f"mkdir '{p}/mine' && echo x > '{p}/mine/f'"], check=True)
    for path in (p / "mine", p / "mine" / "f"):
        st = os.lstat(path)
        assert (st.st_uid, st.st_gid) == (1234, 1234)
    r = subprocess.run(["setpriv", "--reuid=1234", "--regid=1234", "--clear-groups",
                        "sh", "-c", f"echo x > '{p}/README'"], capture_output=True, text=True)
    assert r.returncode != 0 and "Permission denied" in r.stderr


def test_unprivileged_changes_clear_setuid_and_setgid_as_natively(workspace):
    """A write, truncate or O_TRUNC open by a user without CAP_FSETID drops S_ISUID
    (and S_ISGID of a group-executable file), as it does on the backing filesystem itself.

    The daemon does the backing operations as root, which keeps the bits; the
    O_TRUNC open used to leave them (found by comparing with native XFS).
    """
    p = workspace.path
    native = p.parent / "native"
    native.mkdir()
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "sh", "-c"]
    changes = {"append": "printf X >> '{f}'", "truncate": "truncate -s 1 '{f}'",
               "open O_TRUNC": ": > '{f}'"}
    for d in (p, native):
        for name in changes:
            write(d / name, b"#!/bin/sh\n")
            os.chmod(d / name, 0o6777)
    workspace.mount()
    for name, command in changes.items():
        for d in (native, p):
            subprocess.run([*as_nobody, command.format(f=d / name)], check=True)
        want = stat.S_IMODE(os.stat(native / name).st_mode)
        assert want == 0o777, name
        assert stat.S_IMODE(os.stat(p / name).st_mode) == want, name


@pytest.mark.parametrize("backing", ["ext4"], indirect=True)
def test_long_capture_does_not_freeze_the_mount(workspace):
    """Capturing a 1 GiB file by copy (ext4 cannot clone) runs off the request thread."""
    p = workspace.path
    with open(p / "big", "wb") as f:
        block = os.urandom(1 << 20)
        for _ in range(1024):
            f.write(block)
    (p / "other").mkdir()
    workspace.mount()
    finished = {}

    def edit():
        with open(p / "big", "r+b") as f:
            f.write(b"x")
        finished["edit"] = time.monotonic()

    t = threading.Thread(target=edit)
    t.start()
    time.sleep(0.01)
    for i in range(20):
        write(p / "other" / f"f{i}", b"x")
        os.listdir(p / "other")
    finished["probes"] = time.monotonic()
    t.join()
    assert finished["probes"] < finished["edit"], "other requests waited for the capture"


@pytest.fixture
def tiny_ext4(tmp_path_factory):
    """A 64 MiB ext4 image, loop-mounted: small enough to fill."""
    base = tmp_path_factory.mktemp("tiny")
    img, mnt = base / "img", base / "mnt"
    mnt.mkdir()
    subprocess.run(["truncate", "-s", "64M", img], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", img], check=True)
    subprocess.run(["mount", "-o", "loop", img, mnt], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", mnt], check=False)


def fill_disk(path) -> None:
    """Fill the filesystem of *path* (a file outside the workspace) until ENOSPC."""
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * (1 << 20))
        except OSError as e:
            assert e.errno == errno.ENOSPC


def test_disk_full_during_capture_fails_the_write_and_leaves_no_gap(tiny_ext4):
    """ext4 cannot clone: capturing a 16 MiB file needs 16 MiB free.

    The capture happens when the file is opened for writing, so that is
    where ENOSPC surfaces (with the writeback cache a write() only fills the
    page cache). Nothing changes without its pre-image.
    """
    from conftest import Workspace
    ws = Workspace(tiny_ext4 / "ws")
    data = os.urandom(16 << 20)
    write(ws.path / "big", data)
    try:
        ws.mount()
        fill_disk(tiny_ext4 / "filler")
        with pytest.raises(OSError) as e:
            with open(ws.path / "big", "r+b") as f:
                f.write(b"changed")
        assert e.value.errno == errno.ENOSPC
        assert read(ws.path / "big") == data
        os.unlink(tiny_ext4 / "filler")
        with open(ws.path / "big", "r+b") as f:
            f.write(b"changed")
        checkpoint(ws)
        assert read(ws.snapshots / "turn-0" / "big") == data
        assert read(ws.snapshots / "turn-1" / "big") == b"changed" + data[7:]
        status = ws.cli("status").stdout
        assert "capture mode: copy" in status
    finally:
        ws.cleanup()


def test_a_write_that_does_not_fit_fails_at_close(tiny_ext4):
    """write() only fills the page cache; the kernel writes it back on close.

    cowfs answers FLUSH with ENOSYS (the kernel stops sending it), so the
    ENOSPC of that writeback must still reach close() and fsync().
    """
    from conftest import Workspace
    ws = Workspace(tiny_ext4 / "ws")
    try:
        ws.mount()
        fill_disk(tiny_ext4 / "filler")
        for sync in (False, True):
            fd = os.open(ws.path / f"new-{sync}", os.O_WRONLY | os.O_CREAT, 0o644)
            os.write(fd, b"x" * (4 << 20))
            with pytest.raises(OSError) as e:
                if sync:
                    os.fsync(fd)
                os.close(fd)
            assert e.value.errno == errno.ENOSPC
            if sync:
                os.close(fd)
    finally:
        ws.cleanup()


def test_rollback_refreshes_the_kernels_size_of_a_hard_linked_file(workspace):
    """Found by the model test: a stale size through the mount after rollbacks of a hard-linked file."""
    p = workspace.path
    write(p / "b", b"XY")
    os.link(p / "b", p / "a")
    os.symlink("a", p / "n\nl")
    workspace.mount()
    os.rename(p / "n\nl", p / "b")
    rollback(workspace, 0)
    os.truncate(p / "a", 0)
    rollback(workspace, 0)
    assert os.stat(p / "a").st_size == 2
    assert read(p / "a") == b"XY" and read(p / "b") == b"XY"


@pytest.mark.root_only   # objects owned by others: only a root daemon makes them
def test_listing_again_after_a_change_shows_the_change(mounted):
    """readdir reuses the attributes it sent in the same epoch; every change ends one.

    The kernel takes the attributes of a readdirplus listing into its cache, so
    a stale listing after a change would show through a later stat.
    """
    p = mounted.path
    f, g = p / "src" / "app.py", p / "src" / "other"
    write(g, b"other")
    changes = [
        ("chmod", lambda: os.chmod(f, 0o600), lambda st: stat.S_IMODE(st.st_mode) == 0o600),
        ("chown", lambda: os.chown(f, 1234, 1234), lambda st: (st.st_uid, st.st_gid) == (1234, 1234)),
        ("utime", lambda: os.utime(f, ns=(5, 7_000_000_000)), lambda st: st.st_mtime_ns == 7_000_000_000),
        ("link", lambda: os.link(f, p / "src" / "f2"), lambda st: st.st_nlink == 2),
        ("unlink", lambda: os.unlink(p / "src" / "f2"), lambda st: st.st_nlink == 1),
        ("rename over", lambda: os.rename(g, f), lambda st: st.st_size == len(b"other")),
        ("truncate", lambda: os.truncate(f, 2), lambda st: st.st_size == 2),
    ]
    for what, change, shows in changes:
        os.listdir(p / "src")
        change()
        os.listdir(p / "src")
        assert shows(os.stat(f)), what
    src_links = os.stat(p / "src").st_nlink
    os.listdir(p)
    os.mkdir(p / "src" / "sub")
    os.listdir(p)
    assert os.stat(p / "src").st_nlink == src_links + 1
    turn = checkpoint(mounted)
    mode = stat.S_IMODE(os.stat(f).st_mode)
    os.chmod(f, 0o640 if mode != 0o640 else 0o600)
    os.listdir(p / "src")
    rollback(mounted, turn)
    os.listdir(p / "src")
    assert stat.S_IMODE(os.stat(f).st_mode) == mode


def test_rollback_refreshes_the_kernels_link_count(workspace):
    """Removing or adding one name of a hard-linked file changes the others' st_nlink.

    The kernel caches st_nlink; after a rollback that puts the name back (or
    takes it away) it must see the restored count through every name.
    """
    p = workspace.path
    write(p / "f", b"hi")
    (p / "d").mkdir()
    os.link(p / "f", p / "d" / "g")
    workspace.mount()
    assert os.stat(p / "f").st_nlink == 2
    os.unlink(p / "d" / "g")
    assert os.stat(p / "f").st_nlink == 1
    rollback(workspace, 0)
    assert os.stat(p / "f").st_nlink == 2 and os.stat(p / "d" / "g").st_nlink == 2
    os.link(p / "f", p / "h")
    assert os.stat(p / "f").st_nlink == 3
    rollback(workspace, 0)
    assert os.stat(p / "f").st_nlink == 2 and not (p / "h").exists()


def test_rollback_restores_size_and_mtime_of_files_the_kernel_knows(mounted):
    """The kernel forgets a restored file with its entry, unless something keeps its inode
    (an open descriptor, a hard link): then the CLI re-applies size and mtime through the mount."""
    ws, p = mounted, mounted.path
    write(p / "linked", b"linked v0\n")
    os.link(p / "linked", p / "other-name")
    os.utime(p / "README", ns=(1, 1_000_000_000))
    checkpoint(ws)
    paths = [p / "README", p / "src" / "app.py", p / "linked"]
    before = {f: os.stat(f) for f in paths}
    holder = open(p / "src" / "app.py", "rb")     # keeps its inode alive through the rollback
    try:
        for f in paths:
            write(f, b"a longer version of this file\n")
            os.stat(f)                             # the kernel caches the new size and mtime
        rollback(ws, 1)
        for f in paths:
            st = os.stat(f)
            assert (st.st_size, st.st_mtime_ns) == (before[f].st_size, before[f].st_mtime_ns), f
        assert read(p / "src" / "app.py") == b"print('v0')\n"
        assert holder.read() == b"print('v0')\n"
    finally:
        holder.close()
    assert read(p / "other-name") == b"linked v0\n"


@pytest.mark.parametrize("backing", ["xfs"], indirect=True)
def test_more_known_inodes_than_descriptors(workspace):
    """The daemon may hold 1,024 descriptors here; the kernel learns 3,000 inodes."""
    p = workspace.path
    for d in range(30):
        (p / f"d{d}").mkdir()
        for f in range(100):
            write(p / f"d{d}" / f"f{f}", b"%d.%d" % (d, f))
    t0 = tree(p)                               # not mounted yet: the backing directory
    workspace.cowfs_cmd = ["prlimit", "--nofile=1024:1024", *workspace.cowfs_cmd]
    workspace.mount()
    assert_live(workspace, t0)                 # every inode looked up, most descriptors closed
    for d in range(30):                        # changes through nodes reopened by handle
        write(p / f"d{d}" / "f7", b"changed")
        os.rename(p / f"d{d}" / "f8", p / f"d{d}" / "f8.moved")
        os.chmod(p / f"d{d}" / "f9", 0o600)
    t1 = live(workspace)
    checkpoint(workspace)
    assert snap(workspace, 0) == t0 and snap(workspace, 1) == t1
    rollback(workspace, 0)
    assert_live(workspace, t0)


def test_rollback_refreshes_the_size_of_a_file_whose_rows_name_old_places(mounted):
    """Found by the model test: no layer after the target names where the file is now."""
    ws, p = mounted, mounted.path
    write(p / "a", b"x" * 46)
    os.rename(p / "a", p / "src" / "b")
    os.rename(p / "src" / "b", p / "src" / "n\nl")
    checkpoint(ws)
    os.truncate(p / "src" / "n\nl", 0)
    os.link(p / "src" / "n\nl", p / "again")
    checkpoint(ws)
    rollback(ws, 1)
    assert os.stat(p / "src" / "n\nl").st_size == 46
    assert read(p / "src" / "n\nl") == b"x" * 46
    assert not (p / "again").exists()


def test_checkpoint_after_a_failed_writeback_seals_the_turn(tiny_ext4):
    """A write-back error (ENOSPC) is reported by syncfs too; it is its writer's, not the turn's."""
    from conftest import Workspace
    ws = Workspace(tiny_ext4 / "ws")
    try:
        ws.mount()
        write(ws.path / "kept", b"kept\n")
        fill_disk(tiny_ext4 / "filler")
        fd = os.open(ws.path / "lost", os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, b"x" * (4 << 20))
        with pytest.raises(OSError):
            os.close(fd)
        os.unlink(tiny_ext4 / "filler")
        turn = checkpoint(ws)
        assert read(ws.snapshots / f"turn-{turn}" / "kept") == b"kept\n"
        write(ws.path / "after", b"after\n")                # work goes on
        assert read(ws.snapshots / f"turn-{checkpoint(ws)}" / "after") == b"after\n"
    finally:
        ws.cleanup()
