"""The command line: bad input gets one line and exit code 2, failures exit 1, --help answers."""

import contextlib
import io
import json
import os
import subprocess
import sys

import hypothesis
import pytest
from hypothesis import strategies as st

from conftest import run

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


@pytest.mark.parametrize("command", ["mount", "umount", "checkpoint", "rollback", "log", "status", "mcp",
                                     "export-git", "prune", "diff", "restore", "run", "fsck"])
def test_every_command_answers_help(command):
    result = cowfs(command, "--help")
    assert result.returncode == 0 and "usage: cowfs " + command in result.stdout


def test_only_the_command_named_is_built_and_the_rest_still_listed():
    """A command line builds the parser of its command alone (the others cost a checkpoint
    ~5 ms); a word that names a command elsewhere on the line (-C's value, a message) does not
    count, and a line naming none lists every command."""
    from cowfs.arguments import parse_args
    from cowfs.cli import COMMANDS
    args = parse_args(["-C", "log", "checkpoint", "-m", "rollback"])
    assert (args.command, args.message, args.cwd) == ("checkpoint", "rollback", "log")
    args = parse_args(["-C", "x", "rollback", "3", "-C", "y"])
    assert (args.command, args.turn, args.cwd) == ("rollback", 3, "y")
    listed = cowfs("--help").stdout
    assert all(name in listed for name in COMMANDS)
    misspelt = one_line_error(cowfs("chekpoint"), 2)
    assert "invalid choice" in misspelt and "'export-git'" in misspelt


# Command lines plain_checkpoint must read as argparse does (each is a checkpoint).
PLAIN_CHECKPOINTS = [
    ["checkpoint"], ["checkpoint", "-m", "x"], ["-C", "a", "checkpoint"], ["checkpoint", "-C", "b"],
    ["-C", "a", "checkpoint", "-C", "b", "-m", "one", "--message", "two"],
    ["checkpoint", "--message=-starts with a dash"], ["checkpoint", "-m", ""],
    ["-C", "checkpoint", "checkpoint", "-m", "checkpoint"], ["checkpoint", "-m", "quo\"te \\ é\t"],
]
# ... and those it must leave to argparse.
NOT_PLAIN = [
    [], ["checkpoint", "--help"], ["checkpoint", "-h"], ["--version"], ["checkpoint", "-mx"],
    ["checkpoint", "--mess", "x"], ["checkpoint", "-m"], ["checkpoint", "-m", "-x"],
    ["checkpoint", "extra"], ["checkpoint", "checkpoint"], ["-C"], ["checkpoint", "--"],
    ["checkpoint", "-C=a"], ["log", "-m", "x"], ["-m", "x", "checkpoint"], ["status"],
]


def test_a_plain_checkpoint_line_is_read_as_argparse_reads_it():
    from cowfs.arguments import parse_args
    from cowfs.cli import plain_checkpoint
    for argv in PLAIN_CHECKPOINTS:
        args = parse_args(argv)
        assert args.command == "checkpoint"
        assert plain_checkpoint(argv) == (args.cwd, args.message), argv
    for argv in NOT_PLAIN:
        assert plain_checkpoint(argv) is None, argv


@hypothesis.settings(max_examples=400, deadline=None)
@hypothesis.given(st.lists(st.sampled_from(["checkpoint", "-C", "-m", "--message", "--message=v",
                                            "x", "y z", "", "-x", "--", "-h", "log", "-mq"]),
                           max_size=7))
def test_plain_checkpoint_never_reads_a_line_otherwise_than_argparse(argv):
    """Whatever plain_checkpoint takes, argparse takes too, with the same meaning."""
    from cowfs.arguments import parse_args
    from cowfs.cli import plain_checkpoint
    plain = plain_checkpoint(argv)
    if plain is None:
        return
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        args = parse_args(argv)     # SystemExit (a usage error or --help) fails the test
    assert (args.command, args.cwd, args.message) == ("checkpoint", *plain)


# Writes a line to a file it keeps open, at each line read. Another process: a process that
# starts a command closes its descriptors at the exec, and each close writes back dirty pages.
HOLDER = """
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
for line in sys.stdin:
    os.write(fd, line.encode())
    print("written", flush=True)
"""


