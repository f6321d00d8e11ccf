"""Row R (issue 13, second part): FUSE requests per primitive operation.

The T and C rows say how many requests a workload costs; these rows say which
requests one operation costs, so that every request cowfs could prevent can be
named.  Each operation is done on K fresh objects through one cowfs mount (the
tree is turn 0, written before mounting), and the daemon's per-handler counts
(`cowfs status --json`) before and after are divided by K, less what reading
the counts costs by itself.  The daemon's CPU time per operation (schedstat,
less the same) is noted too.  Diagnostics, except the two operations issue 13
sets a request target for (R_TARGETS).

The operations are done by this process with plain system calls (what `cp`,
`git`, `pip` and `rm` do underneath), so nothing but the operation reaches
the mount.
"""

import os
import shutil

from .cowfs_cli import CowfsError
from .results import Row, Variant
from .system import log
from .turns import _cpu_ms

K = 50          # objects per operation
# Requests per object, issue 13's targets (untar's is judged in row C).
R_TARGETS = {"the same again (cached)": 2.0, "rm -rf of a turn-0 directory, per file": 4.0}
PAYLOAD = b"x" * 4096


def _files(root, name, n=K):
    d = root / name
    d.mkdir(parents=True)
    for i in range(n):
        (d / f"f{i:03d}").write_bytes(PAYLOAD)
    return d


def _new(d, i, data=PAYLOAD):
    fd = os.open(d / f"n{i:03d}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _read(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        while os.read(fd, 1 << 16):
            pass
    finally:
        os.close(fd)


def _write_in_place(path):
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, b"y", 10)
    finally:
        os.close(fd)


def _rewrite_trunc(path):
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, PAYLOAD)
    finally:
        os.close(fd)


