"""The command line: bad input gets one line and exit code 2, failures exit 1, --help answers."""

import json
import os
import subprocess
import sys

import pytest

COWFS = [sys.executable, "-m", "cowfs"]


def cowfs(*args, cwd=None):
    return subprocess.run([*COWFS, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          stdin=subprocess.DEVNULL, timeout=120)


def one_line_error(result, code):
    assert result.returncode == code, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cowfs: error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.mark.parametrize("command", ["mount", "umount", "checkpoint", "rollback", "log", "status",
                                     "export-git", "prune"])
def test_every_command_answers_help(command):
    result = cowfs(command, "--help")
    assert result.returncode == 0 and "usage: cowfs " + command in result.stdout


def test_mount_refuses_what_it_cannot_mount(workspace, tmp_path):
    (tmp_path / "file").write_text("x")
    assert "is not a directory" in one_line_error(cowfs("mount", tmp_path / "file"), 2)
    assert "is not a directory" in one_line_error(cowfs("mount", tmp_path / "missing"), 2)
    workspace.mount()
    assert "already mounted" in one_line_error(cowfs("mount", workspace.path), 2)
    (workspace.path / "inner").mkdir()
    assert "inside the cowfs mount" in one_line_error(cowfs("mount", workspace.path / "inner"), 2)


def test_commands_outside_a_mount_and_bad_turns(workspace, tmp_path):
    assert "not inside a cowfs mount" in one_line_error(cowfs("status", "-C", tmp_path), 2)
    workspace.mount()
    assert "does not exist" in one_line_error(cowfs("rollback", "-C", workspace.path, "99"), 2)
    bad = cowfs("rollback", "-C", workspace.path, "seven")
    assert bad.returncode == 2 and "not a turn" in bad.stderr
    assert cowfs("rollback", "-C", workspace.path, "turn-0").returncode == 0


def test_status_and_log_report_the_mount(workspace):
    workspace.mount()
    (workspace.path / "f").write_text("x")
    assert workspace.cli("checkpoint", "-m", "first turn").stdout.strip() == "turn-1"
    status = workspace.cli("status").stdout
    assert str(workspace.path) in status and "turn-2" in status
    assert "capture mode: reflink" in status or "capture mode: copy" in status
    log = workspace.cli("log").stdout.splitlines()
    assert log[0].startswith("turn-0") and "first turn" in log[1] and "(open)" in log[2]


def test_status_counts_the_fuse_requests(workspace):
    workspace.mount()
    before = json.loads(workspace.cli("status", "--json").stdout)["requests"]
    for i in range(20):
        (workspace.path / f"f{i}").write_bytes(b"x")
        (workspace.path / f"f{i}").read_bytes()
    after = json.loads(workspace.cli("status", "--json").stdout)["requests"]
    assert after["create"] - before.get("create", 0) == 20
    assert after["open"] - before.get("open", 0) == 20     # the reads: the creates were closed
    assert "requests:" in workspace.cli("status").stdout


@pytest.mark.parametrize("damage", ["truncated", "emptied"])
def test_mount_of_a_damaged_or_emptied_catalogue_is_one_line(workspace, damage):
    """A truncated catalogue was a traceback in the daemon ("failed to start (timed out)"); an
    emptied one silently started a new history over the old pre-images."""
    ws, p = workspace, workspace.path
    (p / "f").write_text("a\n")
    ws.mount()
    (p / "f").write_text("b\n")
    ws.cli("checkpoint")
    ws.umount()
    db = ws.store / "catalogue.db"
    os.truncate(db, db.stat().st_size // 2 if damage == "truncated" else 0)
    refused = ws.mount(check=False)
    one_line_error(refused, 2)
    assert "catalogue" in refused.stderr and not ws.is_mounted()
    assert db.stat().st_size == (0 if damage == "emptied" else db.stat().st_size)   # not recreated
