"""The first hour of a new user (issue 21): after the README's set-up `cowfs` is a command,
the processes cowfs starts import the installed cowfs wherever they are started from, and a
daemon that fails to start leaves a log the error names.
"""

import os
import pwd
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import REPO, TEST_USER, as_user, chown_tree, run

# What the launcher scripts/setup installs runs: the venv's console script (its sys.path
# starts with the venv's bin, not with the caller's working directory).
COWFS_BIN = str(Path(sys.executable).parent / "cowfs")
NEWCOMER = "cowfs-newcomer"     # an ordinary user with a home and a login shell


def _as(ws) -> list[str]:
    return [*(as_user(ws.user) if ws.user else []), COWFS_BIN]


def _mount_from(ws, cwd: Path, *extra, env=None):
    ws.backing      # opened while the directory underneath is reachable (ws.cleanup needs none)
    if ws.user:
        chown_tree(ws.path, ws.user)
    return run([*_as(ws), "mount", ws.path, *ws.mount_args, *extra], cwd=cwd, env=env, check=False)


def _decoy(parent: Path) -> Path:
    """A directory holding a `cowfs/` package that fails when imported: the parent of a cowfs
    checkout looks like this to Python."""
    here = parent / "here"
    for module in ("__init__.py", "__main__.py", "autocheckpoint.py"):
        path = here / "cowfs" / module
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("raise SystemExit('imported the cowfs directory in the working directory')\n")
    here.chmod(0o755)
    (here / "cowfs").chmod(0o755)
    return here


@pytest.mark.parametrize("backing", ["xfs", "xfs-rootless"], indirect=True)
def test_the_daemon_and_the_watcher_ignore_a_cowfs_directory_in_the_working_directory(workspace):
    ws = workspace
    (ws.path / "a").write_text("one\n")
    here = _decoy(ws.path.parent)
    mounted = _mount_from(ws, here, "--auto-checkpoint", "0.3")
    assert mounted.returncode == 0, mounted.stderr
    (ws.path / "a").write_text("two\n")
    deadline = time.monotonic() + 30
    while "last sealed turn-1" not in ws.cli("status").stdout:     # the watcher sealed it
        assert time.monotonic() < deadline, ws.cli("status").stdout
        time.sleep(0.2)


@pytest.mark.parametrize("backing", ["xfs", "xfs-rootless"], indirect=True)
def test_a_daemon_that_fails_to_start_leaves_the_log_its_error_names(workspace):
    ws = workspace
    site = ws.path.parent / "site"
    site.mkdir()
    site.chmod(0o755)
    # Imported by every interpreter at start (PYTHONPATH): fails the daemon's alone.
    (site / "sitecustomize.py").write_text(
        "import sys\nif '--foreground' in sys.argv:\n"
        "    raise SystemExit('this daemon was told to fail at start')\n")
    failed = _mount_from(ws, ws.path.parent, env={"PYTHONPATH": f"{site}{os.pathsep}{REPO}"})
    assert failed.returncode == 1 and not ws.is_mounted()
    line = failed.stderr.strip()
    assert "\n" not in line and "Traceback" not in line, failed.stderr
    assert line.startswith("cowfs: error: the daemon failed to start"), line
    assert "this daemon was told to fail at start" in line
    log = Path(line.rpartition("; see ")[2])
    try:
        assert "this daemon was told to fail at start" in log.read_text()
    finally:
        log.unlink()


# -- the README's set-up, from a fresh clone -------------------------------------------------
@pytest.fixture
def newcomer():
    """An ordinary user as `adduser` makes one: a home, bash as login shell, Debian's ~/.profile."""
    try:
        pwd.getpwnam(NEWCOMER)
    except KeyError:
        run(["useradd", "--create-home", "--shell", "/bin/bash", NEWCOMER])
    return NEWCOMER


@pytest.fixture
def launcher_kept():
    """scripts/setup points /usr/local/bin/cowfs at the checkout that ran it: point it back at
    the one it named before this test."""
    launcher = "/usr/local/bin/cowfs"
    before = os.readlink(launcher) if os.path.islink(launcher) else None
    yield launcher
    if before is not None:
        tmp = launcher + ".tmp"
        os.symlink(before, tmp)
        os.replace(tmp, launcher)
    elif os.path.islink(launcher):
        os.unlink(launcher)


