"""Working with turns every day: diff, restore, log -v (who changed what), run, -C before the command.

Every expectation here comes from what the test itself did to the tree (or
from a copy of it made before), never from reading the mount under test.
"""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from conftest import CommandError, run
from treeview import tree

COWFS = [sys.executable, "-m", "cowfs"]


def name_status(ws, *args) -> set[tuple]:
    out = ws.cli("diff", "--name-status", *args).stdout
    return {tuple(line.split("\t")) for line in out.splitlines()}


def changes(ws, *args) -> list[dict]:
    return json.loads(ws.cli("diff", "--json", *args).stdout)


def one_line_error(cp, code=2) -> str:
    assert cp.returncode == code, (cp.returncode, cp.stdout, cp.stderr)
    lines = cp.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cowfs: error: "), cp.stderr
    return lines[0]


def build(root):
    (root / "src").mkdir()
    (root / "src/app.py").write_text("def main():\n    return 1\n")
    (root / "src/util.py").write_text("X = 1\n")
    (root / "one").write_text("same\n")
    (root / "two").write_text("same\n")
    (root / "blob.bin").write_bytes(b"\0\1\2" * 100)
    (root / "script.sh").write_text("echo hi\n")
    os.symlink("src/app.py", root / "link")
    (root / "kind").write_text("a file for now\n")


def test_diff_reports_each_kind_of_change_exactly(workspace):
    build(workspace.path)
    workspace.mount()
    ws = workspace.path
    (ws / "src/app.py").write_text("def main():\n    return 2\n")          # M
    os.rename(ws / "one", ws / "moved")                                     # R (not a content guess:
    os.unlink(ws / "two")                                                   #  two had the same bytes)
    (ws / "new.txt").write_text("new\n")                                    # A
    os.unlink(ws / "src/util.py")                                           # D
    (ws / "blob.bin").write_bytes(b"\0\3" * 100)                            # M, binary
    os.chmod(ws / "script.sh", 0o755)                                       # M, mode only
    os.unlink(ws / "link")
    os.symlink("src/other.py", ws / "link")                                 # M, symlink target
    os.unlink(ws / "kind")
    os.mkdir(ws / "kind")                                                   # D kind, A kind/x
    (ws / "kind/x").write_text("x\n")
    expected = {("M", "src/app.py"), ("R", "one", "moved"), ("D", "two"), ("A", "new.txt"),
                ("D", "src/util.py"), ("M", "blob.bin"), ("M", "script.sh"), ("M", "link"),
                ("D", "kind"), ("A", "kind/x")}
    assert name_status(workspace) == expected
    patch = workspace.cli("diff").stdout
    assert "--- a/src/app.py\n+++ b/src/app.py\n" in patch
    assert "-    return 1\n+    return 2\n" in patch
    assert "Binary files a/blob.bin and b/blob.bin differ\n" in patch
    assert "old mode 100644\nnew mode 100755\n" in patch
    assert "rename from one\nrename to moved\n" in patch
    assert "deleted file mode 100644\n--- a/src/util.py\n+++ /dev/null\n" in patch
    assert "-src/app.py\n\\ No newline at end of file\n+src/other.py\n" in patch
    # The same, sealed: turn 0 -> turn 1, and turn 1 against the live tree holds nothing.
    workspace.cli("checkpoint", "-m", "t1")
    assert name_status(workspace, "0", "1") == expected
    assert name_status(workspace) == set()
    assert name_status(workspace, "0", "--", "src") == {("M", "src/app.py"), ("D", "src/util.py")}
    stat = workspace.cli("diff", "0", "1", "--stat").stdout
    assert stat.rstrip().endswith("10 files changed, 4 insertions(+), 5 deletions(-)"), stat


