"""Ignore rules (`.cowfsignore`): what they spare from capture, and what every command does with it.

Each test works through a real mount and checks the catalogue and the store
itself after unmounting: an ignored path must leave no pre-image behind, and
every snapshot must stay exactly what it was when it was sealed.
"""

import os
import sqlite3
import subprocess

import pytest

from conftest import run
from test_everyday import name_status, one_line_error
from test_recovery import kill_daemon


def rows_of(ws, turn: int) -> tuple[list, list]:
    """(entries rows, attrs rows) of *turn*, read from the store of an unmounted workspace."""
    db = sqlite3.connect(ws.store / "catalogue.db")
    try:
        entries = db.execute("SELECT parent, name FROM entries WHERE turn=?", (turn,)).fetchall()
        attrs = db.execute("SELECT ino, path FROM attrs WHERE turn=?", (turn,)).fetchall()
    finally:
        db.close()
    return entries, attrs


def store_names(ws) -> set[str]:
    return {f"{d}/{n}" for d in ("objects", "content") for n in os.listdir(ws.store / d)}


def mounted_with(workspace, rules: str):
    """Mount a workspace holding .cowfsignore (*rules*) and src/app.py ("v0"); its root."""
    root = workspace.path
    (root / ".cowfsignore").write_text(rules)
    (root / "src").mkdir()
    (root / "src/app.py").write_text("v0\n")
    workspace.mount()
    return root


def test_ignored_paths_leave_no_rows_no_store_growth_and_no_snapshot(workspace):
    root = mounted_with(workspace, "# build output\nnode_modules/\n*.log\n")
    (root / "node_modules/pkg").mkdir(parents=True)
    (root / "node_modules/pkg/index.js").write_text("one\n")
    (root / "node_modules/pkg/old.js").write_text("old\n")
    (root / "src/debug.log").write_text("log 1\n")
    (root / "src/app.py").write_text("v1\n")
    workspace.cli("checkpoint", "-m", "install")                       # turn 1
    status = workspace.cli("status").stdout
    assert "ignore rules: node_modules/; *.log" in status, status
    workspace.umount()
    before = store_names(workspace)
    workspace.mount()
    with open(root / "node_modules/pkg/index.js", "a") as f:           # in place
        f.write("two\n")
    (root / "node_modules/pkg/index.js").chmod(0o600)
    (root / "node_modules/big.bin").write_bytes(os.urandom(1 << 20))
    os.unlink(root / "node_modules/pkg/old.js")
    os.rename(root / "node_modules/pkg", root / "node_modules/pkg2")
    (root / "src/debug.log").write_text("log 2, truncated\n")           # O_TRUNC
    os.unlink(root / "src/debug.log")
    (root / "src/app.py").write_text("v2\n")
    workspace.cli("checkpoint", "-m", "rebuild")                       # turn 2
    for turn in (0, 1, 2):
        snap = root / f".snapshots/turn-{turn}"
        assert sorted(os.listdir(snap)) == [".cowfsignore", "src"], turn
        assert os.listdir(snap / "src") == ["app.py"], turn
        assert not os.path.exists(snap / "node_modules/pkg2/index.js")
    assert (root / ".snapshots/turn-1/src/app.py").read_text() == "v1\n"
    assert (root / "node_modules/pkg2/index.js").read_text() == "one\ntwo\n"
    workspace.umount()
    entries, attrs = rows_of(workspace, 2)
    # src/ itself is kept: removing src/debug.log changed its mtime, which its snapshots show.
    assert entries == [] and sorted(path for _, path in attrs) == [b"src", b"src/app.py"], (entries, attrs)
    # Turn 1: one entry row for each top-level ignored thing made (older snapshots need to know
    # it was not there), none for what lies inside.
    entries, _ = rows_of(workspace, 1)
    assert sorted(name for _, name in entries) == [b"debug.log", b"node_modules"], entries
    grown = store_names(workspace) - before
    assert [n.split("-")[0] for n in grown] == ["content/2"], grown      # src/app.py's pre-image


