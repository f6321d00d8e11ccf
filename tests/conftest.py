"""Shared fixtures for the cowfs tests: real backing filesystems, real FUSE mounts.

Everything here must run as root (loop devices, mount, FUSE).

Fixtures
--------
``xfs_root``    (session)  Path to the root of a fresh sparse 2 GiB XFS image
                           (``mkfs.xfs -m reflink=1``), loop-mounted.
``ext4_root``   (session)  Path to a plain directory on the root filesystem
                           (ext4 here: no reflink, so cowfs must copy).
``backing``     (function) Path to a fresh, empty directory inside one of the
                           two roots. Parametrized with ids ``xfs`` and
                           ``ext4``, so every test using it (or ``workspace``)
                           runs on both. To run on one only::

                               @pytest.mark.parametrize("backing", ["xfs"], indirect=True)

``workspace``   (function) A :class:`Workspace` at ``backing / "ws"``: the
                           directory exists, is empty and is NOT mounted yet;
                           populate ``ws.path`` then call ``ws.mount()``.
``workspace_factory`` (function) ``make(name="ws") -> Workspace`` for tests
                           that need several workspaces; each one is unmounted
                           at teardown.
``test_users`` (session)   ``(TEST_USER, OTHER_USER)``, created with useradd if
                           absent: cowfs runs rootless as the first
                           (``Workspace(path, user=TEST_USER)`` runs every
                           command through ``runuser -u``); the second is a
                           third party that must be kept out.

Anything mounted under a test's backing directory is unmounted when the test
ends, whatever happened; a session-finish hook sweeps leftover mounts and loop
devices again, and the next session cleans up after sessions that were killed.

Helpers that test modules may import (``from conftest import ...``; keep
``tests/`` without an ``__init__.py`` for that): :class:`Workspace`,
:func:`run`, :class:`CommandError`, :func:`is_fuse_mounted`,
:func:`mounts_under`, :func:`drop_kernel_caches`, :func:`traced`.

Environment
-----------
``COWFS_HYPOTHESIS_PROFILE``  "ci" (default; "quick" with --quick) or "long".
``COWFS_HYPOTHESIS_EXAMPLES`` max_examples of the profile (default 25 for "ci",
                              6 for "quick", 2000 for "long").
Failing hypothesis examples are kept in ``tests/hypothesis-db`` (committed): see
``EXAMPLE_DATABASE``.
``COWFS_TEST_BASE``           where the per-session temp dirs go (default
                              /var/tmp/cowfs-tests; must be on the root disk).
``COWFS_TEST_CMD_TIMEOUT``    default timeout in seconds of every command the
                              fixtures run (default 120); a timeout always
                              raises :class:`CommandError`.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.database import DirectoryBasedExampleDatabase

REPO = Path(__file__).resolve().parent.parent
BASE = Path(os.environ.get("COWFS_TEST_BASE", "/var/tmp/cowfs-tests"))
XFS_IMAGE_SIZE = 2 * 1024**3
DEFAULT_TIMEOUT = float(os.environ.get("COWFS_TEST_CMD_TIMEOUT", "120"))

# --------------------------------------------------------------------------
# hypothesis profiles and markers

# Failing examples are kept in a directory committed with the tests, so that a failure found
# once is replayed first by every later run, CI's clean clones included: the run that finds one
# writes it there (under a key that hypothesis derives from the test's source: editing the
# test, or the state machine class, starts a new key), and it is committed with the fix. A
# failure seen only in CI's log is brought in by running the test once locally with the
# `@reproduce_failure` blob CI printed (print_blob), or the seed pytest printed
# (`--hypothesis-seed`), which saves it here too. Passing runs add nothing.
EXAMPLE_DATABASE = DirectoryBasedExampleDatabase(str(REPO / "tests" / "hypothesis-db"))

settings.register_profile(
    "ci",
    max_examples=int(os.environ.get("COWFS_HYPOTHESIS_EXAMPLES", "25")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
    database=EXAMPLE_DATABASE,
)
settings.register_profile("long", parent=settings.get_profile("ci"),
                          max_examples=int(os.environ.get("COWFS_HYPOTHESIS_EXAMPLES", "2000")))
settings.register_profile("quick", parent=settings.get_profile("ci"),
                          max_examples=int(os.environ.get("COWFS_HYPOTHESIS_EXAMPLES", "6")))
settings.load_profile(os.environ.get("COWFS_HYPOTHESIS_PROFILE", "ci"))

# The quick tier (`scripts/test --quick`, under 5 minutes on a 2-core machine): these modules,
# on one backing filesystem (their "xfs" runs: root mounts, and test_rootless's user mounts),
# without the tests marked slow, with the "quick" hypothesis profile (a short model-test run). Every test still mounts cowfs for real; the full
# run (what CI runs) is the judge. A new module joins by its name here.
QUICK_MODULES = {"test_scenarios", "test_cli", "test_api", "test_differential", "test_model",
                 "test_first_hour", "test_rootless"}


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true",
                     help="the quick tier: scenarios, CLI, API, differential POSIX checks and a "
                          "short model-test run, on XFS only (see QUICK_MODULES in conftest.py)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a slow test (large files, long runs)")
    config.addinivalue_line("markers", "root_only: root-mode semantics (not run on xfs-rootless)")
    if config.getoption("quick") and "COWFS_HYPOTHESIS_PROFILE" not in os.environ:
        settings.load_profile("quick")


def _in_quick_tier(item) -> bool:
    callspec = getattr(item, "callspec", None)
    backing = callspec.params.get("backing", "xfs") if callspec else "xfs"
    return (item.module.__name__ in QUICK_MODULES and backing == "xfs"
            and item.get_closest_marker("slow") is None)


# The modules whose tests also run with cowfs mounted by TEST_USER (backing
# "xfs-rootless"); the test process itself stays root. The git export's own
# tests make their target repositories as root, so a rootless daemon could not
# write them: tests/test_rootless.py exports as the user instead.
ROOTLESS_MODULES = {"test_scenarios", "test_model", "test_model_regressions", "test_cli", "test_api",
                    "test_rollback_stale_size", "test_parity", "test_recovery",
                    "test_checkpoint_cost", "test_everyday", "test_security",
                    "test_history_random", "test_differential", "test_prune", "test_ignore",
                    "test_history_ops", "test_first_hour", "test_durability", "test_mcp"}


def pytest_collection_modifyitems(config, items):
    keep, dropped = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        rootless_run = callspec is not None and \
            str(callspec.params.get("backing", "")).endswith("-rootless")
        if rootless_run and (item.module.__name__ not in ROOTLESS_MODULES
                             or item.get_closest_marker("root_only")):
            dropped.append(item)
        elif config.getoption("quick") and not _in_quick_tier(item):
            dropped.append(item)
        else:
            keep.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


class CowfsTeardownWarning(UserWarning):
    """Cleanup after a test needed a fallback or left something behind."""


# --------------------------------------------------------------------------
# running commands


class CommandError(subprocess.CalledProcessError):
    """A command exited non-zero (with check=True) or timed out."""

    def __init__(self, returncode, cmd, output=None, stderr=None, timeout=None):
        super().__init__(returncode, cmd, output, stderr)
        self.timeout = timeout

    def __str__(self):
        argv = shlex.join(os.fsdecode(a) for a in self.cmd)
        if self.timeout is not None:
            head = f"command timed out after {self.timeout:g}s: {argv}"
        else:
            head = f"command failed with exit code {self.returncode}: {argv}"
        parts = [head]
        for label, text in (("stderr", self.stderr), ("stdout", self.output)):
            text = (text or "").rstrip()
            if text:
                if len(text) > 4000:
                    text = "...\n" + text[-4000:]
                parts.append(f"--- {label} ---\n{text}")
        return "\n".join(parts)


def _argv(args) -> list:
    out = []
    for a in args:
        if isinstance(a, (str, bytes)):
            out.append(a)
        elif isinstance(a, os.PathLike):
            out.append(os.fspath(a))
        else:
            out.append(str(a))
    return out


def _env(extra=None) -> dict:
    env = dict(os.environ)
    # `python -m cowfs` must find the package even when it is not installed
    # in the running interpreter (e.g. a venv without `pip install -e .`).
    pp = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + pp if pp else "")
    if extra:
        env.update(extra)
    return env


def run(argv, *, check=True, timeout=None, input=None, env=None, cwd=None):
    """Run argv; return CompletedProcess with text stdout/stderr.

    Output is collected through temporary files, not pipes, so a command that
    leaves a daemon behind holding its stdout/stderr (``cowfs mount``) still
    returns as soon as the command itself exits. Text is decoded with
    surrogateescape (names may not be UTF-8). Raises CommandError on a
    non-zero exit if check, and on a timeout always.
    """
    argv = _argv(argv)
    timeout = DEFAULT_TIMEOUT if timeout is None else timeout
    if isinstance(input, str):
        input = input.encode("utf-8", "surrogateescape")
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        timed_out = False
        try:
            p = subprocess.run(
                argv,
                input=input,
                stdin=None if input is not None else subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                timeout=timeout,
                env=_env(env),
                cwd=cwd,
            )
            rc = p.returncode
        except subprocess.TimeoutExpired:  # the child has been killed
            timed_out, rc = True, -9
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode("utf-8", "surrogateescape")
        stderr = err.read().decode("utf-8", "surrogateescape")
    if timed_out:
        raise CommandError(rc, argv, stdout, stderr, timeout=timeout)
    if check and rc != 0:
        raise CommandError(rc, argv, stdout, stderr)
    return subprocess.CompletedProcess(argv, rc, stdout, stderr)


# --------------------------------------------------------------------------
# unprivileged users

TEST_USER = "cowfs-test"     # runs cowfs rootless
OTHER_USER = "cowfs-other"   # anyone else


def ensure_user(name: str) -> None:
    import pwd
    try:
        pwd.getpwnam(name)
    except KeyError:
        run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name])


def as_user(user: str) -> list[str]:
    """The argv prefix running a command as *user* (from root, with this environment)."""
    return ["runuser", "-u", user, "--"]


def chown_tree(path, user: str) -> None:
    """Hand *path* and everything under it not yet owned by *user* to *user*: only what
    needs it, so that a remount sees no change made while unmounted."""
    run(["find", path, "-xdev", "!", "-user", user, "-exec", "chown", "-h", f"{user}:{user}",
         "{}", "+"])


def rootless(request) -> bool:
    """Whether this test's workspaces are mounted by TEST_USER (backing "xfs-rootless")."""
    callspec = getattr(request.node, "callspec", None)
    return bool(callspec) and str(callspec.params.get("backing", "")).endswith("-rootless")


