"""A checkpoint's cost must not grow with the tree: counted in syscalls, not seconds."""

import json
import os
import re
import time

import pytest

from conftest import traced

STRACE = ["strace"]     # the tracer's argv (a test of this file may wrap it)


def make_tree(root, files: int) -> None:
    for i in range(files):
        d = root / f"d{i // 100}"
        d.mkdir(exist_ok=True)
        (d / f"f{i}").write_bytes(b"x" * 100)


def daemon_syscalls_during_checkpoint(ws) -> int:
    """Syscalls the daemon makes while `cowfs checkpoint` runs (strace -c), counted only once
    the tracer is proven attached to every thread of the daemon."""
    pid = json.loads(ws.cli("status", "--json").stdout)["daemon_pid"]
    out = ws.path.parent / f"strace-{time.monotonic_ns()}.txt"
    with traced(pid, ["-c", "-o", out], strace=STRACE):
        ws.cli("checkpoint", "-m", "measured")
        time.sleep(0.2)
    summary = out.read_text()
    total = re.search(r"^\S+\s+\S+\s+\S+\s+(\d+)\s+(?:\d+\s+)?total$", summary, re.M)
    assert total, summary
    return int(total.group(1))


@pytest.mark.parametrize("backing", ["xfs"], indirect=True)
def test_checkpoint_work_is_flat_in_tree_size(workspace_factory):
    counts = {}
    for files in (100, 5000):
        ws = workspace_factory(f"ws{files}")
        make_tree(ws.path, files)
        ws.mount()
        for i in range(10):
            (ws.path / "d0" / f"f{i}").write_bytes(b"changed")
        os.listdir(ws.path / "d0")
        counts[files] = daemon_syscalls_during_checkpoint(ws)
        ws.umount()
    # Same work at 50x the files; a little slack for the event loop's own wake-ups.
    print("daemon syscalls per checkpoint:", counts)
    assert counts[100] > 0
    assert counts[5000] <= counts[100] + 25, counts