def test_a_patch_applies_to_the_old_turn_and_gives_the_new_one(workspace, tmp_path):
    (workspace.path / "a").mkdir()
    for i in range(8):
        (workspace.path / f"a/f{i}.txt").write_text("".join(f"line {j}\n" for j in range(40)))
    workspace.mount()
    before = tmp_path / "before"
    shutil.copytree(workspace.path, before, ignore=shutil.ignore_patterns(".snapshots"))
    ws = workspace.path
    subprocess.run(["sed", "-i", "s/line 7$/LINE SEVEN/", *[str(p) for p in (ws / "a").glob("f[0-3].txt")]],
                   check=True)
    os.rename(ws / "a/f5.txt", ws / "a/renamed.txt")
    with open(ws / "a/renamed.txt", "a") as f:
        f.write("appended\n")
    (ws / "a/f6.txt").unlink()
    (ws / "b.txt").write_text("brand new\nno newline at end")
    patch = workspace.cli("diff").stdout
    run(["git", "apply", "-"], input=patch, cwd=before)
    after = tmp_path / "after"
    shutil.copytree(ws, after, ignore=shutil.ignore_patterns(".snapshots"))
    assert run(["diff", "-r", before, after], check=False).returncode == 0


def test_log_verbose_names_the_process_of_each_change(workspace):
    build(workspace.path)
    workspace.mount()
    ws = workspace.path
    run(["rm", "-r", str(ws / "src")])
    run(["touch", str(ws / "touched")])
    run(["mv", str(ws / "one"), str(ws / "uno")])
    run(["sed", "-i", "s/same/other/", str(ws / "two")])
    by = {c["path"]: c for c in changes(workspace)}
    assert by["src/app.py"]["process"]["comm"] == "rm"
    assert "rm -r " in by["src/util.py"]["process"]["cmdline"]
    assert by["touched"]["process"]["comm"] == "touch"
    assert by["uno"]["kind"] == "R" and by["uno"]["process"]["comm"] == "mv"
    assert by["two"]["kind"] == "M" and by["two"]["process"]["comm"] == "sed"
    assert all(c["process"]["pid"] > 0 and c["process"]["uid"] == 0 for c in by.values())
    assert all(os.getpid() in c["process"]["ancestors"] for c in by.values())     # run() forked them
    workspace.cli("checkpoint", "-m", "mess")
    workspace.umount()
    workspace.mount()         # kept with the turn, across a remount
    log = json.loads(workspace.cli("log", "-v", "--json", "-n", "2").stdout)
    assert [t["number"] for t in log] == [1, 2]
    kept = {c["path"]: c["process"]["comm"] for c in log[0]["changes_list"]}
    assert kept == {"src/app.py": "rm", "src/util.py": "rm", "touched": "touch", "uno": "mv",
                    "two": "sed"}
    text = workspace.cli("log", "-v").stdout
    assert "D  src/app.py    (rm, pid " in text and "R  one -> uno    (mv, pid " in text


def test_restore_a_file_and_a_directory_exactly_and_undo_it(workspace):
    build(workspace.path)
    os.setxattr(workspace.path / "src/app.py", "user.note", b"v0")
    os.utime(workspace.path / "src/app.py", ns=(1_000_000_000, 1_500_000_000_123))
    workspace.mount()
    ws = workspace.path
    (ws / "src/app.py").write_text("broken\n")
    os.chmod(ws / "src/app.py", 0o600)
    os.setxattr(ws / "src/app.py", "user.note", b"v1")
    (ws / "src/util.py").unlink()
    (ws / "src/later.py").write_text("added later\n")
    (ws / "extra").write_text("did not exist at turn 0\n")
    workspace.cli("checkpoint", "-m", "broke it")
    (ws / "src/app.py").write_text("broken again\n")
    out = workspace.cli("restore", "0", "src", "extra").stdout.splitlines()
    assert out == ["src: restored (turn-0)", "extra: removed (did not exist then) (turn-0)"]
    st = os.stat(ws / "src/app.py")
    assert (ws / "src/app.py").read_text() == "def main():\n    return 1\n"
    assert st.st_size == len("def main():\n    return 1\n")
    assert oct(st.st_mode & 0o777) == oct(0o644) and st.st_mtime_ns == 1_500_000_000_123
    assert os.getxattr(ws / "src/app.py", "user.note") == b"v0"
    assert sorted(os.listdir(ws / "src")) == ["app.py", "util.py"]
    assert not (ws / "extra").exists()
    with open(ws / "src/app.py", "a") as f:      # the kernel's size is the restored one
        f.write("# appended\n")
    assert (ws / "src/app.py").read_text() == "def main():\n    return 1\n# appended\n"
    # A change of the open turn: diff shows it, and rolling back to turn 1 undoes it.
    assert name_status(workspace) == {("M", "src/app.py"), ("A", "src/util.py"), ("D", "src/later.py"),
                                      ("D", "extra")}
    workspace.cli("rollback", "1")
    assert (ws / "src/app.py").read_text() == "broken\n"
    assert (ws / "extra").read_text() == "did not exist at turn 0\n"
    assert sorted(os.listdir(ws / "src")) == ["app.py", "later.py"]


