"""Measurements A-E of issue 3 and the export-git comparison of issue 4.

Each ``measure_*`` function takes a Context and returns table Rows.  Inside a
measurement the cowfs variant and the baselines run on their own fresh
directories of the same XFS image; a failing cowfs command only marks its
variant ("error: <first line of stderr>"), the baselines still run.

Trees that a cowfs variant starts from are written directly on XFS before
``cowfs mount`` (they are turn 0), so set-up does not go through FUSE; only
the work being measured does.
"""

import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from .cowfs_cli import CowfsError
from .results import Row, Variant, attempt, geomean
from .system import log, run, syncfs, timed, timed_run, used_bytes
from .requests import measure_r
from .turns import measure_t
from .trees import (
    ShadowGit, file_bytes, git_env, make_git_repo, make_tree, mixed_change,
    reflink_copy, reverted, rewrite_files, stdlib_tarball, tree_path, write_big_file,
    write_file,
)

MiB = 1 << 20

# Targets, from issue 3 (B, D), issue 4 (export-git), and as issue 13 revised them (A, C, E):
# C's times are diagnostics (row T judges the speed users feel), C's untar judged by requests.
A_MAX_ABOVE_PYTHON_MS = 10.0    # `cowfs checkpoint` ≤ `python -c pass` + this, same run
A_API_MAX_MS = 1.0              # checkpoint through the Python API (issue 10)
B_MAX_ADDED_MS = 5.0
B_MAX_GROWTH_MIB = 2.0
C_UNTAR_MAX_REQUESTS = 13.0     # per file
D_MAX_RSS_MB = 200.0
E_MIN_SPEEDUP_VS_GIT = 2.0
X_MIN_SPEEDUP = 10.0

TURN_FILES = 10  # files changed by the turn before each checkpoint (A, export)


@dataclass
class Config:
    quick: bool
    sizes: list          # A tree sizes
    reps: int            # A, B, E repetitions
    c_reps: int
    c_stdlib_tests: bool  # the stdlib's own test package in C's tarball
    b_bytes: int
    c_repo_files: int
    d_files: int
    d_turns: int
    e_files: int
    e_changes: int
    x_files: int
    x_turns: int
    image_gib: int
    t_reps: int = 1      # repetitions of the agent turns (row T)

    @classmethod
    def preset(cls, quick):
        """The full run of issue 3, or the --quick one (1,000-file trees,
        100 MiB file, stdlib without its test package, fewer repetitions)."""
        if quick:
            return cls(quick=True, sizes=[1_000], reps=3, c_reps=1, c_stdlib_tests=False,
                       b_bytes=100 * MiB, c_repo_files=1_000, d_files=1_000, d_turns=20,
                       e_files=1_000, e_changes=100, x_files=1_000, x_turns=10, image_gib=8,
                       t_reps=1)
        return cls(quick=False, sizes=[1_000, 20_000, 100_000], reps=5, c_reps=3,
                   c_stdlib_tests=True, b_bytes=1 << 30, c_repo_files=20_000,
                   d_files=100_000, d_turns=1_000, e_files=20_000, e_changes=1_000,
                   x_files=20_000, x_turns=100, image_gib=64, t_reps=3)


class Context:
    """What every measurement needs: config, cowfs driver, the XFS mount."""

    def __init__(self, cfg, cowfs, xfs, workdir):
        self.cfg = cfg
        self.cowfs = cowfs
        self.xfs = Path(xfs)
        self.workdir = Path(workdir)
        self._tarball = None

    def fresh_dir(self, name):
        path = self.xfs / name
        path.mkdir()
        return path

    def stdlib_tarball(self):
        if self._tarball is None:
            self._tarball = stdlib_tarball(self.workdir / "stdlib.tar",
                                           with_tests=self.cfg.c_stdlib_tests)
            log(f"stdlib tarball: {self._tarball[1]:,} files")
        return self._tarball


def python_startup_ms(python, runs=10):
    """The floor under any `python -m cowfs ...` command on this machine."""
    return statistics.median(timed_run([python, "-c", "pass"]) for _ in range(runs))


# ==========================================================================
# A: checkpoint after a 10-file turn