def _login_shell(user: str, command: str):
    """`su - USER -c COMMAND`: a new login shell, its PATH from the system's and the user's
    profile only (none of this process's environment)."""
    return run(["env", "-i", "su", "-", user, "-c", command], check=False, timeout=60)


def _clone(dest: Path, owner: str | None = None) -> Path:
    run(["git", "clone", "-q", "--no-hardlinks", REPO, dest])
    if owner:
        chown_tree(dest, owner)
    return dest


@pytest.mark.slow
def test_after_roots_setup_cowfs_is_a_command_for_root_and_for_a_user(newcomer, launcher_kept):
    """From a fresh clone (of this checkout's HEAD: commit what you test), README's set-up, then
    `cowfs --version` in new login shells, sourcing nothing."""
    parent = Path(tempfile.mkdtemp(prefix="cowfs-clone-", dir="/var/tmp"))
    try:
        parent.chmod(0o755)
        clone = _clone(parent / "cowfs")
        run(["bash", clone / "scripts/setup"], timeout=600)
        for user in ("root", newcomer):
            answer = _login_shell(user, "cowfs --version && readlink -f \"$(command -v cowfs)\"")
            assert answer.returncode == 0, (user, answer.stderr)
            version, where = answer.stdout.split()[1:3]
            assert version == _version(clone) and where == str(clone / ".venv/bin/cowfs"), answer
    finally:
        shutil.rmtree(parent, ignore_errors=True)


@pytest.mark.slow
def test_after_a_users_own_setup_cowfs_is_their_command(newcomer):
    """A user's own clone and set-up (root installed the system packages): `cowfs` is theirs,
    in ~/.local/bin, at their next login."""
    home = Path(pwd.getpwnam(newcomer).pw_dir)
    clone = home / "src" / "cowfs"
    shutil.rmtree(home / "src", ignore_errors=True)
    shutil.rmtree(home / ".local", ignore_errors=True)
    try:
        (home / "src").mkdir()
        _clone(clone, owner=newcomer)    # by root: git refuses to read a repository it does not own
        chown_tree(home / "src", newcomer)
        setup = run([*as_user(newcomer), "env", f"HOME={home}", "bash", clone / "scripts/setup"],
                    cwd=home, timeout=900)
        assert f"{home}/.local/bin/cowfs" in setup.stdout
        answer = _login_shell(newcomer, "cowfs --version && readlink -f \"$(command -v cowfs)\"")
        assert answer.returncode == 0, answer.stderr
        assert answer.stdout.split()[1:3] == [_version(clone), str(clone / ".venv/bin/cowfs")]
    finally:
        shutil.rmtree(home / "src", ignore_errors=True)
        shutil.rmtree(home / ".local", ignore_errors=True)


def _version(clone: Path) -> str:
    text = (clone / "pyproject.toml").read_text()
    return text.split('version = "', 1)[1].split('"', 1)[0]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("pipx") is None, reason="pipx is not installed (apt-get install pipx)")
def test_pipx_install_from_the_checkout_is_a_users_command(newcomer):
    """README's other way in: `pipx install .` in the user's clone, then `cowfs` at their next
    login, and a rootless mount with it."""
    home = Path(pwd.getpwnam(newcomer).pw_dir)
    clone = home / "src" / "cowfs"
    shutil.rmtree(home / "src", ignore_errors=True)
    try:
        (home / "src").mkdir()
        _clone(clone, owner=newcomer)
        chown_tree(home / "src", newcomer)
        installed = _login_shell(newcomer, "cd src/cowfs && pipx install --force .")
        assert installed.returncode == 0, installed.stdout + installed.stderr
        used = _login_shell(newcomer, "mkdir -p src/ws && cowfs mount src/ws && echo x >src/ws/a "
                                      "&& cowfs checkpoint -C src/ws && cowfs umount src/ws")
        assert used.stdout.splitlines()[1:] == ["turn-1", f"unmounted {home}/src/ws"], used
    finally:
        _login_shell(newcomer, "pipx uninstall cowfs")
        shutil.rmtree(home / "src", ignore_errors=True)