@pytest.fixture(scope="session")
def users_may_allow_other():
    """A rootless mount that this (root) test process reaches needs allow_other, which
    fusermount3 grants users only with user_allow_other in /etc/fuse.conf."""
    conf = Path("/etc/fuse.conf")
    text = conf.read_text() if conf.exists() else ""
    if not any(line.split("#")[0].strip() == "user_allow_other" for line in text.splitlines()):
        conf.write_text(text + ("" if text.endswith("\n") or not text else "\n")
                        + "# added by the cowfs tests (rootless mounts root can reach)\n"
                        + "user_allow_other\n")


@pytest.fixture(scope="session")
def test_users():
    for name in (TEST_USER, OTHER_USER):
        ensure_user(name)
    return TEST_USER, OTHER_USER


# --------------------------------------------------------------------------
# mounts and loop devices


@dataclass(frozen=True)
class MountEntry:
    mount_id: int
    dev: str  # "major:minor"
    mountpoint: str
    fstype: str
    source: str


def _unescape(field: bytes) -> str:
    raw = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), field)
    return os.fsdecode(raw)


def mountinfo() -> list[MountEntry]:
    """Parse /proc/self/mountinfo, in mount order."""
    entries = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f.read().splitlines():
            fields = line.split(b" ")
            try:
                sep = fields.index(b"-", 6)
            except ValueError:
                continue
            mp = _unescape(fields[4])
            if mp.endswith("//deleted"):
                mp = mp[: -len("//deleted")]
            entries.append(
                MountEntry(
                    int(fields[0]),
                    fields[2].decode(),
                    mp,
                    _unescape(fields[sep + 1]),
                    _unescape(fields[sep + 2]),
                )
            )
    return entries