def test_rollback_and_restore_leave_ignored_paths_alone(workspace):
    root = mounted_with(workspace, "node_modules/\n*.log\n")
    (root / "node_modules").mkdir()
    (root / "node_modules/a.js").write_text("a1\n")
    (root / "src/run.log").write_text("r1\n")
    (root / "src/app.py").write_text("v1\n")
    workspace.cli("checkpoint")                                        # turn 1
    (root / "node_modules/a.js").write_text("a2\n")
    (root / "src/run.log").write_text("r2\n")
    (root / "src/app.py").write_text("v2\n")
    workspace.cli("checkpoint")                                        # turn 2
    nm_ino = os.stat(root / "node_modules").st_ino
    workspace.cli("rollback", "0")
    assert (root / "src/app.py").read_text() == "v0\n"
    assert (root / "node_modules/a.js").read_text() == "a2\n"
    assert os.stat(root / "node_modules").st_ino == nm_ino
    assert (root / "src/run.log").read_text() == "r2\n"
    workspace.cli("rollback", "2")
    assert (root / "src/app.py").read_text() == "v2\n"
    assert (root / "node_modules/a.js").read_text() == "a2\n"
    # restore of a directory keeps its ignored names; an ignored path cannot be restored.
    workspace.cli("restore", "0", "src")
    assert sorted(os.listdir(root / "src")) == ["app.py", "run.log"]
    assert (root / "src/app.py").read_text() == "v0\n"
    line = one_line_error(workspace.cli("restore", "1", "node_modules/a.js", check=False))
    assert "node_modules/a.js is ignored" in line, line
    assert (root / "node_modules/a.js").read_text() == "a2\n"
    # A rollback that would remove a directory holding an ignored thing refuses, changing nothing.
    (root / "tool").mkdir()
    (root / "tool/node_modules").mkdir()
    (root / "tool/node_modules/b.js").write_text("b\n")
    workspace.cli("checkpoint")
    turns = workspace.cli("log").stdout
    cp = workspace.cli("rollback", "2", check=False)
    line = one_line_error(cp, code=1)
    assert "tool/node_modules" in line and "ignored" in line, line
    assert workspace.cli("log").stdout == turns
    assert (root / "tool/node_modules/b.js").read_text() == "b\n"
    line = one_line_error(workspace.cli("restore", "2", "tool", check=False), code=1)
    assert "tool/node_modules" in line, line
    assert (root / "tool/node_modules/b.js").read_text() == "b\n"


@pytest.mark.root_only     # the target repository is made by root (test_rootless exports as the user)
def test_diff_and_export_git_never_show_ignored_paths(workspace, tmp_path):
    root = workspace.path
    (root / ".cowfsignore").write_text("build/\n")
    workspace.mount()
    (root / "build").mkdir()
    (root / "build/out.o").write_bytes(b"\x7fELF1")
    (root / "main.c").write_text("int main;\n")
    assert name_status(workspace) == {("A", "main.c")}
    workspace.cli("checkpoint")
    (root / "build/out.o").write_bytes(b"\x7fELF2")
    (root / "build/more.o").write_bytes(b"\x7fELF3")
    (root / "main.c").write_text("int main(void);\n")
    assert name_status(workspace) == {("M", "main.c")}
    workspace.cli("checkpoint")
    assert name_status(workspace, "0", "2") == {("A", "main.c")}
    repo = tmp_path / "review.git"
    run(["git", "init", "--quiet", "--bare", repo])
    workspace.cli("export-git", "--to", str(repo))
    for turn in (1, 2):
        tree = subprocess.run(["git", "--git-dir", repo, "ls-tree", "-r", "--name-only", f"cowfs~{2 - turn}"],
                              capture_output=True, text=True, check=True).stdout.split()
        assert tree == [".cowfsignore", "main.c"], (turn, tree)


