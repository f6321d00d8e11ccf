"""The live view against the backing filesystem itself: the same scripted syscall sequences
(tests/posix_script.py) in a plain directory and through the mount, comparing what every call
returned (or its errno) and the resulting tree (issue 12's POSIX parity).

Where cowfs cannot do what the backing filesystem does, the difference is listed in KNOWN with
the reason, and the test checks that it is exactly that difference: a new one fails.
"""

import grp
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import OTHER_USER, TEST_USER, as_user

SCRIPT = Path(__file__).with_name("posix_script.py")

# (script, step) -> (native outcome, cowfs outcome, why)
KNOWN = {
    ("links_and_special", "tmpfile opened"): (
        {"ok": "succeeded"}, {"errno": "ENOTSUP"},
        "O_TMPFILE: pyfuse3 has no tmpfile operation, so the kernel refuses it (README)"),
}


def run_script(where: Path, script: str, user: str | None = None) -> tuple[list, dict]:
    argv = [*(as_user(user) if user else []), sys.executable, str(SCRIPT), str(where), script]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, (where, out.stderr)
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    return lines[:-1], lines[-1]["manifest"]


def compare(script: str, native: tuple, mounted: tuple) -> None:
    steps_n, tree_n = native
    steps_m, tree_m = mounted
    assert [s["step"] for s in steps_n] == [s["step"] for s in steps_m]
    for a, b in zip(steps_n, steps_m):
        key = (script, a["step"])
        if key in KNOWN:
            want_native, want_cowfs, _why = KNOWN[key]
            assert (a, b) == ({"step": a["step"], **want_native}, {"step": b["step"], **want_cowfs}), key
        else:
            assert a == b, key
    assert tree_n == tree_m


def _native(workspace, script: str) -> Path:
    native = workspace.path.parent / f"native-{script}"
    native.mkdir()
    return native


@pytest.mark.parametrize("script", ["files", "renames", "times_and_attrs", "links_and_special",
                                    "locks"])
def test_syscalls_behave_as_on_the_backing_filesystem(workspace, script):
    native = _native(workspace, script)
    workspace.mount()
    work = workspace.path / "work"
    work.mkdir()
    if workspace.user:      # rootless: the mount's owner runs the script in both places
        os.chown(native, *_ids(workspace.user))
    compare(script, run_script(native, script, workspace.user),
            run_script(work, script, workspace.user))


def _ids(user: str) -> tuple[int, int]:
    import pwd
    pw = pwd.getpwnam(user)
    return pw.pw_uid, pw.pw_gid


def _prepare_shared(root: Path) -> None:
    """A sticky world-writable directory with another user's files, a setgid directory, and
    the script user's own directory."""
    other_uid, other_gid = _ids(OTHER_USER)
    user_uid, user_gid = _ids(TEST_USER)
    sticky = root / "sticky"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    for name, mode in (("theirs", 0o644), ("private", 0o600), ("writable", 0o666)):
        (sticky / name).write_text(name)
        os.chown(sticky / name, other_uid, other_gid)
        os.chmod(sticky / name, mode)
    sgid = root / "sgid"
    sgid.mkdir()
    os.chown(sgid, other_uid, other_gid)
    os.chmod(sgid, 0o2777)
    os.chown(root, user_uid, user_gid)


@pytest.mark.root_only
def test_permission_checks_for_another_user_behave_as_on_the_backing_filesystem(workspace, test_users):
    native = _native(workspace, "permissions")
    workspace.mount()
    work = workspace.path / "work"
    work.mkdir()
    for root in (native, work):
        _prepare_shared(root)
    compare("permissions", run_script(native, "permissions", TEST_USER),
            run_script(work, "permissions", TEST_USER))


# Creates, with umask 022, a file (mode 0666), directories (0777, 0750) and set-id files (4755,
# 2755, 2777) in each directory named on the command line, and prints what each became: mode, owner,
# group, and the ACL it inherited.
_CREATE = r"""
import json, os, subprocess, sys
os.umask(0o22)
who = sys.argv[1]
out = {}
for d in sys.argv[2:]:
    for kind, make in (("f", lambda p: os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o666))),
                       ("d", lambda p: os.mkdir(p, 0o777)),
                       ("p", lambda p: os.mkdir(p, 0o750)),
                       ("u", lambda p: os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o4755))),
                       ("g", lambda p: os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o2755))),
                       ("G", lambda p: os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o2777)))):
        path = os.path.join(d, f"{kind}-{who}")
        make(path)
        st = os.stat(path)
        acl = subprocess.run(["getfacl", "-cp", path], capture_output=True, text=True).stdout
        out[f"{os.path.basename(d)}/{kind}"] = [oct(st.st_mode), st.st_uid, st.st_gid, acl]
print(json.dumps(out))
"""

# Directories to create in: setgid of group 0 and of another group, each without and with a
# default ACL (one granting the group rwx, one taking the owner's write away), and a plain one
# with a default ACL.
_SETGID_DIRS = {"sg-root": (0, True, None), "sg-other": (None, True, None),
                "sg-root-acl": (0, True, "u::rwx,g::rwx,o::r-x"),
                "sg-other-acl": (None, True, "u::r-x,g::rwx,o::---"),
                "acl": (0, False, "u::r--,g::rwx,o::r-x")}