def canonical(path) -> str:
    """Absolute path with symlinks resolved in the parent only.

    Never stats `path` itself: it may be a FUSE mount whose daemon hangs.
    """
    path = os.path.abspath(os.fspath(path))
    parent, name = os.path.split(path)
    return os.path.join(os.path.realpath(parent), name) if name else path


def fuse_mount_at(path) -> MountEntry | None:
    """The topmost FUSE mount whose mount point is exactly path, if any."""
    p = canonical(path)
    found = [m for m in mountinfo() if m.mountpoint == p and m.fstype.startswith("fuse")]
    return found[-1] if found else None


def is_fuse_mounted(path) -> bool:
    return fuse_mount_at(path) is not None


def mounts_under(root, *, include_root=True) -> list[MountEntry]:
    """Mounts at or below root, innermost (and most recent) first."""
    r = canonical(root)
    found = [
        m
        for m in mountinfo()
        if m.mountpoint.startswith(r + "/") or (include_root and m.mountpoint == r)
    ]
    found.reverse()
    found.sort(key=lambda m: m.mountpoint.count("/"), reverse=True)
    return found


def _abort_fuse_connection(entry: MountEntry) -> None:
    """Abort a FUSE connection (kills a hung daemon's mount), if fusectl is mounted."""
    major, _, minor = entry.dev.partition(":")
    abort = Path("/sys/fs/fuse/connections") / minor / "abort"
    if major == "0" and abort.exists():
        try:
            abort.write_text("1")
        except OSError:
            pass