def test_restore_relative_paths_links_and_missing_parents(workspace):
    (workspace.path / "d/e").mkdir(parents=True)
    (workspace.path / "d/e/f").write_text("f0\n")
    os.link(workspace.path / "d/e/f", workspace.path / "d/g")
    workspace.mount()
    ws = workspace.path
    workspace.cli("checkpoint")
    shutil.rmtree(ws / "d")
    (ws / "n").mkdir()
    workspace.cli("checkpoint")
    # Relative to the working directory inside the mount; the missing parent d/ is made.
    cp = run([*workspace.cowfs_cmd, "restore", "0", "e", "g"], cwd=ws / "n", check=False)
    assert cp.returncode == 2 and "n/ did not exist at turn-0" in cp.stderr
    assert sorted(os.listdir(ws)) == ["n"]         # nothing was touched
    run([*workspace.cowfs_cmd, "restore", "turn-0", "../d/e", "../d/g"], cwd=ws / "n")
    assert (ws / "d/e/f").read_text() == "f0\n" and (ws / "d/g").read_text() == "f0\n"
    assert os.stat(ws / "d/g").st_ino == os.stat(ws / "d/e/f").st_ino    # hard links again
    assert os.stat(ws / "d/g").st_nlink == 2


def test_bad_input_gets_one_line_and_touches_nothing(workspace, tmp_path):
    (workspace.path / "f").write_text("f\n")
    workspace.mount()
    (workspace.path / "f").write_text("changed\n")
    assert "does not exist" in one_line_error(workspace.cli("restore", "7", "f", check=False))
    assert "does not exist" in one_line_error(workspace.cli("diff", "7", check=False))
    assert "at most two turns" in one_line_error(workspace.cli("diff", "0", "0", "0", check=False))
    assert "outside the workspace" in one_line_error(workspace.cli("restore", "0", str(tmp_path),
                                                                   check=False))
    assert "not in the live tree" in one_line_error(workspace.cli("restore", "0", ".snapshots/turn-0",
                                                                  check=False))
    assert "command not found" in one_line_error(workspace.cli("run", "--", "no-such-command-x",
                                                               check=False))
    assert (workspace.path / "f").read_text() == "changed\n"
    assert len(json.loads(workspace.cli("log", "--json").stdout)) == 2    # no turn was sealed


def test_run_seals_a_turn_per_command_with_its_exit_status(workspace):
    workspace.mount()
    cp = workspace.cli("run", "-m", "made r", "--", "sh", "-c", "echo r > r.txt; exit 3", check=False)
    assert cp.returncode == 3
    turns = json.loads(workspace.cli("log", "--json").stdout)
    assert turns[1]["message"] == "made r" and turns[1]["sealed"]
    assert (workspace.path / ".snapshots/turn-1/r.txt").read_text() == "r\n"
    cp = workspace.cli("run", "--", "touch", "t")
    assert json.loads(workspace.cli("log", "--json").stdout)[2]["message"] == "touch t"


def test_c_before_the_command_and_help_with_examples(workspace):
    workspace.mount()
    (workspace.path / "x").write_text("x\n")
    cp = run([*workspace.cowfs_cmd, "-C", workspace.path, "diff", "--name-status"])
    assert cp.stdout == "A\tx\n"
    for command in ("diff", "restore", "run", "log"):
        assert "example" in run([*COWFS, command, "--help"]).stdout


