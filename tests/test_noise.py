"""Capture everything, show what matters: the display filter (cowfs.noise) through real mounts.

A turn that installs a virtualenv's worth of packages and edits one source file: the history
keeps all of it (a rollback is exact), every view shows the one file and says how many changes
it left out, `--all` shows them all, and all views count the same way. The filter's reading of
.gitignore files is checked against git's own (`git check-ignore`).
"""

import json
import subprocess

import pytest

import cowfs
from cowfs.compat import CheckpointManager
from cowfs.noise import Noise
from treeview import tree

XFS_ONLY = pytest.mark.parametrize("backing", ["xfs"], indirect=True)


def _write(root, rel: str, text: str = "x\n") -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _pip_install(root, packages: int = 40, files: int = 12) -> list[str]:
    """What `pip install` into .venv leaves (plus caches and a log the .gitignore names)."""
    made = []
    for p in range(packages):
        for f in range(files):
            made.append(f".venv/lib/python3.11/site-packages/pkg{p}/mod{f}.py")
        made.append(f".venv/lib/python3.11/site-packages/pkg{p}/__pycache__/mod0.cpython-311.pyc")
    made += ["node_modules/left-pad/index.js", "src/__pycache__/app.cpython-311.pyc", "install.log",
             "build/lib/app.py"]
    for rel in made:
        _write(root, rel)
    return made


@XFS_ONLY
def test_a_pip_install_turn_shows_the_one_edited_file_and_counts_the_rest(workspace):
    p = workspace.path
    _write(p, "src/app.py", "def main():\n    return 1\n")
    _write(p, ".gitignore", "*.log\n")
    workspace.mount()
    turn0 = tree(p)
    noise = _pip_install(p)
    _write(p, "src/app.py", "def main():\n    return 2\n")
    workspace.cli("checkpoint", "-m", "pip install, one edit")
    turn1 = tree(p)
    n = len(noise)
    note = f"and {n:,} changes in ignored paths (--all shows them)"

    names = workspace.cli("diff", "0", "1", "--name-status")
    assert names.stdout == "M\tsrc/app.py\n" and names.stderr.strip() == note
    stat = workspace.cli("diff", "0", "1", "--stat").stdout
    assert stat.splitlines()[-2:] == [" 1 file changed, 1 insertion(+), 1 deletion(-)", f" {note}"]
    patch = workspace.cli("diff", "0", "1").stdout
    assert "+++ b/src/app.py" in patch and ".venv" not in patch
    everything = workspace.cli("diff", "0", "1", "--all", "--name-status")
    assert sorted(everything.stdout.splitlines()) == sorted(
        ["M\tsrc/app.py"] + [f"A\t{rel}" for rel in noise]) and everything.stderr == ""

    # Every view counts the same way.
    [log] = [t for t in json.loads(workspace.cli("log", "--json").stdout) if t["number"] == 1]
    assert (log["changes"], log["ignored"]) == (1, n)
    [log_all] = [t for t in json.loads(workspace.cli("log", "--json", "--all").stdout) if t["number"] == 1]
    assert (log_all["changes"], log_all["ignored"]) == (n + 1, 0)
    assert f"1 changed (+{n:,} ignored)" in workspace.cli("log").stdout
    verbose = workspace.cli("log", "-v").stdout
    assert "M  src/app.py" in verbose and f"    {note}" in verbose and ".venv" not in verbose
    ws = cowfs.Workspace(p)
    assert (ws.turn(1).changes, ws.turn(1).ignored) == (1, n)
    assert (ws.turn(1, include_ignored=True).changes, ws.turn(1, include_ignored=True).ignored) == (n + 1, 0)
    mgr = CheckpointManager()
    entry = next(e for e in mgr.list_checkpoints(str(p)) if e["reason"] == "pip install, one edit")
    assert (entry["files_changed"], entry["insertions"], entry["deletions"], entry["ignored"]) == (1, 1, 1, n)
    turn0_id = mgr.list_checkpoints(str(p))[-1]["hash"]
    shown = mgr.diff(str(p), turn0_id)
    assert shown["ignored"] == n and ".venv" not in shown["diff"] and "src/app.py" in shown["diff"]
    assert shown["stat"].splitlines()[-1] == f" and {n:,} changes in ignored paths (all=True shows them)"
    assert mgr.diff(str(p), turn0_id, all=True)["stat"].count("|") == n + 1

    # History stays exact: all of it is captured and rolled back.
    workspace.cli("rollback", "0")
    assert tree(p) == turn0
    workspace.cli("rollback", "1")
    assert tree(p) == turn1


def test_ignored_paths_are_what_git_ignores(tmp_path):
    """Nested .gitignore files, negations, anchored and directory-only patterns, an ignored
    directory's contents (which a negation cannot bring back), .git/info/exclude."""
    rules = {".gitignore": "*.log\n!keep.log\n/top-only\nbuild/\ndocs/*.md\n!docs/README.md\n",
             "a/.gitignore": "secret\n!*.log\n*.tmp\n",
             "a/b/.gitignore": "!x.tmp\n",
             "build/.gitignore": "!important\n",
             ".git/info/exclude": "local-only\n"}
    for rel, text in rules.items():
        _write(tmp_path, rel, text)
    paths = ["x.log", "keep.log", "a/x.log", "a/secret", "secret", "a/b/secret", "top-only",
             "a/top-only", "build/out", "build/important", "src/build/x", "docs/a.md",
             "docs/README.md", "docs/sub/a.md", "a/y.tmp", "a/b/x.tmp", "a/b/y.tmp", "local-only",
             "a/local-only", "src/app.py"]
    for rel in paths:
        _write(tmp_path, rel)
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    # git check-ignore exits 1 when nothing it was given is ignored
    out = subprocess.run(["git", "-C", str(tmp_path), "check-ignore", "--no-index", "--stdin"],
                         input="\n".join(paths), capture_output=True, text=True).stdout
    noise = Noise(tmp_path, defaults=())
    assert {rel for rel in paths if noise.ignored(rel)} == set(out.split())


def test_the_default_list_names_the_usual_noise_and_a_gitignore_can_take_it_back(tmp_path):
    _write(tmp_path, ".gitignore", "!build/\n")
    noise = Noise(tmp_path)
    for rel in (".venv/bin/python", "venv/lib/x.py", "node_modules/a/index.js", "x/__pycache__/m.pyc",
                ".pytest_cache/v", "dist/pkg.whl", "target/debug/app", ".git/HEAD", "m.o"):
        assert noise.ignored(rel), rel
    for rel in ("src/app.py", "build/out.txt", "README.md", "environment.yml"):
        assert not noise.ignored(rel), rel
