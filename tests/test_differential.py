"""The live view against the backing filesystem itself: the same scripted syscall sequences
(tests/posix_script.py) in a plain directory and through the mount, comparing what every call
returned (or its errno) and the resulting tree (issue 12's POSIX parity).

Where cowfs cannot do what the backing filesystem does, the difference is listed in KNOWN with
the reason, and the test checks that it is exactly that difference: a new one fails.
"""

import grp
import json
import os
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
