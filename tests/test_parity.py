"""The live view behaves as the backing filesystem where it used not to (issue 12's parity list)."""

import os
import stat
import subprocess


def test_o_direct_reads_and_writes(workspace):
    workspace.mount()
    p = workspace.path
    subprocess.run(["dd", "if=/dev/urandom", f"of={p}/x", "bs=4096", "count=4", "oflag=direct",
                    "status=none"], check=True)
    out = subprocess.run(["dd", f"if={p}/x", "bs=4096", "iflag=direct", "status=none"],
                         check=True, capture_output=True).stdout
    assert len(out) == 16384 and out == (p / "x").read_bytes()
    workspace.umount()
    assert (p / "x").read_bytes() == out

def test_times_past_2262_are_kept_in_history(workspace):
    """Nanoseconds past 2262 do not fit SQLite's INTEGER: the capture used to fail the open (EIO)."""
    p = workspace.path
    workspace.mount()
    (p / "f").write_bytes(b"x\n")
    far = 10_413_792_000 * 10**9          # 2300-01-01
    os.utime(p / "f", ns=(far, far))
    workspace.cli("checkpoint")
    with open(p / "f", "ab") as f:        # the first change of the turn captures that mtime
        f.write(b"y\n")
    workspace.cli("checkpoint")
    assert os.stat(workspace.snapshots / "turn-1" / "f").st_mtime_ns == far
    workspace.cli("rollback", "1")
    st = os.stat(p / "f")
    assert (st.st_mtime_ns, st.st_size) == (far, 2)

def test_the_daemon_log_is_not_world_writable(workspace):
    workspace.mount()
    workspace.umount()
    mode = stat.S_IMODE(os.stat(workspace.store / "daemon.log").st_mode)
    assert mode == 0o600, oct(mode)