def test_an_install_without_what_pyfuse3_needs_to_build_says_what_to_install(tmp_path):
    """`pip install .` (pipx's way too) on a machine without a compiler or pkg-config: the first
    error is one line naming the packages, not pyfuse3's compiler output."""
    venv = tmp_path / "venv"
    run([shutil.which("python3"), "-m", "venv", venv])
    bare = {"PATH": str(venv / "bin")}     # no gcc, no pkg-config
    done = run([venv / "bin" / "pip", "install", "--disable-pip-version-check", REPO], env=bare,
               check=False, timeout=300)
    assert done.returncode != 0
    assert "cowfs: error: pyfuse3 is built from source against libfuse 3 and needs pkg-config, gcc: " \
           "install them first (Debian/Ubuntu: sudo apt-get install libfuse3-dev pkg-config " \
           "python3-dev gcc fuse3)" in done.stdout + done.stderr, done


# -- errors that point the way ---------------------------------------------------------------
def _refused(ws, before: str = "", user: str | None = None, wrap=()) -> str:
    """`cowfs mount WS` after the shell commands *before*, in a mount namespace of its own (what
    they change is seen by nothing else); the one-line error it exits 2 with."""
    argv = [*wrap, *(as_user(user) if user else []), sys.executable, "-m", "cowfs", "mount", ws]
    done = run(["unshare", "--mount", "--propagation", "private", "sh", "-ec",
                before + '\nexec "$@"', "sh", *argv], check=False)
    line = done.stderr.strip()
    assert done.returncode == 2 and "\n" not in line and line.startswith("cowfs: error: "), done
    return line.removeprefix("cowfs: error: ")


def _fuse_node(tmp: Path, mode: str, options: str = "", major_minor: str = "10 229") -> str:
    """Shell commands that put a character device *major_minor* with *mode* over /dev/fuse."""
    return (f"mkdir -p {tmp} && mount -t tmpfs -o {options or 'defaults'} none {tmp}\n"
            f"mknod -m {mode} {tmp}/fuse c {major_minor}\nmount --bind {tmp}/fuse /dev/fuse")


@pytest.mark.parametrize("backing", ["xfs"], indirect=True)
def test_what_stands_in_the_way_of_fuse_is_named_with_its_fix(backing, test_users):
    ws, tmp = backing / "ws", backing / "dev"
    ws.mkdir()
    no_dev_fuse = _refused(ws, f"mkdir {tmp} && mount -t tmpfs none {tmp} && mount --rbind {tmp} /dev")
    assert no_dev_fuse.startswith("there is no /dev/fuse: load the FUSE kernel module")
    assert "--device /dev/fuse" in no_dev_fuse
    assert _refused(ws, _fuse_node(tmp, "666", major_minor="10 254")).startswith(
        "/dev/fuse has no driver: load the FUSE kernel module (modprobe fuse)")
    # A container's rules refuse the device (here: a filesystem mounted nodev) even to root.
    assert _refused(ws, _fuse_node(tmp, "666", "nodev")).startswith(
        "cannot open /dev/fuse (Permission denied): in a container, allow it (docker run")
    ws.chmod(0o777)
    assert _refused(ws, _fuse_node(tmp, "600"), user=TEST_USER).startswith(
        "cannot open /dev/fuse (Permission denied): make it usable by everyone as udev does")
    assert _refused(ws, "export PATH=/nonexistent") == \
        "fusermount3 is not installed (it mounts and unmounts FUSE): install fuse3"
    assert _refused(ws, wrap=["setpriv", "--bounding-set", "-sys_admin", "--inh-caps",
                              "-sys_admin"]).startswith("root without CAP_SYS_ADMIN")
    assert _refused(ws, f"mount --bind {ws} {ws} && mount -o remount,bind,ro {ws}") == \
        f"{ws} is on a read-only filesystem: cowfs keeps the history beside it, in .cowfs"
    ws.chmod(0o755)
    assert _refused(ws, user=TEST_USER) == \
        f"{ws} is not writable by you: mount a directory you own (or mount as root)"
    assert not (ws / ".cowfs").exists()