def _lazy_umount(entry: MountEntry) -> None:
    mp = entry.mountpoint
    if entry.fstype.startswith("fuse"):
        run(["fusermount3", "-u", "-z", mp], check=False, timeout=30)
    if any(m.mount_id == entry.mount_id for m in mountinfo()):
        run(["umount", "-l", mp], check=False, timeout=30)
    if entry.fstype.startswith("fuse"):
        _abort_fuse_connection(entry)


def sweep_mounts(root, *, include_root=True) -> list[str]:
    """Lazily unmount everything at or below root. Returns what was unmounted."""
    swept = []
    for _ in range(10):  # stacked mounts show up one layer at a time
        entries = mounts_under(root, include_root=include_root)
        if not entries:
            break
        for e in entries:
            _lazy_umount(e)
            swept.append(f"{e.fstype} at {e.mountpoint}")
    return swept


def loops_backed_by(root) -> list[str]:
    """Loop devices backed by a file at or below root (not yet set to autoclear)."""
    r = canonical(root)
    devs = []
    for bf in sorted(Path("/sys/block").glob("loop*/loop/backing_file")):
        try:
            name = bf.read_text().rstrip("\n")
        except OSError:
            continue
        if name.endswith(" (deleted)"):
            name = name[: -len(" (deleted)")]
        if name == r or name.startswith(r + "/"):
            try:  # autoclear set: already detached, goes once released
                if (bf.parent / "autoclear").read_text().strip() == "1":
                    continue
            except OSError:
                pass
            devs.append("/dev/" + bf.parts[3])
    return devs


def detach_loops(root) -> list[str]:
    devs = loops_backed_by(root)
    for dev in devs:
        # On a still-busy device this sets autoclear: it goes when released.
        run(["losetup", "-d", dev], check=False, timeout=30)
    return devs


# --------------------------------------------------------------------------
# tracing a daemon


def tracers_of_threads(pid: int) -> set[int]:
    """The TracerPid of each thread of process *pid* (0: not traced)."""
    tracers = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/status") as f:
                tracers.add(int(re.search(r"^TracerPid:\s+(\d+)$", f.read(), re.M).group(1)))
        except FileNotFoundError:
            pass    # a thread that just ended
    return tracers