def measure_a(ctx):
    python = ctx.cowfs.argv0[0]
    floor = python_startup_ms(python)
    rows = [row for n in ctx.cfg.sizes for row in checkpoint_rows(ctx, n, floor)]
    rows[0].notes[f"`{python} -c pass` ms (the floor under any cowfs command)"] = floor
    return rows


def checkpoint_rows(ctx, nfiles, floor):
    """The CLI row (issue 13: ≤ *floor*, `python -c pass` measured in this run, + 10 ms) and
    the Python API row (issue 10: `cowfs.Workspace(path).checkpoint(msg)` from a running
    process; issue 13: ≤ 1 ms, flat in the tree size)."""
    base = ctx.fresh_dir(f"A-{nfiles}")
    cow, git, cp = Variant("cowfs"), Variant("shadow git"), Variant("cp --reflink")
    api = Variant("cowfs")
    limit = floor + A_MAX_ABOVE_PYTHON_MS
    target = f"≤ `python -c pass` + {A_MAX_ABOVE_PYTHON_MS:g} ms ({limit:.1f} ms)"
    row = Row(f"A/{nfiles}", f"A checkpoint, {nfiles:,} files", cow, [git, cp], target)
    api_row = Row(f"A-api/{nfiles}", f"A checkpoint via the Python API, {nfiles:,} files", api,
                  [git, cp], f"≤ {A_API_MAX_MS:g} ms")
    log(f"A: {nfiles:,} files: cowfs")
    attempt(cow, a_cowfs, ctx, base / "cowfs", nfiles, cow, api)
    if cow.error and not api.samples:
        api.fail(cow.error)
    log(f"A: {nfiles:,} files: shadow git")
    attempt(git, a_shadow_git, ctx, base, nfiles, git, row.notes, show_traceback=True)
    log(f"A: {nfiles:,} files: cp -r --reflink=always")
    attempt(cp, a_cp_reflink, ctx, base / "native", base, cp, show_traceback=True)

    return [row.judge(lambda r: cow.median <= limit),
            api_row.judge(lambda r: api.median <= A_API_MAX_MS)]


def a_cowfs(ctx, ws, nfiles, v, api):
    make_tree(ws, nfiles)
    with ctx.cowfs.mounted(ws) as error:
        if error:
            return v.fail(error)
        for rep in range(ctx.cfg.reps):
            rewrite_files(ws, nfiles, TURN_FILES, version=rep + 1)
            ms, _turn = ctx.cowfs.checkpoint(ws, f"bench turn {rep + 1}")
            v.add(ms)
        with ctx.cowfs.checkpoint_client(ws) as client:
            for rep in range(ctx.cfg.reps):
                rewrite_files(ws, nfiles, TURN_FILES, version=100 + rep)
                api.add(client.checkpoint())


def a_shadow_git(ctx, base, nfiles, v, notes):
    tree = make_tree(base / "native", nfiles)
    repo = ShadowGit(base / "shadow.git", tree).init()
    notes["shadow git first commit ms"] = repo.commit("initial")
    for rep in range(ctx.cfg.reps):
        rewrite_files(tree, nfiles, TURN_FILES, version=rep + 1)
        v.add(repo.commit())


def a_cp_reflink(ctx, tree, base, v):
    for rep in range(ctx.cfg.reps):
        v.add(timed_run(["cp", "-r", "--reflink=always", tree, base / f"copy-{rep}"]))


# ==========================================================================
# B: first 1-byte in-place write to a big file in a fresh turn


def one_byte_write(path, offset):
    """open O_WRONLY, pwrite 1 byte, close; elapsed ms."""
    def write():
        fd = os.open(path, os.O_WRONLY)
        try:
            os.pwrite(fd, b"\xa5", offset)
        finally:
            os.close(fd)
    return timed(write)[0]