def test_rules_apply_from_the_next_turn_and_old_turns_keep_what_they_recorded(workspace):
    root = workspace.path
    (root / "build").mkdir()
    (root / "build/out.o").write_text("o0\n")
    workspace.mount()
    (root / "build/out.o").write_text("o1\n")
    workspace.cli("checkpoint")                                        # turn 1: no rules
    (root / ".cowfsignore").write_text("build/\n")
    (root / "build/out.o").write_text("o2\n")                          # turn 2 still has no rules
    workspace.cli("checkpoint")                                        # turn 2; turn 3 ignores build/
    assert (root / ".snapshots/turn-1/build/out.o").read_text() == "o1\n"
    assert not os.path.exists(root / ".snapshots/turn-2/build")        # hidden: turn 3 ignores it
    assert not os.path.exists(root / ".snapshots/turn-1/.cowfsignore")  # a normal, captured file
    # build/ existed before the rule and turn 1 shows it: its changes are still kept, for turn 1.
    (root / "build/out.o").write_text("o3\n")
    workspace.cli("checkpoint")                                        # turn 3
    assert (root / ".snapshots/turn-1/build/out.o").read_text() == "o1\n"
    # Made anew under the rule, it is ignored from then on.
    run(["rm", "-rf", str(root / "build")])
    (root / "build").mkdir()
    (root / "build/new.o").write_text("n1\n")
    workspace.cli("checkpoint")                                        # turn 4
    (root / "build/new.o").write_text("n2\n")
    (root / "build/later.o").write_text("l\n")
    workspace.cli("checkpoint")                                        # turn 5
    # The rule goes away: turn 6 captures build/ again, so turn 5's snapshot shows it, exactly.
    (root / ".cowfsignore").write_text("")
    workspace.cli("checkpoint")                                        # turn 6; turn 7 has no rules
    assert sorted(os.listdir(root / ".snapshots/turn-6/build")) == ["later.o", "new.o"]
    assert not os.path.exists(root / ".snapshots/turn-5/build")
    (root / "build/new.o").write_text("n3\n")
    workspace.cli("checkpoint")                                        # turn 7
    assert (root / ".snapshots/turn-6/build/new.o").read_text() == "n2\n"
    assert (root / ".snapshots/turn-1/build/out.o").read_text() == "o1\n"
    assert (root / ".snapshots/turn-2/.cowfsignore").read_text() == "build/\n"
    assert "ignore rules: none" in workspace.cli("status").stdout
    workspace.umount()
    assert rows_of(workspace, 5) == ([], [])
    assert rows_of(workspace, 3) != ([], [])
    assert [path for _, path in rows_of(workspace, 7)[1]] == [b"build/new.o"]


def test_an_invalid_pattern_is_refused_at_mount_and_at_checkpoint(workspace):
    root = workspace.path
    (root / ".cowfsignore").write_text("ok/\n[z-a]\n")
    line = one_line_error(workspace.mount(check=False))
    assert ".cowfsignore line 2" in line and "[z-a]" in line, line
    assert not workspace.is_mounted()
    (root / ".cowfsignore").write_text("node_modules/\n")
    workspace.mount()
    (root / ".cowfsignore").write_text("node_modules/\n!\n")
    turns = workspace.cli("log").stdout
    line = one_line_error(workspace.cli("checkpoint", check=False))
    assert ".cowfsignore line 2: '!'" in line and "not sealed" in line, line
    assert workspace.cli("log").stdout == turns
    assert "ignore rules: node_modules/ " in workspace.cli("status").stdout
    (root / ".cowfsignore").write_text("dist/\n")
    workspace.cli("checkpoint")
    assert "ignore rules: dist/ " in workspace.cli("status").stdout