def _replace_by_rename(path):
    """What `sed -i` and editors do: write a temporary file, rename it over."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, PAYLOAD)
    finally:
        os.close(fd)
    os.rename(tmp, path)


# name -> (setup in the backing tree before mounting, or None; the operation on object i)
# setup(root) returns the directory; op(d, i) acts on its i-th object.
def operations():
    return {
        "stat of a file not seen yet": ("stat", lambda d, i: os.lstat(d / f"f{i:03d}")),
        "stat of a file seen before": ("stat", lambda d, i: os.lstat(d / f"f{i:03d}")),
        "stat of a name that does not exist": (None, lambda d, i: _missing(d / f"m{i:03d}")),
        "create + write 4 KB + close a new file": (None, lambda d, i: _new(d, i)),
        "stat of that new file": (None, lambda d, i: os.lstat(d / f"n{i:03d}")),
        "create + write + close, each file in a directory of its own": (
            "dirs", lambda d, i: _new(d / f"d{i:03d}", i)),
        "mkdir": (None, lambda d, i: os.mkdir(d / f"d{i:03d}")),
        "open + read + close a file from turn 0": ("read", lambda d, i: _read(d / f"f{i:03d}")),
        "the same again (cached)": ("read", lambda d, i: _read(d / f"f{i:03d}")),
        "1-byte write in place to a file from turn 0": (
            "inplace", lambda d, i: _write_in_place(d / f"f{i:03d}")),
        "O_TRUNC rewrite of a file from turn 0": (
            "trunc", lambda d, i: _rewrite_trunc(d / f"f{i:03d}")),
        "write a temp file + rename over a file from turn 0": (
            "rename", lambda d, i: _replace_by_rename(d / f"f{i:03d}")),
        "chmod of a file from turn 0": ("chmod", lambda d, i: os.chmod(d / f"f{i:03d}", 0o600)),
        "unlink of a file from turn 0": ("unlink", lambda d, i: os.unlink(d / f"f{i:03d}")),
        "unlink of a file created this turn": (None, lambda d, i: os.unlink(d / f"n{i:03d}")),
        "rm -rf of a turn-0 directory, per file": ("rmrf", None),
        "rm -rf of a directory created this turn, per file": (None, None),
    }


def _missing(path):
    try:
        os.lstat(path)
    except FileNotFoundError:
        pass


def measure_r(ctx):
    ws = ctx.fresh_dir("R")
    ops = operations()
    dirs = {}
    for setup in {s for s, _ in ops.values() if s and s != "rmrf"}:
        dirs[setup] = _files(ws, setup)
    dirs["dirs"] = ws / "dirs"
    for i in range(K):
        (ws / "dirs" / f"d{i:03d}").mkdir(parents=True)
    rmrf = ws / "rmrf"
    for sub in range(K // 10):          # 10 files in each of K/10 subdirectories
        _files(rmrf, f"s{sub}", 10)
    rows = []
    with ctx.cowfs.mounted(ws) as error:
        if error:
            v = Variant("cowfs", unit="requests")
            v.fail(error)
            return [Row("R", "R FUSE requests per operation", v, [], "—", verdict="ERROR")]
        ctx.cowfs.checkpoint(ws, "before the operations")
        fresh = ws / "fresh"
        os.mkdir(fresh)
        born = ws / "born"
        os.mkdir(born)
        for i in range(K // 10):
            os.mkdir(born / f"s{i}")
            for j in range(10):
                _new(born / f"s{i}", j)
        log(f"R: {len(ops)} operations on {K} objects each")
        # What reading the counts costs by itself (`cowfs status` asks the mount's root for
        # the control xattr): subtracted from every operation.
        p0 = _probe(ctx, ws)
        p1 = _probe(ctx, ws)
        probe_cost = _diff(p0[0], p1[0]) if p0 and p1 else {}
        probe_cpu = (p1[1] - p0[1]) if p0 and p1 and p0[1] is not None else 0.0
        for title, (setup, op) in ops.items():
            d = dirs.get(setup, fresh)
            before = _probe(ctx, ws)
            if title.startswith("rm -rf of a turn-0"):
                shutil.rmtree(rmrf)
            elif title.startswith("rm -rf of a directory created"):
                shutil.rmtree(born)
            else:
                for i in range(K):
                    op(d, i)
            after = _probe(ctx, ws)
            rows.append(_row(title, before, after, probe_cost, probe_cpu))
    return rows


def _probe(ctx, ws):
    try:
        status = ctx.cowfs.status_json(ws)
    except CowfsError:
        return None
    counts = {k: v for k, v in (status.get("requests") or {}).items() if k != "from_daemon"}
    return counts, _cpu_ms(status.get("daemon_pid"))


def _diff(c0, c1, minus=None):
    minus = minus or {}
    diff = {k: c1.get(k, 0) - c0.get(k, 0) - minus.get(k, 0) for k in set(c0) | set(c1)}
    return {k: n for k, n in diff.items() if n > 0}


def _row(title, before, after, probe_cost, probe_cpu):
    v = Variant("cowfs", unit="requests")
    row = Row(f"R/{title}", f"R {title}", v, [], "—")
    if before is None or after is None:
        v.fail("error: cowfs status --json has no request counts")
        row.verdict = "ERROR"
        return row
    (c0, cpu0), (c1, cpu1) = before, after
    diff = _diff(c0, c1, probe_cost)
    v.add(sum(diff.values()) / K)
    row.notes["requests per object"] = ", ".join(
        f"{k} {n / K:.2f}" for k, n in sorted(diff.items(), key=lambda kv: (-kv[1], kv[0]))) or "none"
    cpu_us = None
    if cpu0 is not None and cpu1 is not None:
        cpu_us = max(0.0, cpu1 - cpu0 - probe_cpu) * 1000 / K
        row.notes["daemon CPU per object"] = f"{cpu_us:.0f} µs"
    row.extra = {"per_object": {k: n / K for k, n in diff.items()}, "daemon_cpu_us": cpu_us}
    if title in R_TARGETS:
        row.target = f"≤ {R_TARGETS[title]:g} requests"
        row.judge(lambda r: v.median <= R_TARGETS[title])
    return row


