"""cowfs.compat.CheckpointManager, the shadow-git manager's interface, through real mounts.

Every expectation comes from what the test itself did to the tree (or from a
copy of the tree taken before), never from reading the mount under test.
The "user" is a process that does not descend from the test process (a
double fork whose middle process exits first, as examples/agent_loop.py
makes); the "agent" is the test process and the commands it runs.
"""

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

import cowfs
from cowfs.compat import CheckpointManager, available, prune, store_status
from conftest import REPO, TEST_USER, Workspace, as_user, chown_tree, is_fuse_mounted, run
from treeview import tree

XFS_ONLY = pytest.mark.parametrize("backing", ["xfs"], indirect=True)
ENTRY_KEYS = {"hash", "short_hash", "timestamp", "reason", "files_changed", "insertions", "deletions",
              "ignored"}


def _example():
    spec = importlib.util.spec_from_file_location("agent_loop", REPO / "examples/agent_loop.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


as_unrelated_process = _example().as_unrelated_process


def user_writes(path: Path, text: str, mode: str = "w") -> None:
    def write():
        with open(path, mode) as f:
            f.write(text)
    as_unrelated_process(write)


def turns(path) -> list[int]:
    return [t.number for t in cowfs.Workspace(path).turns()]


def start(workspace, files: dict[str, str], reason="start") -> CheckpointManager:
    """Files in the unmounted directory, then the manager's first checkpoint (which mounts)."""
    for name, text in files.items():
        (workspace.path / name).parent.mkdir(parents=True, exist_ok=True)
        (workspace.path / name).write_text(text)
    mgr = CheckpointManager()
    mgr.new_turn()
    assert mgr.ensure_checkpoint(str(workspace.path), reason) is True
    assert workspace.is_mounted()
    return mgr


def checkpoint(mgr, path, reason) -> dict:
    mgr.new_turn()
    assert mgr.ensure_checkpoint(str(path), reason) is True
    newest = mgr.list_checkpoints(str(path))[0]
    assert newest["reason"] == reason
    return newest


def test_ensure_checkpoint_mounts_once_per_turn_and_only_when_something_changed(workspace, caplog):
    p = workspace.path
    with caplog.at_level(logging.INFO, logger="cowfs.compat"):
        mgr = start(workspace, {"a.txt": "one\ntwo\n"}, "before turn 1")
    assert any(r.getMessage().startswith(f"cowfs: mounted {p} ") for r in caplog.records)
    [first] = mgr.list_checkpoints(str(p))
    assert set(first) == ENTRY_KEYS and first["reason"] == "before turn 1"
    assert (first["files_changed"], first["insertions"], first["deletions"]) == (0, 0, 0)
    assert re.fullmatch(r"[0-9a-f]{40}", first["hash"]) and first["hash"].startswith(first["short_hash"])
    assert 4 <= len(first["short_hash"]) < 40
    assert datetime.fromisoformat(first["timestamp"]).tzinfo is not None
    (p / "a.txt").write_text("one\nTWO\nthree\n")
    assert mgr.ensure_checkpoint(str(p), "same turn") is False       # already taken this turn
    mgr.new_turn()
    assert mgr.ensure_checkpoint(str(p / "."), "turn 2") is True
    newest, older = mgr.list_checkpoints(str(p))
    assert older == first and newest["reason"] == "turn 2"
    assert (newest["files_changed"], newest["insertions"], newest["deletions"]) == (1, 2, 1)
    assert datetime.fromisoformat(newest["timestamp"]) >= datetime.fromisoformat(first["timestamp"])
    mgr.new_turn()
    assert mgr.ensure_checkpoint(str(p), "nothing changed") is False
    with open(p / "a.txt", "r+") as f:      # still open: the write is in the page cache only
        f.write("ONE")
        f.flush()
        mgr.new_turn()
        assert mgr.ensure_checkpoint(str(p), "open file") is True
    assert turns(p) == [0, 1, 2, 3]
    assert (workspace.snapshots / "turn-2/a.txt").read_text() == "ONE\nTWO\nthree\n"


def test_ensure_checkpoint_says_false_and_never_raises(workspace, monkeypatch, caplog, tmp_path):
    p = workspace.path
    mgr = start(workspace, {"f": "f\n"})
    (p / "f").write_text("changed\n")
    off = CheckpointManager(enabled=False)
    assert off.ensure_checkpoint(str(p), "disabled") is False
    monkeypatch.setenv("HOME", str(p))
    mgr.new_turn()
    assert mgr.ensure_checkpoint(str(p), "home") is False
    assert mgr.ensure_checkpoint("/", "root") is False
    monkeypatch.undo()
    assert mgr.ensure_checkpoint(str(tmp_path / "missing"), "missing") is False
    assert mgr.ensure_checkpoint(None, "nonsense") is False
    assert turns(p) == [0, 1]          # nothing was sealed: turn 1 is still open
    # A directory changed behind cowfs's back while unmounted (after an idle unmount, say): the
    # manager mounts it again and says, as a warning, that earlier checkpoints show it as it is.
    workspace.umount()
    (p / "f").write_text("behind its back\n")
    with caplog.at_level(logging.WARNING, logger="cowfs.compat"):
        assert CheckpointManager().ensure_checkpoint(str(p), "drifted") is False   # nothing new
    assert workspace.is_mounted()
    assert any(r.levelno == logging.WARNING and "changed while cowfs was not mounted" in r.getMessage()
               and "accepted" in r.getMessage() for r in caplog.records)


@XFS_ONLY
def test_a_remounted_store_checkpoints_only_what_changed_since(workspace):
    """After an unmount (an idle one, a restart), the history is mounted again as it was: a
    checkpoint only if something changed since the last one, as in a running mount."""
    p = workspace.path
    start(workspace, {"f": "f\n"}, "first session")
    workspace.umount()
    mgr = CheckpointManager()
    assert [c["reason"] for c in mgr.list_checkpoints(str(p))] == ["first session"]   # mounts again
    assert workspace.is_mounted()
    assert mgr.ensure_checkpoint(str(p), "second session") is False
    (p / "f").write_text("g\n")
    mgr.new_turn()
    assert mgr.ensure_checkpoint(str(p), "second session") is True
    assert [c["reason"] for c in mgr.list_checkpoints(str(p))] == ["second session", "first session"]


@XFS_ONLY
def test_list_is_newest_first_capped_and_ids_are_stable_across_a_remount(workspace):
    p = workspace.path
    mgr = start(workspace, {"n": "0\n"}, "c0")
    for i in range(1, 5):
        (p / "n").write_text(f"{i}\n")
        checkpoint(mgr, p, f"c{i}")
    full = mgr.list_checkpoints(str(p))
    assert [c["reason"] for c in full] == ["c4", "c3", "c2", "c1", "c0"]
    assert len({c["hash"] for c in full}) == 5
    capped = CheckpointManager(max_snapshots=3).list_checkpoints(str(p))
    assert capped == full[:3]
    workspace.umount()
    workspace.mount()
    assert CheckpointManager().list_checkpoints(str(p)) == full
    assert CheckpointManager().list_checkpoints(str(p.parent)) == []        # not a mount


@XFS_ONLY
def test_list_counts_no_lines_of_a_big_file(workspace):
    p = workspace.path
    mgr = start(workspace, {"small": "s\n"})
    (p / "small").write_text("s\nt\n")
    (p / "big.txt").write_text("line\n" * (3 << 20))         # 15 MiB, 3 Mi lines
    entry = checkpoint(mgr, p, "big")
    assert (entry["files_changed"], entry["insertions"], entry["deletions"]) == (2, 1, 0)


def test_diff_is_a_git_patch_of_the_checkpoint_against_the_live_tree(workspace, tmp_path):
    p = workspace.path
    mgr = start(workspace, {"src/app.py": "def main():\n    return 1\n", "old.txt": "old\n",
                            "keep.txt": "keep\n"})
    cp = mgr.list_checkpoints(str(p))[0]
    before = tmp_path / "before"
    shutil.copytree(p, before)
    (p / "src/app.py").write_text("def main():\n    return 2\n")
    (p / "old.txt").unlink()
    (p / "new.txt").write_text("new\nfile\n")
    by_short = mgr.diff(str(p), cp["short_hash"])
    assert set(by_short) == {"success", "stat", "diff", "ignored"} and by_short["success"] is True
    assert mgr.diff(str(p), cp["hash"]) == by_short == mgr.diff(str(p), cp["hash"].upper())
    assert by_short["stat"].rstrip().endswith("3 files changed, 3 insertions(+), 2 deletions(-)")
    assert "-    return 1\n+    return 2\n" in by_short["diff"]
    run(["git", "apply", "-"], input=by_short["diff"], cwd=before)
    assert tree(before) == tree(p)
    # A subdirectory as the working directory: its changes only, paths relative to it.
    sub = mgr.diff(str(p / "src"), cp["short_hash"])
    assert sub["diff"].startswith("diff --git a/app.py b/app.py\n") and "new.txt" not in sub["diff"]
    assert mgr.diff(str(p), mgr.list_checkpoints(str(p))[0]["hash"])["diff"] == by_short["diff"]


def test_bad_ids_and_paths_fail_with_one_error_and_touch_nothing(workspace, tmp_path):
    p = workspace.path
    mgr = start(workspace, {"f": "f\n", "d/g": "g\n"})
    os.symlink("/etc", p / "out")
    (p / "f").write_text("live\n")
    cp = mgr.list_checkpoints(str(p))[0]
    unknown = "0123456789abcdef"
    while cp["hash"].startswith(unknown[:8]):
        unknown = unknown[1:] + unknown[0]
    before, sealed = tree(p), turns(p)
    # The phrases callers of the shadow-git manager look for in its errors.
    bad_ids = {"xyz1": "expected 4-64 hex characters",
               "-abc1": "Invalid commit hash (must not start with '-')", "--patch": "must not start with '-'", "ab1": "Invalid commit hash", "": "Empty commit hash",
               "a" * 65: "expected 4-64 hex characters", unknown[:8]: "not found", None: "Empty"}
    for bad, says in bad_ids.items():
        for result in (mgr.diff(str(p), bad), mgr.restore(str(p), bad),
                       mgr.restore(str(p), bad, safe=True)):
            assert set(result) == {"success", "error"} and result["success"] is False
            assert says in result["error"] and "\n" not in result["error"], (bad, result)
    bad_paths = {"/etc/passwd": "got absolute path", str(p / "f"): "got absolute path",
                 "../x": "escapes the working directory", "d/../../x": "escapes", "out/passwd": "escapes",
                 " ": "Empty file path",
                 ".snapshots/turn-0/f": "not in the live tree", "missing": "neither",
                 "nodir/x": "neither"}
    for bad, says in bad_paths.items():
        result = mgr.restore(str(p), cp["hash"], file_path=bad)
        assert result["success"] is False and says in result["error"], (bad, result)
    (p / "newdir").mkdir()
    (p / "newdir/x").write_text("x\n")
    result = mgr.restore(str(p), cp["hash"], file_path="newdir/x")
    assert result["success"] is False and "newdir/ did not exist" in result["error"]
    result = mgr.restore(str(p / "newdir"), cp["hash"])
    assert result["success"] is False and "did not exist at checkpoint" in result["error"]
    (p / "newdir/x").unlink()
    (p / "newdir").rmdir()
    for call in (lambda: mgr.diff(str(tmp_path), cp["hash"]), lambda: mgr.restore(str(tmp_path), cp["hash"])):
        result = call()
        assert result["success"] is False and "not under a cowfs mount" in result["error"]
    assert tree(p) == before and turns(p) == sealed


def test_restore_the_whole_tree_and_undo_it(workspace):
    p = workspace.path
    mgr = start(workspace, {"a": "a0\n", "sub/b": "b0\n"}, "clean")
    clean = tree(p)
    (p / "a").write_text("a1\n")
    (p / "sub/b").unlink()
    (p / "later").write_text("made later\n")
    broken = tree(p)
    cp = mgr.list_checkpoints(str(p))[-1]
    result = mgr.restore(str(p), cp["short_hash"])
    assert result == {"success": True, "restored_to": cp["short_hash"], "reason": "clean",
                      "directory": str(p)}
    assert tree(p) == clean                               # exactly: the later file is gone
    undo = [c for c in mgr.list_checkpoints(str(p))
            if c["reason"] == f"pre-rollback snapshot (restoring to {cp['short_hash']})"]
    assert len(undo) == 1
    assert mgr.restore(str(p), undo[0]["hash"])["success"]
    assert tree(p) == broken


def test_restore_one_file_or_a_subdirectory(workspace):
    p = workspace.path
    mgr = start(workspace, {"a": "a0\n", "sub/b": "b0\n", "sub/c": "c0\n"}, "clean")
    cp = mgr.list_checkpoints(str(p))[0]
    for name in ("a", "sub/b", "sub/c"):
        (p / name).write_text("changed\n")
    (p / "sub/new").write_text("new\n")
    result = mgr.restore(str(p), cp["hash"], file_path="sub/b")
    assert result == {"success": True, "restored_to": cp["short_hash"], "reason": "clean",
                      "directory": str(p), "file": "sub/b"}
    assert (p / "sub/b").read_text() == "b0\n" and (p / "sub/c").read_text() == "changed\n"
    assert mgr.list_checkpoints(str(p))[0]["reason"].startswith("pre-rollback snapshot")
    result = mgr.restore(str(p / "sub"), cp["short_hash"], file_path="c")      # relative to sub
    assert result["success"] and result["file"] == "c" and result["directory"] == str(p / "sub")
    assert (p / "sub/c").read_text() == "c0\n"
    assert mgr.restore(str(p / "sub"), cp["short_hash"])["success"]
    assert sorted(os.listdir(p / "sub")) == ["b", "c"] and (p / "a").read_text() == "changed\n"


def test_safe_restore_reverts_the_agents_changes_and_keeps_the_users(workspace):
    """The rule: the agent's are what the harness recorded (while nobody else changed it and it
    holds what was recorded) and whatever its descendants did; the rest is the user's, including
    what the harness process wrote itself without recording it."""
    p = workspace.path
    names = ("mine", "unrecorded", "redone", "sed", "gone", "user", "told", "retold", "moved", "both")
    files = {f"{n}.txt": f"{n} 0\n" for n in names} | {"lib/x.py": "x\n", "lib/y.py": "y\n"}
    mgr = start(workspace, files, "clean")
    cp = mgr.list_checkpoints(str(p))[0]
    (p / "mine.txt").write_text("the harness's write tool wrote this\n")   # this process, recorded
    mgr.record_agent_write(str(p / "mine.txt"))
    (p / "unrecorded.txt").write_text("the harness process, not recorded\n")   # the user's (Hermes)
    (p / "redone.txt").write_text("the write tool\n")
    mgr.record_agent_write(str(p / "redone.txt"))
    (p / "redone.txt").write_text("then this process again, not recorded\n")
    run(["sed", "-i", "s/0/1/", p / "sed.txt"])                            # a child of it
    run(["sh", "-c", "rm gone.txt && echo made > made.txt && mkdir -p new/deep && echo x > new/deep/x"],
        cwd=p)
    run(["mv", p / "moved.txt", p / "renamed.txt"])
    run(["rm", "-r", p / "lib"])
    user_writes(p / "both.txt", "the user first\n")
    run(["sed", "-i", "s/first/first, then the agent/", p / "both.txt"])     # the agent's, last
    user_writes(p / "user.txt", "the user's edit\n")                      # not a descendant
    user_writes(p / "users-own.txt", "the user's new file\n")
    user_writes(p / "new/deep/user-note", "the user's file in the agent's directory\n")
    user_writes(p / "told.txt", "a tool server wrote this for the agent\n")
    mgr.record_agent_write(str(p / "told.txt"))
    user_writes(p / "retold.txt", "a tool server wrote this\n")
    mgr.record_agent_write(str(p / "retold.txt"))
    user_writes(p / "retold.txt", "and then the user\n", "a")
    after = checkpoint(mgr, p, "after the agent's turn")     # writers are kept with the turn
    before = tree(p)

    plan = mgr.safe_restore_plan(str(p), cp["hash"])
    result = mgr.restore(str(p), cp["short_hash"], safe=True)
    agents = ["both.txt", "gone.txt", "lib/x.py", "lib/y.py", "made.txt", "mine.txt", "moved.txt",
              "new/deep/x", "renamed.txt", "sed.txt", "told.txt"]
    users = ["new/deep/user-note", "redone.txt", "retold.txt", "unrecorded.txt", "user.txt",
             "users-own.txt"]
    assert plan == {"success": True, "restore": agents, "skipped": users}
    assert result == {"success": True, "restored_to": cp["short_hash"], "reason": "clean",
                      "directory": str(p), "restored_files": agents, "skipped_user_edits": users,
                      "skipped_oversize": []}
    for name in ("mine", "sed", "gone", "told", "moved", "both"):
        assert (p / f"{name}.txt").read_text() == f"{name} 0\n", name
    assert (p / "lib/x.py").read_text() == "x\n" and (p / "lib/y.py").read_text() == "y\n"
    assert not (p / "made.txt").exists() and not (p / "renamed.txt").exists()
    assert not (p / "new/deep/x").exists()
    assert (p / "unrecorded.txt").read_text() == "the harness process, not recorded\n"
    assert (p / "redone.txt").read_text() == "then this process again, not recorded\n"
    assert (p / "user.txt").read_text() == "the user's edit\n"
    assert (p / "users-own.txt").read_text() == "the user's new file\n"
    assert (p / "retold.txt").read_text() == "a tool server wrote this\nand then the user\n"
    assert (p / "new/deep/user-note").read_text() == "the user's file in the agent's directory\n"
    # The state before it was a checkpoint already (none was added), so it can be undone.
    assert mgr.list_checkpoints(str(p))[0] == after
    assert mgr.restore(str(p), after["hash"])["success"]
    assert tree(p) == before


@XFS_ONLY
def test_safe_restore_without_a_ledger_or_descendants_restores_everything(workspace):
    """Nothing tells the agent apart (no recorded write, no command of the harness): a full
    restore, without `skipped_user_edits`, as the shadow-git manager does."""
    p = workspace.path
    mgr = start(workspace, {"main.py": "print('hello')\n", "README.md": "# p\n"})
    cp = mgr.list_checkpoints(str(p))[0]
    (p / "main.py").write_text("changed, nothing recorded\n")
    user_writes(p / "README.md", "the user\n")
    assert mgr.safe_restore_plan(str(p), cp["hash"]) == {"success": True, "restore": [],
                                                         "skipped": [], "ledger_empty": True}
    result = mgr.restore(str(p), cp["hash"], safe=True)
    assert result == {"success": True, "restored_to": cp["short_hash"], "reason": "start",
                      "directory": str(p)}
    assert (p / "main.py").read_text() == "print('hello')\n" and (p / "README.md").read_text() == "# p\n"


@XFS_ONLY
def test_a_new_harness_process_classifies_an_earlier_sessions_changes_the_same_way(workspace):
    """Session 1 (a harness process the test did not start) records a write, runs a command and
    writes a file itself; the daemon is then restarted (unmounted and mounted again) and a new
    harness process (this one) safe-restores: the ledger and session 1's identity came from
    the store."""
    p = workspace.path
    for name, text in {"src/app.py": "v0\n", "docs/guide.md": "guide\n", "notes.md": "n0\n"}.items():
        (p / name).parent.mkdir(parents=True, exist_ok=True)
        (p / name).write_text(text)
    workspace.mount()

    def session_1():
        mgr = CheckpointManager()
        mgr.new_turn()
        mgr.ensure_checkpoint(str(p), "session 1 starts")      # nothing changed yet: turn 0 is it
        (p / "src/app.py").write_text("v1, by the write tool\n")
        mgr.record_agent_write(str(p / "src/app.py"))
        subprocess.run(["rm", p / "docs/guide.md"], check=True)         # a terminal command
        (p / "notes.md").write_text("the user's hand edit, through the harness\n")
    as_unrelated_process(session_1)
    user_writes(p / "todo", "the user's own file\n")
    workspace.umount()
    workspace.mount()

    mgr = CheckpointManager()
    cp = mgr.list_checkpoints(str(p))[-1]
    result = mgr.restore(str(p), cp["hash"], safe=True)
    assert (result["restored_files"], result["skipped_user_edits"]) == (
        ["docs/guide.md", "src/app.py"], ["notes.md", "todo"])
    assert (p / "src/app.py").read_text() == "v0\n" and (p / "docs/guide.md").read_text() == "guide\n"
    assert (p / "notes.md").read_text() == "the user's hand edit, through the harness\n"
    assert (p / "todo").read_text() == "the user's own file\n"


@XFS_ONLY
def test_safe_restore_removes_the_directories_the_agent_made_once_empty(workspace):
    p = workspace.path
    mgr = start(workspace, {"keep": "k\n"})
    cp = mgr.list_checkpoints(str(p))[0]
    run(["sh", "-c", "mkdir -p build/obj && echo o > build/obj/a.o && echo log > build/log"], cwd=p)
    result = mgr.restore(str(p), cp["hash"], safe=True)
    assert result["restored_files"] == ["build/log", "build/obj/a.o"] and result["skipped_user_edits"] == []
    assert sorted(os.listdir(p)) == ["keep"]


@XFS_ONLY
def test_safe_restore_with_only_user_edits_touches_nothing(workspace):
    p = workspace.path
    mgr = start(workspace, {"notes": "n\n"})
    (p / "tool.txt").write_text("the write tool\n")
    mgr.record_agent_write(str(p / "tool.txt"))             # a ledger, from an earlier turn
    cp = checkpoint(mgr, p, "clean")
    user_writes(p / "notes", "the user's notes\n")
    sealed = turns(p)
    result = mgr.restore(str(p), cp["hash"], safe=True)
    assert result == {"success": True, "restored_to": cp["short_hash"],
                      "reason": "nothing to restore (all changed files were user-edited)",
                      "directory": str(p), "restored_files": [], "skipped_user_edits": ["notes"],
                      "skipped_oversize": []}
    assert (p / "notes").read_text() == "the user's notes\n" and turns(p) == sealed


@XFS_ONLY
def test_safe_restore_of_a_subdirectory_reports_paths_relative_to_it(workspace):
    p = workspace.path
    mgr = start(workspace, {"lib/a": "a\n", "lib/u": "u\n", "top": "t\n"})
    cp = mgr.list_checkpoints(str(p))[0]
    run(["sh", "-c", "echo agent > lib/a && echo agent, outside lib > top"], cwd=p)
    user_writes(p / "lib/u", "user\n")
    result = mgr.restore(str(p / "lib"), cp["hash"], safe=True)
    assert (result["restored_files"], result["skipped_user_edits"]) == (["a"], ["u"])
    assert (p / "lib/a").read_text() == "a\n" and (p / "top").read_text() == "agent, outside lib\n"


@XFS_ONLY
def test_get_working_dir_for_path_and_store_status(workspace, tmp_path):
    p = workspace.path
    mgr = start(workspace, {"src/x.py": "x\n"})
    assert mgr.get_working_dir_for_path(str(p / "src/x.py")) == str(p)
    project = tmp_path / "proj"
    (project / "pkg").mkdir(parents=True)
    (project / "pyproject.toml").write_text("")
    assert mgr.get_working_dir_for_path(str(project / "pkg/mod.py")) == str(project)
    (p / "src/x.py").write_text("y\n")
    checkpoint(mgr, p, "second")
    status = store_status(working_dir=str(p / "src"))
    [entry] = status["projects"]
    assert status["project_count"] == 1 and status["store_size_bytes"] == entry["store_size_bytes"] > 0
    assert entry["workdir"] == str(p) and entry["turns"] == entry["commits"] == 2
    assert entry["oldest_turn"] == 0 and entry["capture_mode"] in ("reflink", "copy")
    assert entry["created_at"] <= entry["last_touch"]
    assert store_status(working_dir=str(tmp_path)) == {
        "base": None, "store_size_bytes": 0, "total_size_bytes": 0, "project_count": 0, "projects": [],
        "legacy_size_bytes": 0, "pre_v2_projects": [], "legacy_archives": []}
    assert entry["hash"] == hashlib.sha256(str(p).encode()).hexdigest()[:16]


def test_prune_helper_and_the_managers_store_limit(workspace, tmp_path):
    p = workspace.path
    mgr = start(workspace, {"f": "0\n"})
    for i in range(1, 5):
        mgr.new_turn()
        (p / "f").write_text(f"{i}\n")
        assert mgr.ensure_checkpoint(str(p), f"turn {i}")
    sealed = turns(p)[:-1]          # the last one is the open turn
    result = prune(str(p), keep=2)
    assert result["success"] and result["removed"] == sealed[:-2]
    assert result["oldest_turn"] == sealed[-2] and turns(p)[:2] == sealed[-2:]
    assert [c["reason"] for c in mgr.list_checkpoints(str(p))][-1] == "turn 3"
    assert prune(str(tmp_path), keep=1) == {"success": False,
                                            "error": f"{tmp_path} is not under a cowfs mount"}
    assert not prune(str(p), older_than="soon")["success"]
    assert CheckpointManager(max_total_size_mb=64).max_store == "64M"


def test_the_example_agent_loop_runs(workspace):
    p = workspace.path
    cp = run([sys.executable, REPO / "examples/agent_loop.py", p])
    assert "FAILED" not in cp.stdout and cp.stdout.count("  ok: ") == 10, cp.stdout
    assert not workspace.is_mounted()           # the harness's mount ended with it
    workspace.mount()
    assert (p / "src/greet.py").read_text() == 'def greet(name):\n    return f"goodbye, {name}"\n'
    assert (p / "notes.md").read_text() == "# notes\n- remember to add tests\n"
    assert sorted(os.listdir(p)) == [".venv", "notes.md", "out.txt", "src"]
    log = json.loads(workspace.cli("log", "--json").stdout)
    messages = [t["message"] for t in log if t["sealed"]]
    assert messages[:3] == ["before turn 1: scaffold", "before turn 2: say goodbye",
                            "before turn 3: clean up"]
    assert re.fullmatch(r"pre-rollback snapshot \(restoring to [0-9a-f]{8}\)", messages[3])
    assert messages[4] == "rollback to turn-2" and messages[5].startswith("pre-rollback snapshot")
    # "before turn 4" found nothing changed since the rollback; the unmount at the harness's
    # exit sealed what the safe restore changed
    assert len(messages) == 7


@XFS_ONLY
def test_the_example_runs_without_privilege(backing, test_users):
    backing.chmod(0o755)
    ws = Workspace(backing / "proj", user=TEST_USER)
    try:
        chown_tree(ws.path, TEST_USER)
        cp = run([*as_user(TEST_USER), sys.executable, REPO / "examples/agent_loop.py", ws.path])
        assert "FAILED" not in cp.stdout and cp.stdout.count("  ok: ") == 10, cp.stdout
        assert not ws.is_mounted()           # the harness's mount ended with it
        assert (ws.path / "notes.md").read_text() == "# notes\n- remember to add tests\n"
        assert {f.owner() for f in ws.path.rglob("*")} == {TEST_USER}
    finally:
        ws.cleanup()


@XFS_ONLY
@pytest.mark.skipif(shutil.which("jq") is None, reason="the hook recipe uses jq")
def test_the_claude_code_hook_recipe_of_docs_harness_md(workspace, tmp_path):
    text = (REPO / "docs/harness.md").read_text()
    settings = json.loads(re.search(r'```json\n(\{\n  "hooks".*?)```', text, re.S).group(1))
    command = {event: hooks[0]["hooks"][0]["command"] for event, hooks in settings["hooks"].items()}
    workspace.mount()
    env = {"CLAUDE_PROJECT_DIR": str(workspace.path),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    prompt = f"fix the parser's \"edge\" case $(touch {tmp_path}/ran) `touch {tmp_path}/ran` " + "é" * 200
    event = json.dumps({"session_id": "s", "hook_event_name": "UserPromptSubmit", "prompt": prompt})
    before = run(["bash", "-c", command["UserPromptSubmit"]], input=event, env=env, cwd=tmp_path)
    (workspace.path / "parser.py").write_text("fixed\n")
    after = run(["bash", "-c", command["Stop"]], input='{"hook_event_name": "Stop"}', env=env, cwd=tmp_path)
    assert before.stdout == after.stdout == ""        # a UserPromptSubmit hook's output joins the context
    assert not (tmp_path / "ran").exists()
    log = json.loads(workspace.cli("log", "--json").stdout)
    assert [t["message"] for t in log[1:3]] == [f"before: {prompt[:200]}", "agent turn"]
    assert (workspace.snapshots / "turn-2/parser.py").read_text() == "fixed\n"
    assert not (workspace.snapshots / "turn-1/parser.py").exists()


@XFS_ONLY
def test_nested_directories_keep_one_history_each_and_never_fail(workspace):
    """In a directory without project markers the first checkpoint of proj/src/app.py mounts
    proj/src; a checkpoint of proj later must not mount around it (every file below would
    fail with EIO, and src's checkpoints could no longer be listed): src's history is
    checkpointed instead, mounted or not, and `cowfs mount proj` is refused in one line."""
    p = workspace.path
    src = p / "src"
    src.mkdir()
    (src / "app.py").write_text("v0\n")
    mgr = CheckpointManager()
    mgr.new_turn()
    assert mgr.get_working_dir_for_path(str(src / "app.py")) == str(src)
    assert mgr.ensure_checkpoint(mgr.get_working_dir_for_path(str(src / "app.py")), "src") is True
    try:
        (src / "app.py").write_text("v1\n")
        mgr.new_turn()
        assert mgr.ensure_checkpoint(str(p), "proj") is False      # logged: src's was taken
        assert not workspace.is_mounted()
        assert (src / "app.py").read_text() == "v1\n" and os.listdir(src) == ["app.py"]
        assert [c["reason"] for c in mgr.list_checkpoints(str(src))] == ["proj", "src"]
        result = run([sys.executable, "-m", "cowfs", "mount", p], check=False)
        assert result.returncode == 2 and result.stderr.count("\n") == 1
        assert f"{src} is a cowfs mount inside {p}" in result.stderr
        cowfs.umount(src)                                  # as an idle unmount would
        (src / "app.py").write_text("v2\n")
        mgr.new_turn()
        assert mgr.ensure_checkpoint(str(p), "proj again") is False    # src is mounted again
        assert not workspace.is_mounted()
        first = mgr.list_checkpoints(str(src))[-1]
        assert first["reason"] == "src" and mgr.restore(str(src), first["hash"])["success"]
        assert (src / "app.py").read_text() == "v0\n"
    finally:
        if is_fuse_mounted(src):
            cowfs.umount(src)


@XFS_ONLY
def test_an_idle_mount_ends_by_itself_and_mounts_again_with_its_history(workspace):
    p = workspace.path
    (p / "f").write_text("v0\n")
    mgr = CheckpointManager(idle_umount=1.5)
    mgr.new_turn()
    assert mgr.ensure_checkpoint(str(p), "start") is True
    holder = subprocess.Popen(["sleep", "60"], cwd=p)       # working inside: not idle
    try:
        time.sleep(4)
        assert workspace.is_mounted()
    finally:
        holder.kill()
        holder.wait()
    (p / "f").write_text("v1\n")                            # pending: sealed by the unmount
    deadline = time.monotonic() + 30
    while workspace.is_mounted() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not workspace.is_mounted()
    left = lambda: [pid for pid in _pids_of("cowfs") if str(p) in _cmdline(pid)]  # noqa: E731
    while left() and time.monotonic() < deadline:           # the daemon ends after its mount
        time.sleep(0.2)
    assert not left()                                       # nor daemon nor watcher
    assert [c["reason"] for c in mgr.list_checkpoints(str(p))] == ["unmount", "start"]  # mounts again
    assert workspace.is_mounted()
    assert (workspace.snapshots / "turn-0/f").read_text() == "v0\n"
    mgr.new_turn()
    (p / "f").write_text("v2\n")
    assert mgr.ensure_checkpoint(str(p), "after the remount") is True
    assert mgr.restore(str(p), mgr.list_checkpoints(str(p))[-1]["hash"])["success"]
    assert (p / "f").read_text() == "v0\n"


def _pids_of(word: str) -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit() and word in _cmdline(int(d))]


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@XFS_ONLY
def test_available_says_why_cowfs_cannot_serve_a_directory(workspace, tmp_path, test_users):
    """The fallback a harness needs: `available` is true where cowfs can mount, and names the
    reason where it cannot; `ensure_checkpoint` logs the same reason and returns False."""
    assert available(workspace.path) and available(workspace.path).reason is None
    missing = available(tmp_path / "missing")
    assert not missing and missing.reason == f"{tmp_path / 'missing'} is not a directory"
    start(workspace, {"f": "f\n"})
    (workspace.path / "sub").mkdir()
    assert available(workspace.path / "sub")          # inside a cowfs mount: served already
    # Without root, a mount needs fusermount3: an ordinary user whose PATH lacks it.
    home = workspace.path.parent / "user-proj"
    home.mkdir()
    chown_tree(home, TEST_USER)
    script = ("import logging, sys\n"
              "from cowfs.compat import CheckpointManager, available\n"
              "logging.basicConfig(level=logging.WARNING)\n"
              "print(available(sys.argv[1]).reason)\n"
              "print(CheckpointManager().ensure_checkpoint(sys.argv[1], 'first'))\n")
    cp = run([*as_user(TEST_USER), "env", "PATH=/nonexistent", sys.executable, "-c", script, home])
    reason, result = cp.stdout.splitlines()
    assert "fusermount3" in reason and "install fuse3" in reason and result == "False", cp.stdout
    assert f"cowfs: no checkpoint of {home}: cowfs cannot serve {home} here: {reason}" in cp.stderr