def b_offsets(size, reps):
    """Unaligned offsets around the middle, a different one per repetition."""
    return [size // 2 + rep * MiB + 777 for rep in range(reps)]


def measure_b(ctx):
    size = ctx.cfg.b_bytes
    label = f"{size / (1 << 30):g} GiB" if size >= 1 << 30 else f"{size // MiB} MiB"
    lat_cow, lat_nat = Variant("cowfs"), Variant("native")
    grow_cow, grow_nat = Variant("cowfs", unit="MiB"), Variant("native", unit="MiB")
    latency = Row("B/write", f"B first 1-byte write to a {label} file in a turn", lat_cow,
                  [lat_nat], f"≤ {B_MAX_ADDED_MS:g} ms added")
    growth = Row("B/store", "B store growth from that write (statvfs)", grow_cow, [grow_nat],
                 f"≤ {B_MAX_GROWTH_MIB:g} MiB")
    log(f"B: native write to {label} file")
    attempt(lat_nat, b_native, ctx, ctx.fresh_dir("B-native") / "big.bin", lat_nat, grow_nat,
            show_traceback=True)
    log(f"B: cowfs write to {label} file")
    attempt(lat_cow, b_cowfs, ctx, ctx.fresh_dir("B-cowfs"), lat_cow, grow_cow, latency.notes)
    for lat, grow in ((lat_nat, grow_nat), (lat_cow, grow_cow)):
        if lat.error:
            grow.fail(lat.error)
    if lat_cow.ok and lat_nat.ok:
        added = lat_cow.median - lat_nat.median
        latency.notes["added ms"] = added
        latency.ratio_note = f"{added:+.2f} ms"
    if grow_cow.ok and grow_nat.ok:
        growth.ratio_note = f"{grow_cow.median - grow_nat.median:+.2f} MiB"
    latency.judge(lambda r: lat_cow.median - lat_nat.median <= B_MAX_ADDED_MS)
    growth.judge(lambda r: grow_cow.median <= B_MAX_GROWTH_MIB)
    return [latency, growth]


def b_native(ctx, path, lat, grow):
    write_big_file(path, ctx.cfg.b_bytes)
    for offset in b_offsets(ctx.cfg.b_bytes, ctx.cfg.reps):
        syncfs(ctx.xfs)
        before = used_bytes(ctx.xfs)
        lat.add(one_byte_write(path, offset))
        syncfs(ctx.xfs)
        grow.add((used_bytes(ctx.xfs) - before) / MiB)


def b_cowfs(ctx, ws, lat, grow, notes):
    path = ws / "big.bin"
    write_big_file(path, ctx.cfg.b_bytes)
    seal_ms = []
    with ctx.cowfs.mounted(ws) as error:
        if error:
            return lat.fail(error)
        ctx.cowfs.checkpoint(ws, "before the first write")  # a fresh, empty turn
        for offset in b_offsets(ctx.cfg.b_bytes, ctx.cfg.reps):
            syncfs(ctx.xfs)
            before = used_bytes(ctx.xfs)
            lat.add(one_byte_write(path, offset))
            # The checkpoint syncs the mount, so a capture deferred by the
            # kernel's writeback cache has happened before we count blocks;
            # it also opens the fresh turn for the next repetition.
            seal_ms.append(ctx.cowfs.checkpoint(ws, "after one write")[0])
            syncfs(ctx.xfs)
            grow.add((used_bytes(ctx.xfs) - before) / MiB)
    notes["checkpoint after the write ms (median)"] = statistics.median(seal_ms)


# ==========================================================================
# C: agent-like work through the mount vs directly on XFS

GREP_NEEDLE = "NotImplementedError"  # a few hundred matches in the stdlib


# Each step returns (ms, fingerprint).  The fingerprint says what the step
# saw or produced (files found, matching lines, bytes read, .pyc files written);
# the cowfs one must equal the native one, so doing less work is not faster.

def c_untar(work, tarball, _nfiles):
    (work / "src").mkdir(parents=True)
    return timed_run(["tar", "-xf", tarball, "-C", "src"], cwd=work), None


def c_grep(work, _tarball, _nfiles):
    ms, cp = timed(run, ["grep", "-r", "-F", GREP_NEEDLE, "src"], cwd=work, ok=(0, 1))
    return ms, f"{len(cp.stdout.splitlines())} matching lines"


def c_find(work, _tarball, nfiles):
    ms, cp = timed(run, "find src -type f | wc -l", cwd=work)
    found = int(cp.stdout)
    if found != nfiles:
        raise RuntimeError(f"find saw {found:,} files, the tarball has {nfiles:,}")
    return ms, None


def c_git_status(work, _tarball, _nfiles):
    repo, env = work.parent / "repo", git_env()
    run(["git", "status"], cwd=repo, env=env)  # first run refreshes the index
    ms, cp = timed(run, ["git", "status"], cwd=repo, env=env)
    return ms, cp.stdout.decode(errors="replace").strip().splitlines()[-1]


def c_compileall(work, _tarball, _nfiles):
    # exit status 1: the test suite has files with deliberate syntax errors
    ms = timed_run([sys.executable, "-m", "compileall", "-q", "src"], cwd=work, ok=(0, 1))
    pyc = sum(name.endswith(".pyc") for _, _, names in os.walk(work / "src") for name in names)
    return ms, f"{pyc} .pyc files"


def c_reread(work, _tarball, _nfiles):
    cat_all = "find src -type f -print0 | xargs -0 cat | wc -c"
    run(cat_all, cwd=work)  # first read
    ms, cp = timed(run, cat_all, cwd=work)
    return ms, f"{int(cp.stdout):,} bytes"


def c_rm(work, _tarball, _nfiles):
    ms = timed_run(["rm", "-rf", "src"], cwd=work)
    if (work / "src").exists():
        raise RuntimeError("rm -rf left src behind")
    return ms, None


# In the order they run; re-read comes before rm -rf removes the tree.
C_STEPS = {"untar": c_untar, "grep -r": c_grep, "find": c_find, "git status": c_git_status,
           "compileall": c_compileall, "re-read": c_reread, "rm -rf": c_rm}
C_REREAD = "re-read"


def measure_c(ctx):
    tarball, nfiles = ctx.stdlib_tarball()
    native_root, ws = ctx.fresh_dir("C-native"), ctx.fresh_dir("C-cowfs")
    log(f"C: {ctx.cfg.c_repo_files:,}-file git repository")
    make_git_repo(native_root / "repo", ctx.cfg.c_repo_files)
    reflink_copy(native_root / "repo", ws / "repo")
    native = {op: Variant("native") for op in C_STEPS}
    cow = {op: Variant("cowfs") for op in C_STEPS}
    seen = {"native": {}, "cowfs": {}}
    requests = {}  # op -> [FUSE requests the daemon answered during it]
    with ctx.cowfs.mounted(ws) as error:
        if error:
            for v in cow.values():
                v.fail(error)
        for rep in range(ctx.cfg.c_reps):  # interleaved, so drift hits both alike
            log(f"C: repetition {rep + 1}/{ctx.cfg.c_reps}: native")
            agent_work(native_root / f"run-{rep}", tarball, nfiles, native, seen["native"],
                       show_traceback=True)
            if not error:
                log(f"C: repetition {rep + 1}/{ctx.cfg.c_reps}: cowfs")
                agent_work(ws / f"run-{rep}", tarball, nfiles, cow, seen["cowfs"],
                           requests=(lambda: fuse_requests(ctx, ws), requests))
    compare_fingerprints(seen, cow)
    rows = c_rows(native, cow)
    rows[0].notes.update({"stdlib files": nfiles, "git status repo files": ctx.cfg.c_repo_files})
    for row in rows:
        op = row.key.removeprefix("C/")
        if requests.get(op):
            n = statistics.median(requests[op])
            files, what = ((ctx.cfg.c_repo_files, "repository file") if op == "git status"
                           else (nfiles, "stdlib file"))
            passes = " (both passes)" if op == C_REREAD else ""
            row.notes["FUSE requests (cowfs)"] = f"{n:,.0f}{passes}: {n / files:.1f} per {what}"
            if op == "untar":
                row.target = f"≤ {C_UNTAR_MAX_REQUESTS:g} FUSE requests per file (time: diagnostic)"
                row.judge(lambda r, per_file=n / files: per_file <= C_UNTAR_MAX_REQUESTS)
    for row in rows:
        fingerprints = seen["native"].get(row.key.removeprefix("C/"), {None}) - {None}
        if fingerprints:
            row.notes["native result (cowfs must match)"] = _seen(fingerprints)
    return rows


def agent_work(work, tarball, nfiles, variants, seen, show_traceback=False, requests=None):
    """Run every C step in *work*; with *requests* = (counter, per-op lists), also
    record how many FUSE requests each step cost (read outside the timed part)."""
    for op, step in C_STEPS.items():
        before = requests[0]() if requests else None
        result = attempt(variants[op], step, work, tarball, nfiles,
                         show_traceback=show_traceback)
        if result is not None:
            ms, fingerprint = result
            variants[op].add(ms)
            seen.setdefault(op, set()).add(fingerprint)
            after = requests[0]() if requests and before is not None else None
            if after is not None:
                requests[1].setdefault(op, []).append(after - before)


def fuse_requests(ctx, ws):
    """How many FUSE requests the daemon of *ws* has answered, or None if it does not say."""
    try:
        counts = ctx.cowfs.status_json(ws).get("requests")
    except CowfsError:
        return None
    return sum(counts.values()) if isinstance(counts, dict) else None


def compare_fingerprints(seen, cow):
    for op, native_seen in seen["native"].items():
        cow_seen = seen["cowfs"].get(op)
        if cow_seen and cow_seen != native_seen:
            cow[op].fail(f"error: {_seen(cow_seen)} through the mount,"
                         f" {_seen(native_seen)} natively")


def _seen(fingerprints):
    return " / ".join(sorted(map(str, fingerprints)))


def c_rows(native, cow):
    """Diagnostics: their ratios, no verdict (issue 13: row T judges)."""
    rows = [Row(f"C/{op}", f"C {op}", cow[op], [native[op]], "—") for op in C_STEPS]
    ratios = [r.ratio(r.baselines[0]) for r in rows if r.key != f"C/{C_REREAD}"]
    mean = Variant("cowfs", unit="×")
    if all(x is not None for x in ratios):
        mean.add(geomean(ratios))
    else:
        mean.fail("error: not every operation has a ratio")
    rows.append(Row("C/geomean", "C geometric mean of the ratios (without re-read)", mean, [], "—"))
    return rows


# ==========================================================================
# D: daemon memory


def rss_mb(pid):
    """(VmRSS, VmHWM) of a process, in MB (10^6 bytes)."""
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return tuple(int(fields[k].split()[0]) * 1024 / 1e6 for k in ("VmRSS", "VmHWM"))


def measure_d(ctx):
    nfiles, turns = ctx.cfg.d_files, ctx.cfg.d_turns
    rss = Variant("cowfs", unit="MB")
    row = Row("D", f"D daemon RSS after {nfiles:,} lookups + {turns:,} checkpoints", rss, [],
              f"≤ {D_MAX_RSS_MB:g} MB")
    log(f"D: {nfiles:,} files, {turns:,} checkpoints")
    attempt(rss, d_cowfs, ctx, ctx.fresh_dir("D-cowfs"), nfiles, turns, rss, row.notes)
    return [row.judge(lambda r: rss.median <= D_MAX_RSS_MB)]


def d_cowfs(ctx, ws, nfiles, turns, rss, notes):
    make_tree(ws, nfiles)
    with ctx.cowfs.mounted(ws) as error:
        if error:
            return rss.fail(error)
        notes["RSS after mount MB"] = rss_mb(ctx.cowfs.daemon_pid(ws))[0]
        ms, cp = timed(run, ["find", ".", "-type", "f", "-printf", "%s %m\n"], cwd=ws)
        seen = cp.stdout.count(b"\n")
        if seen < nfiles:
            raise RuntimeError(f"find saw {seen:,} files, the tree has {nfiles:,}")
        notes["find + stat ms"] = ms
        notes["RSS after lookups MB"] = rss_mb(ctx.cowfs.daemon_pid(ws))[0]
        times = []
        for t in range(turns):
            i = t % nfiles
            write_file(ws / tree_path(i), file_bytes(i, t + 1))
            times.append(ctx.cowfs.checkpoint(ws, f"turn {t + 1}")[0])
        notes["checkpoint ms, first 10 turns (median)"] = statistics.median(times[:10])
        notes["checkpoint ms, last 10 turns (median)"] = statistics.median(times[-10:])
        now, peak = rss_mb(ctx.cowfs.daemon_pid(ws))
        notes["VmHWM MB"] = peak
        rss.add(now)


# ==========================================================================
# E: rollback


def measure_e(ctx):
    nfiles, changes = ctx.cfg.e_files, ctx.cfg.e_changes
    cow, git = Variant("cowfs"), Variant("shadow git")
    row = Row("E", f"E rollback of {changes:,} changed files ({nfiles:,}-file tree)", cow, [git],
              f"≥ {E_MIN_SPEEDUP_VS_GIT:g}× faster than shadow git")
    base = ctx.fresh_dir("E")
    log(f"E: cowfs rollback of {changes:,} files")
    attempt(cow, e_cowfs, ctx, base / "cowfs", nfiles, changes, cow)
    log(f"E: shadow git checkout + clean of {changes:,} files")
    attempt(git, e_shadow_git, ctx, base, nfiles, changes, git, show_traceback=True)
    return [row.judge(lambda r: git.median / cow.median >= E_MIN_SPEEDUP_VS_GIT)]


def e_cowfs(ctx, ws, nfiles, changes, v):
    make_tree(ws, nfiles)
    with ctx.cowfs.mounted(ws) as error:
        if error:
            return v.fail(error)
        for rep in range(ctx.cfg.reps):
            _ms, turn = ctx.cowfs.checkpoint(ws, f"clean state {rep + 1}")
            change = mixed_change(ws, nfiles, changes, version=rep + 1)
            ms = ctx.cowfs.rollback(ws, turn)
            if not reverted(ws, change):
                raise CowfsError(f"error: rollback to turn-{turn} did not restore the files")
            v.add(ms)


def e_shadow_git(ctx, base, nfiles, changes, v):
    tree = make_tree(base / "native", nfiles)
    repo = ShadowGit(base / "shadow.git", tree).init()
    repo.commit("clean state")
    for rep in range(ctx.cfg.reps):
        change = mixed_change(tree, nfiles, changes, version=rep + 1)
        ms = repo.restore()
        if not reverted(tree, change):
            raise RuntimeError("git checkout + clean did not restore the files")
        v.add(ms)


# ==========================================================================
# export-git (issue 4): only if the command exists


def measure_export_git(ctx):
    """Export of T turns x 10 changed files on an N-file workspace, against the
    shadow-git way (add -A + commit per turn, summed).  Skipped, with
    "not available: <reason>", while `cowfs export-git --help` fails."""
    nfiles, turns = ctx.cfg.x_files, ctx.cfg.x_turns
    cow, git = Variant("cowfs"), Variant("shadow git")
    row = Row("X", f"X export-git, {turns} turns × {TURN_FILES} files ({nfiles:,} files)", cow,
              [git], f"≥ {X_MIN_SPEEDUP:g}× faster than shadow git")
    reason = ctx.cowfs.availability("export-git")
    if reason:
        log(f"X: export-git: not available: {reason}")
        cow.fail(f"not available: {reason}")
        return [row.judge(lambda r: False)]
    base = ctx.fresh_dir("X")
    log(f"X: cowfs export-git of {turns} turns")
    attempt(cow, x_cowfs, ctx, base / "cowfs", nfiles, turns, cow)
    log(f"X: shadow git, {turns} commits")
    attempt(git, x_shadow_git, ctx, base, nfiles, turns, git, show_traceback=True)
    return [row.judge(lambda r: git.median / cow.median >= X_MIN_SPEEDUP)]


def x_cowfs(ctx, ws, nfiles, turns, v):
    make_tree(ws, nfiles)
    with ctx.cowfs.mounted(ws) as error:
        if error:
            return v.fail(error)
        # Like for like: shadow git's first commit (the whole tree) is not timed,
        # so neither is the export of turn 0 (the whole tree).
        ctx.cowfs.export_git(ws)
        for t in range(turns):
            rewrite_files(ws, nfiles, TURN_FILES, version=t + 1)
            ctx.cowfs.checkpoint(ws, f"turn {t + 1}")
        v.add(ctx.cowfs.export_git(ws))


def x_shadow_git(ctx, base, nfiles, turns, v):
    tree = make_tree(base / "native", nfiles)
    repo = ShadowGit(base / "shadow.git", tree).init()
    repo.commit("turn 0")
    total = 0.0
    for t in range(turns):
        rewrite_files(tree, nfiles, TURN_FILES, version=t + 1)
        total += repo.commit(f"turn {t + 1}")
    v.add(total)


MEASUREMENTS = {"T": measure_t, "A": measure_a, "B": measure_b, "C": measure_c, "D": measure_d,
                "E": measure_e, "X": measure_export_git, "R": measure_r}