@contextmanager
def traced(pid: int, args: list, *, strace=("strace",), timeout: float = 20):
    """``strace -f ARGS -p PID`` around the block, which starts only once the tracer is proven
    attached to every thread of *pid* (their TracerPid), and must end with it still attached:
    what it reports is then all the process did meanwhile, not what was left once it caught up.
    *strace*: the tracer's argv (tests of this check wrap it)."""
    tracer = subprocess.Popen([*strace, "-f", *map(os.fspath, args), "-p", str(pid)],
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + timeout
        while tracers_of_threads(pid) != {tracer.pid}:
            if tracer.poll() is not None:
                pytest.fail(f"strace exited {tracer.returncode}: {tracer.stderr.read()}")
            if time.monotonic() > deadline:
                pytest.fail(f"strace did not attach to every thread of {pid} within {timeout}s "
                            f"(tracers: {tracers_of_threads(pid)})")
            time.sleep(0.05)
        yield tracer
        if tracer.poll() is not None or tracers_of_threads(pid) != {tracer.pid}:
            pytest.fail(f"strace let go of {pid} before the block ended")
    finally:
        tracer.send_signal(signal.SIGINT)
        tracer.wait(timeout=30)


def drop_kernel_caches() -> None:
    """Make the kernel forget every dentry and inode nobody holds (FUSE ones included: it sends
    FORGET, and the next lookup takes its attributes from the daemon): a cold cache without a
    remount. Machine-wide, but only clean caches go."""
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2\n")


def remove_tree(path) -> None:
    """rm -rf path, after lazily unmounting anything below it. Warns on failure."""
    swept = sweep_mounts(path)
    if swept:
        warnings.warn(f"unmounted leftovers under {path}: {swept}", CowfsTeardownWarning)
    if mounts_under(path):
        warnings.warn(f"not removing {path}: still has mounts", CowfsTeardownWarning)
        return
    for attempt in range(3):
        try:
            shutil.rmtree(path)
            return
        except FileNotFoundError:
            return
        except OSError as e:  # e.g. a daemon still writing into its store
            if attempt == 2:
                warnings.warn(f"could not remove {path}: {e}", CowfsTeardownWarning)
            time.sleep(0.2)


# --------------------------------------------------------------------------
# per-session directory

_session_dirs: list[Path] = []


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep_stale_runs() -> None:
    """Clean up after earlier sessions that died without tearing down."""
    for d in BASE.glob("run-*"):
        m = re.match(r"run-(\d+)-", d.name)
        if not m or _pid_alive(int(m.group(1))):
            continue
        sweep_mounts(d)
        detach_loops(d)
        if not mounts_under(d):
            shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def cowfs_test_dir():
    """A fresh directory on the root disk for this session's roots."""
    BASE.mkdir(parents=True, exist_ok=True)
    _sweep_stale_runs()
    d = Path(canonical(tempfile.mkdtemp(prefix=f"run-{os.getpid()}-", dir=BASE)))
    d.chmod(0o755)  # tests may run things as other users below it
    _session_dirs.append(d)
    try:
        yield d
    finally:
        sweep_mounts(d)
        detach_loops(d)
        if not mounts_under(d):
            shutil.rmtree(d, ignore_errors=True)


def pytest_sessionfinish(session, exitstatus):
    for d in _session_dirs:
        swept = sweep_mounts(d)
        loops = detach_loops(d)
        if swept or loops:
            print(
                f"\ncowfs conftest: session-end sweep of {d}: "
                f"unmounted {swept or 'nothing'}, detached {loops or 'nothing'}",
                file=sys.stderr,
            )
        if d.exists() and not mounts_under(d):
            shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------
# backing filesystems


@pytest.fixture(scope="session")
def xfs_root(cowfs_test_dir):
    img = cowfs_test_dir / "xfs.img"
    mnt = cowfs_test_dir / "xfs"
    mnt.mkdir()
    loop = None
    try:
        with open(img, "xb") as f:
            f.truncate(XFS_IMAGE_SIZE)  # sparse
        run(["mkfs.xfs", "-q", "-m", "reflink=1", img])
        loop = run(["losetup", "--find", "--show", img]).stdout.strip()
        run(["mount", "-t", "xfs", loop, mnt])
    except BaseException:
        if loop:
            run(["losetup", "-d", loop], check=False, timeout=30)
        img.unlink(missing_ok=True)
        raise
    try:
        yield mnt
    finally:
        swept = sweep_mounts(mnt, include_root=False)
        if swept:
            warnings.warn(f"unmounted leftovers under {mnt}: {swept}", CowfsTeardownWarning)
        if run(["umount", mnt], check=False, timeout=60).returncode != 0:
            # Busy (e.g. a daemon still holds a workspace fd): detach lazily;
            # the loop device then goes away on its own (autoclear) once free.
            run(["umount", "-l", mnt], check=False, timeout=30)
        run(["losetup", "-d", loop], check=False, timeout=30)
        img.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def ext4_root(cowfs_test_dir):
    d = cowfs_test_dir / "ext4"
    d.mkdir()
    d.chmod(0o755)
    try:
        yield d
    finally:
        remove_tree(d)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:60]


