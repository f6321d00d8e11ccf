#!/usr/bin/env python3
"""A small agent-harness loop on cowfs, through the checkpoint-manager interface harnesses use.

Four turns of real shell commands and file writes in DIR, a checkpoint before each turn's first
change (as a harness's tool layer does), a diff shown, a bad turn rolled back, and a safe
restore that reverts the agent's changes but keeps an edit the "user" made meanwhile in another
process (one the harness did not start). Each step checks what it expects and the script exits 1
if cowfs did something else.

    python3 examples/agent_loop.py /var/tmp/demo-ws       # as root, or as the owner of DIR

DIR is made if missing; it must be on XFS, btrfs or ext4 (not tmpfs), and not mounted yet: the
manager mounts cowfs over it at the first checkpoint, with an idle unmount (the mount ends by
itself after 5 idle minutes, and when this harness exits; the next checkpoint mounts it again).
Afterwards `cowfs mount DIR && cowfs -C DIR log -v` shows every turn and who made each change.

Turn 2 also "installs" a dependency into .venv: the diff shows the one edited source file and
says how many changes in ignored paths it left out (the history keeps them all).
"""

import argparse
import os
import subprocess
import sys
import time

import cowfs
from cowfs.compat import CheckpointManager


def sh(command: str, cwd: str) -> None:
    """A tool call of the agent: a shell command, a child of the harness."""
    print(f"  $ {command}")
    subprocess.run(["sh", "-c", command], cwd=cwd, check=True)


def as_unrelated_process(action) -> None:
    """Run *action* in a process that does not descend from this one, as the user's editor
    would: a double fork whose middle process has exited before the action starts."""
    done_r, done_w = os.pipe()
    middle = os.fork()
    if middle == 0:
        os.close(done_r)
        parent = os.getpid()
        if os.fork() == 0:
            while os.getppid() == parent:       # until the middle process is gone
                time.sleep(0.005)
            try:
                action()
                os.write(done_w, b"ok")
            finally:
                os._exit(0)
        os._exit(0)
    os.close(done_w)
    os.waitpid(middle, 0)
    with os.fdopen(done_r, "rb") as done:
        if done.read() != b"ok":
            raise RuntimeError("the unrelated process failed")


def check(condition: bool, what: str) -> None:
    print(f"  {'ok' if condition else 'FAILED'}: {what}")
    if not condition:
        sys.exit(1)


def read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return None


def run(work: str) -> None:
    mgr = CheckpointManager(idle_umount="5m")      # ends by itself when idle, and when we exit
    at = lambda name: os.path.join(work, name)  # noqa: E731

    print("turn 1: scaffold a project")
    mgr.new_turn()
    check(mgr.ensure_checkpoint(work, "before turn 1: scaffold"), "first checkpoint (mounts cowfs)")
    os.makedirs(at("src"), exist_ok=True)
    with open(at("src/greet.py"), "w") as f:                        # the agent's write_file tool
        f.write('def greet(name):\n    return f"hello, {name}"\n')
    with open(at("notes.md"), "w") as f:
        f.write("# notes\n")
    for name in ("src/greet.py", "notes.md"):
        mgr.record_agent_write(at(name))       # what the write tool wrote: the agent's
    sh("python3 -c 'import sys; sys.path.insert(0, \"src\"); import greet; print(greet.greet(\"x\"))'"
       " > out.txt", work)
    check(read(at("out.txt")) == "hello, x\n", "the project runs")

    print("turn 2: change the greeting; show the diff")
    mgr.new_turn()
    check(mgr.ensure_checkpoint(work, "before turn 2: say goodbye"), "checkpoint of turn 1's work")
    check(not mgr.ensure_checkpoint(work, "again"), "one checkpoint per directory per turn")
    sh("sed -i s/hello/goodbye/ src/greet.py", work)
    sh("mkdir -p .venv/lib/site-packages/dep && for i in $(seq 1 40); do "       # a pip install
       "echo x > .venv/lib/site-packages/dep/m$i.py; done", work)
    latest = mgr.list_checkpoints(work)[0]
    shown = mgr.diff(work, latest["short_hash"])
    print(shown["stat"] + shown["diff"], end="")
    check(shown["success"] and '+    return f"goodbye, {name}"' in shown["diff"],
          f"diff against checkpoint {latest['short_hash']} ({latest['reason']})")
    check(shown["ignored"] == 40 and ".venv" not in shown["diff"]
          and shown["stat"].rstrip().endswith("and 40 changes in ignored paths (all=True shows them)"),
          "the diff shows the source, and counts the 40 files of .venv it left out")

    print("turn 3: a bad turn, rolled back")
    mgr.new_turn()
    mgr.ensure_checkpoint(work, "before turn 3: clean up")
    before_bad = mgr.list_checkpoints(work)[0]
    sh("rm -rf src out.txt && echo oops > notes.md && echo junk > junk.txt", work)
    result = mgr.restore(work, before_bad["hash"])
    check(result["success"] and result["reason"] == "before turn 3: clean up",
          f"restored to {result['restored_to']}")
    check('"goodbye, {name}"' in read(at("src/greet.py")) and read(at("notes.md")) == "# notes\n"
          and read(at("junk.txt")) is None, "the tree is the checkpoint's again")

    print("turn 4: the agent edits while the user edits notes.md; a safe restore")
    mgr.new_turn()
    mgr.ensure_checkpoint(work, "before turn 4: refactor")
    before_refactor = mgr.list_checkpoints(work)[0]
    sh("sed -i s/goodbye/farewell/ src/greet.py && echo scratch > scratch.txt", work)

    def user_edit():
        with open(at("notes.md"), "a") as f:
            f.write("- remember to add tests\n")
    as_unrelated_process(user_edit)
    result = mgr.restore(work, before_refactor["short_hash"], safe=True)
    print(f"  restored: {result['restored_files']}, kept: {result['skipped_user_edits']}")
    check(result["restored_files"] == ["scratch.txt", "src/greet.py"]
          and result["skipped_user_edits"] == ["notes.md"], "the agent's changes only")
    check('"goodbye, {name}"' in read(at("src/greet.py")) and read(at("scratch.txt")) is None
          and read(at("notes.md")) == "# notes\n- remember to add tests\n", "the user's edit is kept")

    print("checkpoints, newest first:")
    for cp in mgr.list_checkpoints(work):
        print(f"  {cp['short_hash']}  {cp['timestamp']}  {cp['reason']}"
              f"  ({cp['files_changed']} files, +{cp['insertions']}/-{cp['deletions']})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("dir", help="the workspace (made if missing; not mounted yet)")
    args = parser.parse_args(argv)
    work = os.path.abspath(args.dir)
    os.makedirs(work, exist_ok=True)
    run(work)
    print(f"the mount ends as this harness exits; `cowfs mount {work}` to look at its history")
    return 0


if __name__ == "__main__":
    sys.exit(main())