def test_a_plain_checkpoint_imports_only_what_it_needs_and_keeps_what_the_kernel_holds(workspace):
    """`cowfs checkpoint -C WS -m MSG`, what a harness runs each turn, loads no argparse, json,
    re, socket.py or ctypes (~10 ms of a one-shot process), and no syncfs is made on its side:
    the daemon has the kernel write back, and waits for, what it holds of a file another
    process keeps open (a syncfs in the daemon lost that write in about 1 run of 3)."""
    ws = workspace
    ws.mount()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, ws.path / "held"], text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def write(line):
        holder.stdin.write(line + "\n")
        holder.stdin.flush()
        assert holder.stdout.readline() == "written\n"
    try:
        write("not yet written back")
        assert os.stat(ws.backing / "held").st_size == 0     # the kernel still holds it
        cp = run([*ws.cowfs_cmd, "checkpoint", "-C", ws.path, "-m", "a plain message"],
                 env={"PYTHONPROFILEIMPORTTIME": "1"})
        turn = cp.stdout.strip()
        assert turn.startswith("turn-")
        loaded = {line.split("|")[-1].strip() for line in cp.stderr.splitlines()
                  if line.startswith("import time:")}
        assert "cowfs.control" in loaded          # the import profile was taken
        assert loaded & {"argparse", "json", "re", "socket", "ctypes", "enum", "cowfs.arguments"} \
            == set()
        assert (ws.snapshots / turn / "held").read_bytes() == b"not yet written back\n"
        # A message JSON must escape takes json after all, and arrives whole.
        write("more")
        quoted = 'quo"te \\ \t é'
        turn = ws.cli("checkpoint", "-m", quoted).stdout.strip()
        assert (ws.snapshots / turn / "held").read_bytes() == b"not yet written back\nmore\n"
        messages = {f"turn-{t['number']}": t["message"] for t in json.loads(ws.cli("log", "--json").stdout)}
        assert messages[turn] == quoted
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


def test_mount_refuses_what_it_cannot_mount(workspace, tmp_path):
    (tmp_path / "file").write_text("x")
    assert "is not a directory" in one_line_error(cowfs("mount", tmp_path / "file"), 2)
    assert "is not a directory" in one_line_error(cowfs("mount", tmp_path / "missing"), 2)
    assert "not a duration: 'soon'" in one_line_error(cowfs("mount", tmp_path, "--idle-umount", "soon"), 2)
    workspace.mount()
    around = one_line_error(cowfs("mount", workspace.path.parent), 2)      # would hide it
    assert f"{workspace.path} is a cowfs mount inside {workspace.path.parent}" in around
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


def one_turn_then_unmounted(ws) -> None:
    """f is "a" in turn 0 and "b" in turn 1; the workspace is left unmounted."""
    (ws.path / "f").write_text("a\n")
    ws.mount()
    (ws.path / "f").write_text("b\n")
    ws.cli("checkpoint")
    ws.umount()