def test_auto_checkpoint_seals_after_quiet_seconds(workspace):
    assert "expected a number of seconds" in one_line_error(
        workspace.mount("--auto-checkpoint", "0", check=False))
    assert not workspace.is_mounted()
    workspace.mount("--auto-checkpoint", "1")
    data = os.urandom(1 << 20)
    with open(workspace.path / "big", "wb") as f:    # pages the kernel holds until syncfs
        f.write(data)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        turns = json.loads(workspace.cli("log", "--json").stdout)
        if len(turns) >= 3:
            break
        time.sleep(0.2)
    assert turns[1]["sealed"] and turns[1]["message"].startswith("auto-checkpoint after 1s")
    assert (workspace.path / ".snapshots/turn-1/big").read_bytes() == data
    time.sleep(3)       # quiet, with nothing pending: no empty turns
    assert len(json.loads(workspace.cli("log", "--json").stdout)) == 3


def test_idle_umount_ends_the_mount_and_keeps_the_history(workspace):
    p = workspace.path
    workspace.mount("--idle-umount", "1s")
    with open(p / "held", "w") as f:            # an open file: not idle
        f.write("written while held\n")
        time.sleep(3)
        assert workspace.is_mounted()
    deadline = time.monotonic() + 30
    while workspace.is_mounted() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not workspace.is_mounted()
    workspace.mount()                           # the history as it was, the pending change sealed
    turns = json.loads(workspace.cli("log", "--json").stdout)
    assert [(t["number"], t["changes"]) for t in turns if t["sealed"]] == [(0, 0), (1, 1)]
    assert (workspace.snapshots / "turn-1/held").read_text() == "written while held\n"


def test_restore_keeps_a_surviving_name_and_its_lost_hard_link_one_file(workspace):
    (workspace.path / "a").write_text("hi\n")
    os.link(workspace.path / "a", workspace.path / "b")
    workspace.mount()
    ws = workspace.path
    os.unlink(ws / "b")
    with open(ws / "a", "a") as f:
        f.write("x\n")
    workspace.cli("checkpoint")
    workspace.cli("restore", "0", "a", "b")
    assert os.stat(ws / "a").st_ino == os.stat(ws / "b").st_ino and os.stat(ws / "a").st_nlink == 2
    assert (ws / "b").read_text() == "hi\n"


def test_restore_of_the_workspace_root_makes_the_whole_tree_that_turn(workspace):
    """`cowfs restore N .` at the root: every path becomes turn N's, and a top-level name added
    since goes too (issue 20: no test restored the root; rollback does it another way)."""
    build(workspace.path)
    want = tree(workspace.path)
    workspace.mount()
    ws = workspace.path
    (ws / "added.txt").write_text("top-level, after turn 0\n")
    (ws / "added").mkdir()
    (ws / "added/deep").write_text("below a new directory\n")
    (ws / "src/app.py").write_text("changed\n")
    os.unlink(ws / "one")
    os.chmod(ws / "script.sh", 0o700)
    workspace.cli("checkpoint", "-m", "after")
    (ws / "open-turn.txt").write_text("added in the open turn\n")
    out = run([*workspace.cowfs_cmd, "restore", "0", "."], cwd=ws).stdout
    assert out.splitlines() == [".: restored (turn-0)"]
    assert tree(ws) == want
    assert name_status(workspace, "0") == set()     # the live tree is turn 0 again
    workspace.cli("rollback", "1")                  # and the restore undoes
    assert (ws / "added.txt").read_text() == "top-level, after turn 0\n"
    assert not (ws / "open-turn.txt").exists() and not (ws / "one").exists()


def test_a_file_made_in_one_turn_and_edited_in_the_next_keeps_its_first_content(workspace):
    """A file born in turn 1 needs no pre-image there; edited in turn 2 it needs one (the set of
    objects born in the open turn starts empty at every seal): turn 1's snapshot shows the first
    content, turn 2's the second (issue 20)."""
    workspace.mount()
    ws = workspace.path
    (ws / "f").write_text("first\n")
    workspace.cli("checkpoint")                     # turn-1
    with open(ws / "f", "r+") as f:
        f.write("SECOND\n")                         # in place, same size
    workspace.cli("checkpoint")                     # turn-2
    (ws / "f").write_text("third, longer\n")        # and again, in the open turn
    assert (ws / ".snapshots/turn-1/f").read_text() == "first\n"
    assert (ws / ".snapshots/turn-2/f").read_text() == "SECOND\n"
    assert not (ws / ".snapshots/turn-0/f").exists()