@pytest.mark.parametrize("backing", ["xfs", "xfs-rootless"], indirect=True)
def test_outside_a_mount_commands_name_the_mounts_there_are(workspace):
    ws = workspace
    ws.mount()
    outside = ws.path.parent
    who = as_user(ws.user) if ws.user else []
    log = run([*who, sys.executable, "-m", "cowfs", "log"], cwd=outside, check=False)
    assert log.returncode == 2 and log.stderr.startswith(
        "cowfs: error: . is not inside a cowfs mount; cowfs mounts: "), log.stderr
    assert str(ws.path) in log.stderr and len(log.stderr.splitlines()) == 1
    status = run([*who, sys.executable, "-m", "cowfs", "status"], cwd=outside)
    assert f"{ws.path}  turn-1 open (0 changes), last sealed turn-0, store 0 B" in \
        status.stdout.splitlines()
    # -C names where to look: outside a mount that is an error, as before.
    assert run([*who, sys.executable, "-m", "cowfs", "status", "-C", outside],
               check=False).returncode == 2


@pytest.mark.parametrize("backing", ["xfs", "xfs-rootless"], indirect=True)
def test_git_is_needed_only_to_export(workspace):
    ws = workspace
    nogit = ws.path.parent / "bin"      # a PATH with what cowfs needs to mount, and no git
    nogit.mkdir()
    nogit.chmod(0o755)
    for tool in ("fusermount3", "runuser"):
        (nogit / tool).symlink_to(shutil.which(tool))
    without = {"PATH": str(nogit)}
    (ws.path / "a").write_text("one\n")
    ws.mount(env=without)
    (ws.path / "a").write_text("two\n")
    assert ws.cli("checkpoint", env=without).stdout == "turn-1\n"
    assert "turn-1" in ws.cli("log", env=without).stdout
    refused = ws.cli("export-git", check=False, env=without)
    assert (refused.returncode, refused.stderr) == (
        2, "cowfs: error: git is not installed: the export to git needs it (install git)\n")
    # git installed since the mount: the store's repository waits for the next one.
    (nogit / "git").symlink_to(shutil.which("git"))
    later = ws.cli("export-git", check=False, env=without)
    assert later.returncode == 2 and "remount (cowfs umount, cowfs mount)" in later.stderr
    (nogit / "git").unlink()
    ws.umount(env=without)
    assert not (ws.backing / ".cowfs" / "git").exists()
    refused = ws.mount("--export-git-on-checkpoint", env=without, check=False)
    assert (refused.returncode, refused.stderr) == (2, "cowfs: error: --export-git-on-checkpoint "
                                                       "needs git, which is not installed (install git)\n")
    ws.mount()
    assert "exported 2 turn(s)" in ws.cli("export-git").stdout     # turn-0 and turn-1


@pytest.mark.parametrize("backing", ["xfs", "xfs-rootless"], indirect=True)
def test_status_and_prune_measure_the_store_alike(workspace):
    """A directory made in turn 1 and taken away by a rollback to turn 0: the store keeps its
    whole tree, and `status` counts it as `prune` does (not the directory's own blocks alone)."""
    ws = workspace
    ws.mount()
    (ws.path / "d").mkdir()
    (ws.path / "d" / "big").write_bytes(os.urandom(2 << 20))
    ws.cli("checkpoint")
    ws.cli("rollback", "0")

    def shown(text: str, before: str, after: str = "\n") -> str:
        return text.split(before, 1)[1].split(after, 1)[0]
    status = ws.cli("status").stdout
    dry_run = ws.cli("prune", "--keep", "1", "--dry-run").stdout
    assert shown(status, "store size:   ") == shown(dry_run, "of the store's ") == "2.0 MiB"
    (ws.path / "e").write_text("new\n")     # and measured again after a change
    (ws.path / "f").write_bytes(os.urandom(1 << 20))
    ws.cli("checkpoint")
    (ws.path / "f").unlink()
    assert shown(ws.cli("status").stdout, "store size:   ") == "3.0 MiB"


def test_the_readmes_synopsis_is_the_parsers():
    """Every command and option of the parser, and nothing else, in README's synopsis."""
    from cowfs.arguments import synopsis
    readme = (REPO / "README.md").read_text()
    assert f"```\n{synopsis()}\n```\n" in readme, \
        "README's synopsis differs from the parser's: regenerate it (see cowfs.arguments.synopsis)"