@pytest.mark.parametrize("damage", ["truncated", "emptied"])
def test_mount_of_a_damaged_or_emptied_catalogue_is_one_line(workspace, damage):
    """A truncated catalogue was a traceback in the daemon ("failed to start (timed out)"); an
    emptied one silently started a new history over the old pre-images."""
    ws, p = workspace, workspace.path
    one_turn_then_unmounted(ws)
    db = ws.store / "catalogue.db"
    os.truncate(db, db.stat().st_size // 2 if damage == "truncated" else 0)
    refused = ws.mount(check=False)
    one_line_error(refused, 2)
    assert "catalogue" in refused.stderr and not ws.is_mounted()
    assert db.stat().st_size == (0 if damage == "emptied" else db.stat().st_size)   # not recreated


def _catalogue_state(ws) -> bytes:
    return b"".join((ws.store / name).read_bytes() for name in sorted(os.listdir(ws.store))
                    if name.startswith("catalogue.db"))


def test_a_store_of_a_newer_format_is_refused_and_left_alone(workspace):
    import sqlite3
    from cowfs.catalogue import FORMAT_VERSION
    ws, p = workspace, workspace.path
    one_turn_then_unmounted(ws)
    newer = str(int(FORMAT_VERSION) + 1)
    db = sqlite3.connect(ws.store / "catalogue.db")
    with db:
        db.execute("UPDATE meta SET value=? WHERE key='format'", (newer,))
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    before = _catalogue_state(ws)
    for argv in (["mount", p], ["fsck", p], ["fsck", "--repair", p]):
        line = one_line_error(cowfs(*argv), 2)
        assert f"store format {newer}" in line and "newer cowfs" in line, line
        assert not ws.is_mounted()
    assert _catalogue_state(ws) == before
    assert (p / "f").read_text() == "b\n"


def test_a_format_2_store_is_upgraded_in_place(workspace):
    """A store of the format before link counts were recorded (and before the ignore and
    writer tables) mounts, keeps its history, and is of the current format afterwards; its old rows show
    the live link count, new rows the recorded one."""
    import sqlite3
    ws, p = workspace, workspace.path
    (p / "f").write_text("a\n")
    ws.mount()
    os.link(p / "f", p / "g")
    (p / "f").write_text("b\n")
    ws.cli("checkpoint")
    ws.umount()
    as_older_format(ws, "2", ("attrs", "nlink"),
                    ("processes", "entry_writers", "object_writers", "ignore_rules", "ignored"))
    ws.mount()
    assert (ws.snapshots / "turn-0" / "f").read_text() == "a\n"
    assert (ws.snapshots / "turn-1" / "g").read_text() == "b\n"
    os.unlink(p / "g")
    ws.cli("checkpoint")
    assert os.stat(ws.snapshots / "turn-1" / "f").st_nlink == 2     # recorded since the upgrade
    assert os.stat(ws.snapshots / "turn-2" / "f").st_nlink == 1
    ws.umount()
    db = sqlite3.connect(ws.store / "catalogue.db")
    from cowfs.catalogue import FORMAT_VERSION
    assert db.execute("SELECT value FROM meta WHERE key='format'").fetchone() == (FORMAT_VERSION,)
    assert "nlink" in {row[1] for row in db.execute("PRAGMA table_info(attrs)")}
    db.close()


def as_older_format(ws, version: str, column: tuple[str, str], tables: tuple[str, ...]) -> None:
    """Make the unmounted store of *ws* what format *version* wrote: without *column* (table,
    column) and *tables*."""
    import sqlite3
    db = sqlite3.connect(ws.store / "catalogue.db")
    with db:
        db.execute("UPDATE meta SET value=? WHERE key='format'", (version,))
        db.execute(f"ALTER TABLE {column[0]} DROP COLUMN {column[1]}")
        for table in tables:
            db.execute(f"DROP TABLE {table}")
    db.close()


def test_a_format_3_store_is_upgraded_in_place(workspace):
    """A store from before process start times and the agent's record: its writers keep their
    rows (start time unknown, 0) and the harness tables are made."""
    import sqlite3
    from cowfs.catalogue import FORMAT_VERSION
    ws, p = workspace, workspace.path
    ws.mount()
    run(["sh", "-c", "echo a > f"], cwd=p)
    ws.cli("checkpoint")
    ws.umount()
    as_older_format(ws, "3", ("processes", "started"), ("harness_sessions", "agent_writes"))
    ws.mount()
    [change] = json.loads(ws.cli("diff", "0", "1", "--json").stdout)
    assert change["path"] == "f" and change["process"]["comm"] == "sh" and change["process"]["started"] == 0
    ws.umount()
    db = sqlite3.connect(ws.store / "catalogue.db")
    assert db.execute("SELECT value FROM meta WHERE key='format'").fetchone() == (FORMAT_VERSION,)
    assert db.execute("SELECT count(*) FROM harness_sessions").fetchone() == (0,)
    db.close()


def test_debug_logs_each_request_without_its_data(workspace):
    """`mount --debug` logs every request; a write shows its size and a glimpse of its data
    (a 1 MiB write logged whole made the log grow by megabytes per write)."""
    ws, p = workspace, workspace.path
    ws.mount("--debug")
    (p / "f").write_bytes(b"\1" * (4 << 20))
    ws.umount()
    log = (ws.store / "daemon.log").read_text(errors="replace")
    writes = [line for line in log.splitlines() if "cowfs.fs: write(" in line]
    assert writes and all("bytes:" in line and len(line) < 400 for line in writes), writes[:2]
    assert "create(" in log and "release(" in log
    assert len(log) < 200_000


@pytest.mark.root_only
def test_mount_t_fuse_cowfs(workspace, tmp_path):
    """`mount -t fuse.cowfs WS WS -o noatime` (and fstab) runs mount.fuse3, which runs
    `cowfs WS WS -o rw,noatime,dev,suid`: a cowfs mount with that option; an option cowfs
    cannot honour is refused, as `cowfs mount -o` refuses it."""
    (workspace.path / "f").write_text("f\n")
    past = 10**18
    os.utime(workspace.path / "f", ns=(past, past))       # relatime would move atime at a read
    workspace.backing
    bindir = tmp_path / "bin"           # mount(8) would find whichever cowfs is installed
    bindir.mkdir()
    (bindir / "cowfs").write_text(f"#!/bin/sh\nexec {sys.executable} -m cowfs \"$@\"\n")
    (bindir / "cowfs").chmod(0o755)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}

    def helper(options):
        return subprocess.run(["mount.fuse3", workspace.path, workspace.path, "-t", "fuse.cowfs",
                               "-o", options], env=env, capture_output=True, text=True, timeout=120)
    refused = helper("rw,ro")
    assert refused.returncode == 2 and "-o ro: cowfs takes" in refused.stderr
    assert not workspace.is_mounted()
    assert helper("rw,noatime").returncode == 0
    options = next(line.split()[5] for line in open("/proc/self/mountinfo")
                   if line.split()[4] == str(workspace.path))
    assert "noatime" in options.split(",")
    (workspace.path / "f").read_text()
    assert os.stat(workspace.path / "f").st_atime_ns == past
    workspace.umount()


@pytest.mark.parametrize("backing", ["xfs"], indirect=True)
def test_output_into_a_pipe_closed_early_is_no_error(workspace):
    """`cowfs log -v | head -1`: the reader leaves early; cowfs stops quietly, as git does,
    instead of printing a BrokenPipeError."""
    workspace.mount()
    for i in range(5000):
        (workspace.path / f"file-with-a-long-enough-name-{i:05}").write_text("x")
    workspace.cli("checkpoint")
    argv = " ".join([*workspace.cowfs_cmd, "log", "-v", "-C", str(workspace.path)])
    cp = subprocess.run(["bash", "-c", f"set -o pipefail; {argv} | head -1"], capture_output=True,
                        text=True, timeout=120)
    assert cp.stdout.startswith("turn-0 ")
    assert cp.stderr == "", cp.stderr
    assert cp.returncode == 141     # SIGPIPE's, as the shell reports for any writer