def test_renames_between_ignored_and_kept_names(workspace):
    root = workspace.path
    (root / ".cowfsignore").write_text("*.tmp\nnode_modules/\n")
    (root / "b.txt").write_text("b0\n")
    (root / "src/lib").mkdir(parents=True)
    (root / "src/lib/x.py").write_text("x0\n")
    (root / "node_modules").mkdir()
    workspace.mount()
    (root / "a.tmp").write_text("a1\n")
    workspace.cli("checkpoint")                                        # turn 1
    with open(root / "a.tmp", "a") as f:
        f.write("a2\n")
    os.rename(root / "a.tmp", root / "a.txt")                          # ignored -> kept
    with open(root / "a.txt", "a") as f:
        f.write("a3\n")
    os.rename(root / "b.txt", root / "b.tmp")                          # kept -> ignored
    os.rename(root / "src/lib", root / "node_modules/lib")             # a kept directory moves in
    workspace.cli("checkpoint")                                        # turn 2
    (root / "a.txt").write_text("a4\n")
    (root / "b.tmp").write_text("b3\n")
    (root / "node_modules/lib/x.py").write_text("x3\n")
    (root / "node_modules/lib/y.py").write_text("y3\n")
    workspace.cli("checkpoint")                                        # turn 3
    s1, s2 = root / ".snapshots/turn-1", root / ".snapshots/turn-2"
    assert not os.path.exists(s1 / "a.tmp") and not os.path.exists(s1 / "a.txt")
    assert (s2 / "a.txt").read_text() == "a1\na2\na3\n"
    assert (s1 / "b.txt").read_text() == "b0\n"
    assert (root / ".snapshots/turn-0/b.txt").read_text() == "b0\n"
    assert os.listdir(s1 / "src/lib") == ["x.py"]
    assert (s1 / "src/lib/x.py").read_text() == "x0\n"
    assert not os.path.exists(s2 / "b.tmp") and not os.path.exists(s2 / "node_modules")
    workspace.cli("rollback", "1")
    assert (root / "b.txt").read_text() == "b0\n" and (root / "src/lib/x.py").read_text() == "x0\n"
    assert not os.path.exists(root / "a.txt")


def test_a_tree_there_at_the_first_mount_with_its_rules_is_ignored_from_the_start(workspace):
    root = workspace.path
    (root / ".cowfsignore").write_text(".venv/\n")
    (root / ".venv/lib").mkdir(parents=True)
    (root / ".venv/lib/site.py").write_text("s0\n")
    (root / "main.py").write_text("m0\n")
    workspace.mount()
    assert sorted(os.listdir(root / ".snapshots/turn-0")) == [".cowfsignore", "main.py"]
    (root / ".venv/lib/site.py").write_text("s1\n")
    (root / ".venv/lib/new.py").write_text("n1\n")
    run(["rm", "-rf", str(root / ".venv/lib")])
    (root / "main.py").write_text("m1\n")
    workspace.cli("checkpoint")
    assert (root / ".snapshots/turn-0/main.py").read_text() == "m0\n"
    workspace.umount()
    entries, attrs = rows_of(workspace, 1)
    assert entries == [] and [path for _, path in attrs] == [b"main.py"], (entries, attrs)


def test_ignored_changes_through_a_daemon_that_died_are_not_drift(workspace):
    root = mounted_with(workspace, "node_modules/\n*.log\n")
    (root / "node_modules").mkdir()
    (root / "node_modules/a.js").write_text("a1\n")
    (root / "src/old.log").write_text("o\n")
    workspace.cli("checkpoint")
    (root / "node_modules/a.js").write_text("a2\n")                  # no row: ignored
    (root / "node_modules/b.js").write_text("b\n")
    os.unlink(root / "src/old.log")
    (root / "src/app.py").write_text("v1\n")
    kill_daemon(workspace)
    workspace.umount()
    assert "recovered" in workspace.mount().stderr                    # no --force needed
    assert (root / "node_modules/a.js").read_text() == "a2\n"
    workspace.cli("checkpoint")
    assert not os.path.exists(root / ".snapshots/turn-2/node_modules")
    assert (root / ".snapshots/turn-1/src/app.py").read_text() == "v0\n"
    (root / "node_modules/a.js").write_text("a3\n")
    workspace.umount()
    workspace.mount()                                                 # a clean remount, no drift
    (root / "node_modules/c.js").write_text("c\n")
    workspace.cli("checkpoint")
    workspace.umount()
    assert rows_of(workspace, 3) == ([], [])