@pytest.fixture(params=["xfs", "ext4", "xfs-rootless"], ids=["xfs", "ext4", "xfs-rootless"])
def backing(request):
    fs, _, mode = request.param.partition("-")
    root = request.getfixturevalue(f"{fs}_root")
    d = Path(tempfile.mkdtemp(prefix=_slug(request.node.name) + "-", dir=root))
    d.chmod(0o755)
    if mode == "rootless":
        request.getfixturevalue("test_users")
        request.getfixturevalue("users_may_allow_other")
        chown_tree(d, TEST_USER)
    try:
        yield d
    finally:
        remove_tree(d)


# --------------------------------------------------------------------------
# workspaces


class Workspace:
    """A workspace directory and the cowfs commands that act on it.

    ``ws.path``     the workspace (the mount point once mounted)
    ``ws.store``    ``ws.path / ".cowfs"``: only visible while unmounted
    ``ws.snapshots`` ``ws.path / ".snapshots"``: only exists while mounted
    ``ws.backing``  the directory underneath the mount, as ``/proc/PID/fd/N`` of a
                    descriptor opened before the first mount: the backing files
                    themselves, reached without the mount (the ground truth a test
                    compares the mount with); ``.cowfs`` is in it
    ``ws.mount(*extra_args, check=True)``   ``cowfs mount PATH ...``
    ``ws.umount(check=True)``               ``cowfs umount PATH``
    ``ws.cli(cmd, *args, check=True)``      ``cowfs CMD -C PATH ...``
    ``ws.is_mounted()``                     a FUSE mount is at PATH
    ``ws.cleanup()``                        unmount by any means (teardown)

    All commands return a CompletedProcess (text stdout/stderr) and accept
    ``timeout=``; with check=True a non-zero exit raises CommandError, which
    shows argv, exit code and stderr.
    """

    def __init__(self, path, user: str | None = None, allow_other: bool = False):
        self.path = Path(path)
        self.path.mkdir(exist_ok=True)
        self.user = user        # cowfs runs as this user (rootless); None: as root
        # A rootless mount that the tests (root) reach themselves: `mount --allow-other`.
        self.mount_args = ["--allow-other"] if allow_other else []
        # The argv prefix of every cowfs command; tests of the fixtures
        # replace it with a stub.
        self.cowfs_cmd = [*(as_user(user) if user else []), sys.executable, "-m", "cowfs"]
        self._backing_fd: int | None = None

    def __repr__(self):
        return f"Workspace({str(self.path)!r}, mounted={self.is_mounted()})"

    @property
    def store(self) -> Path:
        return self.path / ".cowfs"

    @property
    def snapshots(self) -> Path:
        return self.path / ".snapshots"

    def is_mounted(self) -> bool:
        return is_fuse_mounted(self.path)

    @property
    def backing(self) -> Path:
        """The backing directory itself, bypassing the mount (see the class docstring).

        Opened while unmounted (``mount()`` does it first), an O_PATH descriptor
        names the directory underneath for as long as it is held, across remounts."""
        if self._backing_fd is None:
            if self.is_mounted():
                raise RuntimeError(f"{self.path} is mounted: its backing directory is hidden; "
                                   "ask for ws.backing before mounting")
            self._backing_fd = os.open(self.path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        return Path(f"/proc/{os.getpid()}/fd/{self._backing_fd}")

    def _close_backing(self) -> None:
        if self._backing_fd is not None:
            os.close(self._backing_fd)
            self._backing_fd = None

    def _wait_unmounted(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while self.is_mounted():
            if time.monotonic() > end:
                return False
            time.sleep(0.05)
        return True

    def mount(self, *extra_args, check=True, timeout=None, env=None):
        """Mount cowfs over ws.path; returns once the mount is live."""
        if not self.is_mounted():
            self.backing            # opened while the directory underneath is still reachable
            if self.user:
                chown_tree(self.path, self.user)    # what root wrote there before mounting
        cp = run([*self.cowfs_cmd, "mount", self.path, *self.mount_args, *extra_args],
                 check=check, timeout=timeout, env=env)
        if cp.returncode == 0 and not self.is_mounted():
            raise CommandError(
                0, cp.args, cp.stdout,
                (cp.stderr or "") + f"\n[conftest] exit 0 but no FUSE mount at {self.path}",
            )
        return cp

    def umount(self, check=True, timeout=None, env=None):
        cp = run([*self.cowfs_cmd, "umount", self.path], check=check, timeout=timeout, env=env)
        if check and not self._wait_unmounted(10):
            raise CommandError(
                0, cp.args, cp.stdout,
                (cp.stderr or "") + f"\n[conftest] exit 0 but {self.path} is still mounted after 10s",
            )
        return cp

    def cli(self, *args, check=True, timeout=None, input=None, env=None):
        """``cowfs ARGS[0] -C ws.path ARGS[1:]`` (-C is a subcommand option)."""
        if not args:
            raise TypeError("cli() needs a subcommand")
        argv = [*self.cowfs_cmd, args[0], "-C", self.path, *args[1:]]
        return run(argv, check=check, timeout=timeout, input=input, env=env)

    def cleanup(self) -> list[str]:
        """Unmount by any means: cowfs umount, fusermount3 -u -z, umount -l.

        Never raises; returns a list of problems met (empty if it was not
        mounted or `cowfs umount` worked).
        """
        problems = []
        for _ in range(5):  # in case of stacked mounts
            entry = fuse_mount_at(self.path)
            if entry is None:
                break
            ok = False
            try:
                cp = run([*self.cowfs_cmd, "umount", self.path], check=False, timeout=30)
                ok = cp.returncode == 0
                if not ok:
                    problems.append(f"cowfs umount: exit {cp.returncode}: {cp.stderr.strip()[-2000:]}")
            except CommandError as e:
                problems.append(str(e))
            if self._wait_unmounted(5 if ok else 0):
                continue
            problems.append("fell back to fusermount3 -u -z")
            run(["fusermount3", "-u", "-z", self.path], check=False, timeout=30)
            if any(m.mount_id == entry.mount_id for m in mountinfo()):
                problems.append("fell back to umount -l")
                run(["umount", "-l", self.path], check=False, timeout=30)
            _abort_fuse_connection(entry)
        if self.is_mounted():
            problems.append(f"{self.path} is still mounted")
        else:
            self._close_backing()
        return problems


@pytest.fixture
def workspace_factory(backing, request):
    made: list[Workspace] = []
    user = TEST_USER if rootless(request) else None

    def make(name="ws") -> Workspace:
        ws = Workspace(backing / name, user=user, allow_other=bool(user))
        made.append(ws)
        return ws

    try:
        yield make
    finally:
        # A workspace left mounted is unmounted here, and that unmount seals its last turn:
        # an unmount or a seal that fails is a failure of the test, not a warning.
        failed = []
        for ws in reversed(made):
            problems = ws.cleanup()
            if problems:
                failed.append(f"teardown of {ws.path}: " + "; ".join(problems))
        if failed:
            pytest.fail("\n".join(failed), pytrace=False)


@pytest.fixture
def workspace(workspace_factory) -> Workspace:
    return workspace_factory()