def _prepare_setgid_dirs(top: Path) -> list[str]:
    other_gid = grp.getgrnam(OTHER_USER).gr_gid
    for name, (gid, setgid, acl) in _SETGID_DIRS.items():
        d = top / name
        d.mkdir()
        os.chown(d, 0, other_gid if gid is None else gid)
        os.chmod(d, 0o2777 if setgid else 0o777)
        if acl:
            subprocess.run(["setfacl", "-d", "-m", acl, d], check=True)
    return [str(top / name) for name in _SETGID_DIRS]


def _created_by(user: str | None, dirs: list[str]) -> dict:
    argv = [*(as_user(user) if user else []), sys.executable, "-c", _CREATE, user or "root", *dirs]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_creation_in_setgid_directories_and_under_default_acls(workspace, test_users):
    """Issue 20: in a setgid directory of group 0 a new object belongs to group 0 (the daemon
    took group 0 for "no inheritance" and gave the creator's group); with a default ACL the
    ACL, not the umask, decides the mode. Root and a user as creators (a rootless mount serves
    its owner alone: objects anyone creates there are the owner's, as on any user mount).
    The directories are made in the backing directory: a rootless mount cannot give them away."""
    native = _native(workspace, "setgid")
    workspace.mount()
    work = workspace.path / "work"
    work.mkdir()
    os.chmod(work, 0o755)
    creators = [TEST_USER] if workspace.user else [None, TEST_USER]
    dirs_n = _prepare_setgid_dirs(native)
    dirs_m = _prepare_setgid_dirs(workspace.backing / "work")
    dirs_m = [str(work / os.path.basename(d)) for d in dirs_m]
    made_m = {f"{user}: {k}": v for user in creators for k, v in _created_by(user, dirs_m).items()}
    made_n = {f"{user}: {k}": v for user in creators for k, v in _created_by(user, dirs_n).items()}
    differences = [f"{k}: {v[:3]} natively {made_n[k][:3]}" for k, v in made_m.items() if v != made_n[k]]
    assert differences == [], made_n


def _owned_outside_their_group(top: Path, user: str) -> None:
    """A file and a directory (mode 2775) owned by *user*, of a group *user* is not in; and
    a file of *user*'s own group."""
    uid, gid = _ids(user)
    other_gid = grp.getgrnam(OTHER_USER).gr_gid
    for name in ("f", "d", "own"):
        (top / name).mkdir() if name == "d" else (top / name).write_bytes(b"x")
        os.chown(top / name, uid, gid if name == "own" else other_gid)
        os.chmod(top / name, 0o2775)


def _setfacl_as(user: str, top: Path) -> dict:
    """*user* sets an access ACL on each file of *top*: their modes and ACLs after."""
    return {name: subprocess.run([*as_user(user), "sh", "-c", f"setfacl -m u:{OTHER_USER}:r-x {name} "
                                  f"&& stat -c %A {name} && getfacl -cp {name}"],
                                 cwd=top, capture_output=True, text=True, check=True).stdout
            for name in ("f", "d", "own")}


def test_setfacl_by_a_caller_outside_the_group_clears_setgid(workspace, test_users):
    """Issue 20: setting an ACL, like chmod, clears S_ISGID when the caller is neither in the
    file's group nor privileged. Through a root mount the daemon writes the ACL as root, so
    the kernel's rule did not fire. The files are made in the backing directory: a rootless
    mount cannot give a file a group its owner is not in."""
    native = _native(workspace, "setfacl")
    workspace.mount()
    work = workspace.path / "work"
    work.mkdir()
    os.chmod(work, 0o755)
    _owned_outside_their_group(native, TEST_USER)
    _owned_outside_their_group(workspace.backing / "work", TEST_USER)
    expected = _setfacl_as(TEST_USER, native)
    assert expected["f"].startswith("-rwxrwxr-x") and expected["d"].startswith("drwxrwxr-x")
    assert expected["own"].startswith("-rwxrwsr-x")
    assert _setfacl_as(TEST_USER, work) == expected


def test_default_acl_where_the_callers_mode_cannot_be_read(workspace):
    """The documented limit (README, POSIX ACLs): the mode a creation asked for is read from the
    caller's /proc/TID/syscall, which a rootless daemon may not read for another user's
    process (here root's, through --allow-other): the kernel's umask then stays applied, less
    access than natively. Root's daemon reads it: as natively."""
    native = _native(workspace, "acl-unreadable")
    workspace.mount()
    work = workspace.path / "work"
    work.mkdir()
    os.chmod(work, 0o777)
    for top in (native, workspace.backing / "work"):
        (top / "acl").mkdir()
        os.chmod(top / "acl", 0o777)
        subprocess.run(["setfacl", "-d", "-m", "u::rwx,g::rwx,o::r-x", top / "acl"], check=True)
    old = os.umask(0o22)
    try:
        for top in (native, work):
            os.mkdir(top / "acl/d", 0o777)
    finally:
        os.umask(old)
    modes = [stat.S_IMODE(os.stat(top / "acl/d").st_mode) for top in (native, work)]
    assert modes == [0o775, 0o755 if workspace.user else 0o775]
