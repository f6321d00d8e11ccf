"""stress-ng's filesystem stressors through the mount: the daemon survives, memory stays bounded,
a stressor fails through cowfs only where it fails on the backing filesystem, and checkpoints taken
meanwhile have exact snapshots (issue 12). COWFS_STRESS_SECONDS sets each stressor's time."""

import json
import os
import subprocess

import pytest

from treeview import tree

STRESSORS = ["dir", "dentry", "rename", "link", "symlink", "hdd", "seek", "mmap", "fallocate",
             "xattr", "flock", "lockf", "fiemap", "sync-file", "utime", "chmod", "chown", "open",
             "dirdeep"]
SECONDS = os.environ.get("COWFS_STRESS_SECONDS", "1")
RSS_LIMIT = 200 << 20


def stress(stressor: str, where) -> subprocess.CompletedProcess:
    return subprocess.run(["stress-ng", f"--{stressor}", "1", "--timeout", f"{SECONDS}s",
                           "--temp-path", str(where), "--hdd-bytes", "8M", "--dirdeep-inodes", "2000"],
                          capture_output=True, text=True, timeout=int(SECONDS) * 10 + 120)


def daemon_rss(ws) -> int:
    pid = json.loads(ws.cli("status", "--json").stdout)["daemon_pid"]
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize("backing", ["xfs"], indirect=True)
def test_stress_ng_filesystem_stressors(workspace, backing):
    native = backing / "native"
    native.mkdir()
    ws = workspace
    (ws.path / "kept").write_text("kept\n")
    ws.mount()
    sealed = {}
    for stressor in STRESSORS:
        through = stress(stressor, ws.path)
        if through.returncode != 0:
            alone = stress(stressor, native)
            assert alone.returncode == through.returncode, (stressor, through.stderr[-2000:])
        assert ws.is_mounted(), stressor
        turn = int(ws.cli("checkpoint", "-m", stressor).stdout.strip().removeprefix("turn-"))
        sealed[turn] = tree(ws.snapshots / f"turn-{turn}")
        assert daemon_rss(ws) < RSS_LIMIT, stressor
    for turn, expected in sealed.items():
        assert tree(ws.snapshots / f"turn-{turn}") == expected, turn
    assert (ws.path / "kept").read_text() == "kept\n"
