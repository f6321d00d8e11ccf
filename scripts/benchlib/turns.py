"""Row T (issue 13): whole agent turns, the way users feel cowfs.

Real turns an agent makes, with real tools and no network, run three ways in
one run on the same XFS image, each way on a fresh directory of its own:

  shadow git             natively, then a shadow-git checkpoint of the whole
                         tree (GIT_DIR outside it, ``git add -A`` + ``git commit``)
  shadow git, excludes   the same, with the exclude list checkpoint managers of
                         agent harnesses ship (``info/exclude``: .venv/,
                         node_modules/, __pycache__/, build outputs, ...)
  cowfs                  through a cowfs mount, then ``cowfs checkpoint`` (the CLI)

The turns, in order, each ended by its checkpoint (the workspace is the
directory an agent is started in; the project is cloned into it):

  clone     ``git clone`` of a local repository (the Flask sdist, ~230 files)
  install   ``python -m venv .venv`` in the workspace, ``pip install`` of the
            project in editable mode plus pytest and the test extras, from a
            local wheelhouse (``--no-index``)
  test      the project's test suite with pytest
  edit      ``grep -rn``, ``sed -i`` on ten files, ``git status``, ``git diff``
  archive   extract a source archive (the Click sdist) and run its tests
  cleanup   ``rm -rf`` the virtualenv and the caches, ``git checkout -- .``

Each step's result (files cloned, packages installed, pytest's summary, grep
hits, diff stat) is its fingerprint: cowfs must produce the native one, so
doing less work is never faster.  The turns of one repetition run
interleaved (turn 1 in every way, then turn 2, ...), the order of the ways
rotating with the repetition, so drift on this shared machine hits all alike.

The wheelhouse and the two sdists are downloaded once (``pip download``, the
only network use) into $COWFS_BENCH_WHEELHOUSE (default
/var/tmp/cowfs-bench-wheelhouse), outside the repository, and reused.

With $COWFS_BENCH_PROFILE=DIR, the cowfs daemon is sampled by py-spy
($COWFS_BENCH_PYSPY, or py-spy on PATH) for the whole of the cowfs way, and
the folded stacks land in DIR/turns-daemon.folded.

--quick keeps every turn but makes each one small (a venv without pip, filled
by the bench's pip with ``--python``; one small test module per suite), so
that the three ways add about 15 s on a quiet machine.
"""

import hashlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .cowfs_cli import CowfsError
from .results import Row, Variant
from .system import CommandFailed, log, run, timed, warn
from .trees import ShadowGit, git_env

T_MAX_RATIO = 1.10  # issue 13: cowfs's total <= 1.10x the native + shadow-git total

WHEELHOUSE = Path(os.environ.get("COWFS_BENCH_WHEELHOUSE", "/var/tmp/cowfs-bench-wheelhouse"))

PROJECT = ("flask", "3.0.3")   # the cloned repository; its test suite is the test turn's
ARCHIVE = ("click", "8.1.7")   # the source archive the archive turn extracts and tests
# Pinned, so that every run installs and tests the same code.
WHEELS = ["flask==3.0.3", "werkzeug==3.0.3", "jinja2==3.1.4", "itsdangerous==2.2.0",
          "click==8.1.7", "blinker==1.8.2", "markupsafe==2.1.5", "pytest==8.2.2",
          "pluggy==1.5.0", "iniconfig==2.0.0", "packaging==24.1", "flit_core==3.9.0",
          "asgiref==3.8.1", "python-dotenv==1.0.1"]
INSTALL = ["pytest", "asgiref", "python-dotenv"]  # beside `-e ./flask` (and its dependencies)

# What shadow-git checkpoint managers of agent harnesses exclude (their
# info/exclude): dependency trees, virtualenvs, caches, build outputs, secrets.
HARNESS_EXCLUDES = [
    "node_modules/", ".venv/", "venv/", "env/", "__pycache__/", "*.pyc", "*.pyo",
    ".pytest_cache/", ".mypy_cache/", ".ruff_cache/", ".tox/", ".cache/", "*.egg-info/",
    "dist/", "build/", "target/", ".next/", ".nuxt/", "coverage/", "htmlcov/", ".coverage",
    ".git/", ".env", ".env.*", "*.log", ".DS_Store",
]

WAYS = ["shadow git", "shadow git, excludes", "cowfs"]
BASELINES = WAYS[:2]

EDITED_FILES = 10
GREP_NEEDLE = "request"


@dataclass
class Kit:
    """What every turn needs: the tools and inputs, outside the workspaces."""
    python: str          # creates the agent's virtualenv (the bench's interpreter)
    repo: Path           # the local repository the clone turn clones
    wheels: Path         # the wheelhouse
    archive: Path        # the source archive of the archive turn
    env: dict            # environment of every command: no pip config, no index
    quick: bool

    @property
    def project(self):
        return PROJECT[0]

    @property
    def archive_dir(self):
        return f"{ARCHIVE[0]}-{ARCHIVE[1]}"


# ==========================================================================
# preparation (outside every timed part)


def _pip_env():
    """The ordinary pip of this machine, as it is set up, but quiet."""
    env = dict(os.environ)
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def wheelhouse(python):
    """The wheels and sdists, downloaded once into WHEELHOUSE/<hash of the pins>.
    Returns that directory; raises CommandFailed if pip cannot get them."""
    pins = WHEELS + [f"sdist:{n}=={v}" for n, v in (PROJECT, ARCHIVE)]
    key = hashlib.sha256("\n".join(pins + [sys.implementation.cache_tag]).encode()).hexdigest()
    ready = WHEELHOUSE / key[:16]
    if (ready / "READY").exists():
        return ready
    WHEELHOUSE.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="staging-", dir=WHEELHOUSE))
    try:
        log(f"T: downloading the wheelhouse into {ready} (once)")
        pip = [python, "-m", "pip", "download", "-q", "-d"]
        run(pip + [staging / "wheels", "--only-binary", ":all:", *WHEELS], env=_pip_env(),
            timeout=600)
        run(pip + [staging / "sdists", "--no-deps", "--no-binary", ":all:",
                   *(f"{n}=={v}" for n, v in (PROJECT, ARCHIVE))], env=_pip_env(), timeout=600)
        (staging / "READY").write_text("\n".join(pins) + "\n")
        try:
            staging.rename(ready)   # atomic: a concurrent run sees all or nothing
        except OSError:
            if not (ready / "READY").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ready


def _sdist(house, name, version):
    for path in sorted((house / "sdists").iterdir()):
        if path.name.lower().startswith(f"{name}-{version}".lower()) and path.name.endswith(
                (".tar.gz", ".zip")):
            return path
    raise RuntimeError(f"no sdist of {name} {version} in {house / 'sdists'}")


def turn_env(wheels):
    env = git_env()
    for key in list(env):
        if key.startswith(("PIP_", "PYTHON", "VIRTUAL_ENV", "CONDA")):
            del env[key]
    env.update({"PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1",
                "PIP_FIND_LINKS": str(wheels), "PIP_DISABLE_PIP_VERSION_CHECK": "1",
                "PIP_NO_CACHE_DIR": "1", "PIP_NO_INPUT": "1", "PIP_ROOT_USER_ACTION": "ignore",
                "LC_ALL": "C.UTF-8"})
    return env


def make_kit(ctx, python):
    house = wheelhouse(python)
    src = ctx.workdir / "T-src"
    src.mkdir(exist_ok=True)
    run(["tar", "-xzf", _sdist(house, *PROJECT), "-C", src])
    repo = src / f"{PROJECT[0]}-{PROJECT[1]}"
    env = git_env()
    for argv in (["git", "init", "-q"], ["git", "add", "-A"],
                 ["git", "commit", "-q", "-m", f"{PROJECT[0]} {PROJECT[1]}"]):
        run(argv, cwd=repo, env=env)
    return Kit(python=python, repo=repo, wheels=house / "wheels",
               archive=_sdist(house, *ARCHIVE), env=turn_env(house / "wheels"),
               quick=ctx.cfg.quick)


# ==========================================================================
# the turns: each returns its fingerprint


def _sh(kit, argv, cwd, ok=(0,)):
    return run(argv, cwd=cwd, env=kit.env, ok=ok, timeout=900)


def _pytest_summary(cp):
    """'482 passed, 2 skipped' from pytest -q's last line (without the time)."""
    lines = cp.stdout.decode(errors="replace").strip().splitlines()
    last = lines[-1] if lines else ""
    return last.split(" in ")[0].strip("= ")


def count_files(root):
    """Regular files and symlinks below root (what a checkpoint should keep)."""
    n = 0
    for _, dirs, files in os.walk(root):
        n += len(files) + sum(1 for d in dirs if os.path.islink(os.path.join(_, d)))
    return n


def t_clone(ws, kit):
    _sh(kit, ["git", "clone", "-q", kit.repo, kit.project], ws)
    return f"{count_files(ws / kit.project / 'src')} files in src"


def t_install(ws, kit):
    want = ["-e", f"./{kit.project}", *INSTALL]
    if kit.quick:
        # A venv without pip, filled by the bench's pip: what uv-style tools do.
        _sh(kit, [kit.python, "-m", "venv", "--without-pip", ".venv"], ws)
        _sh(kit, [kit.python, "-m", "pip", "--python", ".venv/bin/python", "install", "-q",
                  *want], ws)
    else:
        _sh(kit, [kit.python, "-m", "venv", ".venv"], ws)
        _sh(kit, [".venv/bin/python", "-m", "pip", "install", "-q", *want], ws)
    site = next((ws / ".venv" / "lib").glob("python3*/site-packages"))
    dists = sorted(p.name.split("-")[0].lower() for p in site.glob("*.dist-info"))
    return f"{len(dists)} distributions: {' '.join(dists)}"


def t_test(ws, kit):
    select = ["tests/test_config.py"] if kit.quick else []
    cp = _sh(kit, ["../.venv/bin/python", "-m", "pytest", "-q", *select],
             ws / kit.project)
    return _pytest_summary(cp)


def _edited_files(proj):
    """The ten files the edit turn changes: the package's modules, in name order."""
    mods = sorted(p for p in (proj / "src" / PROJECT[0]).rglob("*.py"))
    return [str(p.relative_to(proj)) for p in mods[:EDITED_FILES]]


def t_edit(ws, kit):
    proj = ws / kit.project
    hits = _sh(kit, ["grep", "-rn", GREP_NEEDLE, "src", "tests"], proj).stdout.count(b"\n")
    files = _edited_files(proj)
    for i, rel in enumerate(files):
        _sh(kit, ["sed", "-i", "-e", f"$a# reviewed by the agent, edit {i}",
                  "-e", "s/^import typing as t$/import typing as t  # noqa/", rel], proj)
    status = _sh(kit, ["git", "status", "--porcelain"], proj).stdout.count(b"\n")
    stat = _sh(kit, ["git", "diff", "--shortstat"], proj).stdout.decode().strip()
    _sh(kit, ["git", "diff"], proj)
    return f"{hits} grep hits; {status} changed in git status; {stat}"


def t_archive(ws, kit):
    _sh(kit, ["tar", "-xzf", kit.archive], ws)
    select = ["tests/test_basic.py"] if kit.quick else ["tests"]
    env_run = dict(kit.env, PYTHONPATH="src")
    cp = run(["../.venv/bin/python", "-m", "pytest", "-q", *select], cwd=ws / kit.archive_dir,
             env=env_run, timeout=900)
    return _pytest_summary(cp)


def t_cleanup(ws, kit):
    _sh(kit, ["rm", "-rf", ".venv", f"{kit.project}/.pytest_cache",
              f"{kit.archive_dir}/.pytest_cache"], ws)
    _sh(kit, ["find", ".", "-name", "__pycache__", "-type", "d", "-prune", "-exec",
              "rm", "-rf", "{}", "+"], ws)
    _sh(kit, ["git", "checkout", "--", "."], ws / kit.project)
    left = _sh(kit, ["git", "status", "--porcelain"], ws / kit.project).stdout.count(b"\n")
    return f"{left} changes left in git status"


TURNS = {"clone": t_clone, "install": t_install, "test": t_test, "edit": t_edit,
         "archive": t_archive, "cleanup": t_cleanup}


# ==========================================================================
# the three ways


def kept_by_git(repo):
    """(blobs, gitlinks) in the shadow repository's HEAD."""
    out = repo.git("ls-tree", "-r", "-z", "HEAD").stdout.split(b"\0")
    links = sum(1 for e in out if e.startswith(b"160000 "))
    return sum(1 for e in out if e) - links, links


class Way:
    """One way of running the turns: a workspace, how it checkpoints, what it keeps."""

    def __init__(self, name, ws):
        self.name, self.ws = name, ws
        if ws is not None:
            ws.mkdir(parents=True, exist_ok=True)
        self.work = {t: Variant(name) for t in TURNS}
        self.checkpoint = {t: Variant(name) for t in TURNS}
        self.kept = {}       # turn -> what the last checkpoint kept (text)
        self.seen = {}       # turn -> set of fingerprints
        self.error = None

    def fail(self, turn, text):
        self.error = self.error or text
        for t in list(TURNS)[list(TURNS).index(turn):]:
            self.work[t].fail(text)
            self.checkpoint[t].fail(text)


class ShadowGitWay(Way):
    def __init__(self, name, ws, git_dir, excludes):
        super().__init__(name, ws)
        self.repo = ShadowGit(git_dir, ws).init()
        if excludes:
            (Path(git_dir) / "info").mkdir(exist_ok=True)
            (Path(git_dir) / "info" / "exclude").write_text("\n".join(excludes) + "\n")

    def do_checkpoint(self, turn):
        return self.repo.commit(f"after {turn}")

    def what_kept(self, turn):
        blobs, links = kept_by_git(self.repo)
        tree = count_files(self.ws)
        text = f"{blobs:,} of {tree:,} files"
        if links:
            text += f" ({links} nested repo as gitlink: none of its files)"
        return {"files": blobs, "tree": tree, "gitlinks": links, "text": text}


class CowfsWay(Way):
    def __init__(self, name, ws, ctx):
        super().__init__(name, ws)
        self.ctx = ctx
        self.requests = {t: [] for t in TURNS}     # FUSE requests, work + checkpoint
        self.handlers = {t: [] for t in TURNS}     # per handler (Counter-like dicts)
        self.cpu_ms = {t: [] for t in TURNS}       # daemon CPU time
        self.pid = None
        self.turn_no = None

    def probe(self):
        """(requests by handler, daemon CPU ms), read outside the timed part."""
        try:
            status = self.ctx.cowfs.status_json(self.ws)
        except CowfsError:
            return None
        counts = {k: v for k, v in (status.get("requests") or {}).items() if k != "from_daemon"}
        return counts, _cpu_ms(status.get("daemon_pid"))

    def do_checkpoint(self, turn):
        ms, self.turn_no = self.ctx.cowfs.checkpoint(self.ws, f"after {turn}")
        return ms

    def what_kept(self, turn):
        tree = count_files(self.ws)
        if self.ctx.cfg.quick:   # the snapshot is not walked: too slow for --quick
            return {"files": tree, "tree": tree, "gitlinks": 0,
                    "text": f"everything ({tree:,} files; snapshot not walked in --quick)"}
        snap = count_files(self.ws / ".snapshots" / f"turn-{self.turn_no}")
        return {"files": snap, "tree": tree, "gitlinks": 0,
                "text": f"{snap:,} of {tree:,} files (counted in .snapshots/turn-{self.turn_no})"}


def _cpu_ms(pid):
    """CPU time of a process (all its live threads) in ms, or None: the schedulers'
    nanosecond counters (/proc/PID/task/*/schedstat), not utime + stime, which
    count in 10 ms ticks."""
    try:
        total = 0
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        return total / 1e6
    except (OSError, ValueError, IndexError, TypeError):
        return None


def run_turn(way, turn, kit):
    """Work, then checkpoint, of one turn in one way; failures mark the way."""
    if way.error:
        return
    before = way.probe() if isinstance(way, CowfsWay) else None
    try:
        work_ms, fingerprint = timed(TURNS[turn], way.ws, kit)
        ckpt_ms = way.do_checkpoint(turn)
    except (CommandFailed, CowfsError) as e:
        return way.fail(turn, str(e))
    except Exception as e:  # noqa: BLE001 - the other ways go on
        warn(f"T {turn} ({way.name}) failed: {type(e).__name__}: {e}")
        return way.fail(turn, f"error: {type(e).__name__}: {e}")
    way.work[turn].add(work_ms)
    way.checkpoint[turn].add(ckpt_ms)
    way.seen.setdefault(turn, set()).add(fingerprint)
    if before is not None:
        after = way.probe()
        if after is not None:
            (c0, cpu0), (c1, cpu1) = before, after
            diff = {k: c1.get(k, 0) - c0.get(k, 0) for k in set(c0) | set(c1)}
            diff = {k: v for k, v in diff.items() if v}
            # the `status` request that read c0 is no FUSE request; nothing to subtract
            way.requests[turn].append(sum(diff.values()))
            way.handlers[turn].append(diff)
            if cpu0 is not None and cpu1 is not None:
                way.cpu_ms[turn].append(cpu1 - cpu0)
    try:
        way.kept[turn] = way.what_kept(turn)
    except Exception as e:  # noqa: BLE001 - only a note
        way.kept[turn] = {"text": f"not counted: {e}"}


# ==========================================================================
# the measurement


def measure_t(ctx):
    reps = ctx.cfg.t_reps
    log(f"T: load average {_load()}")
    cow = Variant("cowfs")
    totals = {name: Variant(name) for name in BASELINES}
    total_row = Row("T/total", "T agent turns, total (work + checkpoints)", cow,
                    [totals[n] for n in BASELINES],
                    f"≤ {T_MAX_RATIO:.2f}× each baseline")
    python = os.path.abspath(ctx.cowfs.argv0[0])  # not resolved: a venv's python is a symlink
    try:
        kit = make_kit(ctx, python)
    except (CommandFailed, OSError, RuntimeError, StopIteration) as e:
        reason = f"not available: wheelhouse or sources: {e}"
        log(f"T: {reason}")
        cow.fail(reason)
        return [total_row.judge(lambda r: False)]
    profile_dir = os.environ.get("COWFS_BENCH_PROFILE")
    ways_by_rep = []
    for rep in range(reps):
        base = ctx.fresh_dir(f"T-{rep}")
        ways = [ShadowGitWay(WAYS[0], base / "git" / "ws", base / "git" / "shadow.git", []),
                ShadowGitWay(WAYS[1], base / "git-excludes" / "ws",
                             base / "git-excludes" / "shadow.git", HARNESS_EXCLUDES),
                CowfsWay(WAYS[2], base / "cowfs", ctx)]
        ways_by_rep.append(ways)
        cowway = ways[2]
        with ctx.cowfs.mounted(cowway.ws) as error:
            if error:
                cowway.fail("clone", error)
            profiler = None
            if not error and profile_dir and rep == 0:
                profiler = start_profiler(ctx, cowway.ws, Path(profile_dir))
            try:
                order = ways[rep % 3:] + ways[:rep % 3]   # rotate who goes first
                for turn in TURNS:
                    log(f"T: repetition {rep + 1}/{reps}: {turn} (load {_load()})")
                    for way in order:
                        run_turn(way, turn, kit)
            finally:
                if profiler:
                    stop_profiler(profiler)
    log(f"T: load average {_load()}")
    return t_rows(ways_by_rep, total_row, totals, cow, reps)


def _load():
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def t_rows(ways_by_rep, total_row, totals, cow, reps):
    merged = {name: Way(name, None) for name in WAYS}
    for ways in ways_by_rep:
        for way in ways:
            m = merged[way.name]
            for t in TURNS:
                for src, dst in ((way.work, m.work), (way.checkpoint, m.checkpoint)):
                    dst[t].samples += src[t].samples
                    if src[t].error:
                        dst[t].fail(src[t].error)
                for fp in way.seen.get(t, ()):
                    m.seen.setdefault(t, set()).add(fp)
                m.kept.setdefault(t, way.kept.get(t))
            if isinstance(way, CowfsWay):
                for attr in ("requests", "handlers", "cpu_ms"):
                    acc = getattr(m, attr, None) or {t: [] for t in TURNS}
                    for t in TURNS:
                        acc[t] += getattr(way, attr)[t]
                    setattr(m, attr, acc)
    # Fingerprints: every way must have seen what shadow git (plain native work) saw.
    for name in WAYS[1:]:
        for t in TURNS:
            theirs, ours = merged[WAYS[0]].seen.get(t), merged[name].seen.get(t)
            if theirs and ours and theirs != ours:
                msg = f"error: {' / '.join(sorted(ours))} vs natively {' / '.join(sorted(theirs))}"
                merged[name].work[t].fail(msg)

    rows = []
    for t in TURNS:
        variants = {}
        for name in WAYS:
            v = Variant(name)
            w, c = merged[name].work[t], merged[name].checkpoint[t]
            if w.error or c.error:
                v.fail(w.error or c.error)
            else:
                v.samples = [a + b for a, b in zip(w.samples, c.samples)]
            variants[name] = v
        row = Row(f"T/{t}", f"T {t} (work + checkpoint)", variants["cowfs"],
                  [variants[n] for n in BASELINES], "—")
        row.extra = {"turn": t,
                     "work": {n: merged[n].work[t].to_json() for n in WAYS},
                     "checkpoint": {n: merged[n].checkpoint[t].to_json() for n in WAYS},
                     "kept": {n: merged[n].kept.get(t) for n in WAYS},
                     "fingerprint": sorted(merged[WAYS[0]].seen.get(t, ())),
                     "requests": merged["cowfs"].requests[t],
                     "daemon_cpu_ms": merged["cowfs"].cpu_ms[t],
                     "handlers": _median_handlers(merged["cowfs"].handlers[t])}
        for n in WAYS:
            w, c = merged[n].work[t], merged[n].checkpoint[t]
            if w.ok and c.ok:
                row.notes[f"{n}: work + checkpoint ms"] = f"{w.median:,.0f} + {c.median:,.0f}"
            row.notes[f"{n}: keeps"] = (merged[n].kept.get(t) or {}).get("text", "—")
        reqs, cpu = merged["cowfs"].requests[t], merged["cowfs"].cpu_ms[t]
        if reqs:
            n = statistics.median(reqs)
            top = sorted(row.extra["handlers"].items(), key=lambda kv: -kv[1])[:4]
            row.notes["cowfs: FUSE requests"] = (f"{n:,.0f} ({', '.join(f'{k} {v:,}' for k, v in top)})")
            if cpu:
                c = statistics.median(cpu)
                row.notes["cowfs: daemon CPU"] = (f"{c:,.0f} ms, {c * 1000 / n:.0f} µs per request"
                                                  if n else f"{c:,.0f} ms")
        if row.extra["fingerprint"]:
            row.notes["result (every way must match)"] = " / ".join(row.extra["fingerprint"])
        rows.append(row.judge(lambda r: True))
        rows[-1].verdict = "-" if rows[-1].verdict == "PASS" else rows[-1].verdict

    # The total: per repetition, the sum over the turns.
    for name, v in [("cowfs", cow)] + list(totals.items()):
        per_rep = []
        for ways in ways_by_rep:
            way = next(w for w in ways if w.name == name)
            if way.error:
                v.fail(way.error)
                break
            per_rep.append(sum(way.work[t].samples[-1] + way.checkpoint[t].samples[-1]
                               for t in TURNS))
        if not v.error:
            v.samples = per_rep
    for r in rows:
        if r.cowfs.error:
            cow.fail(r.cowfs.error)
        for b in r.baselines:
            if b.error:
                totals[b.label].fail(b.error)
    for name in WAYS:
        m = merged[name]
        work = [sum(m.work[t].samples[i] for t in TURNS) for i in range(reps)
                if all(len(m.work[t].samples) > i for t in TURNS)]
        ckpt = [sum(m.checkpoint[t].samples[i] for t in TURNS) for i in range(reps)
                if all(len(m.checkpoint[t].samples) > i for t in TURNS)]
        if work and ckpt:
            total_row.notes[f"{name}: work + checkpoints ms"] = \
                f"{statistics.median(work):,.0f} + {statistics.median(ckpt):,.0f}"
    reqs = [sum(x) for x in zip(*(merged["cowfs"].requests[t] for t in TURNS))]
    cpus = [sum(x) for x in zip(*(merged["cowfs"].cpu_ms[t] for t in TURNS))]
    if reqs:
        total_row.notes["cowfs: FUSE requests"] = statistics.median(reqs)
        if cpus:
            c = statistics.median(cpus)
            total_row.notes["cowfs: daemon CPU"] = \
                f"{c:,.0f} ms, {c * 1000 / statistics.median(reqs):.0f} µs per request"
    total_row.notes["what each way keeps"] = (
        "shadow git: the tree minus nested git repositories (the clone is one gitlink, none "
        "of its files); with excludes also minus the virtualenv, caches and build outputs; "
        "cowfs: everything, every file of every turn")
    total_row.notes["repetitions"] = reps
    total_row.notes["load average (1, 5, 15 min) at the end"] = _load()
    total_row.extra = {"load_end": os.getloadavg()}
    total_row.judge(lambda r: all(r.ratio(b) is not None and r.ratio(b) <= T_MAX_RATIO
                                  for b in r.baselines))
    return rows + [total_row]


def _median_handlers(samples):
    names = set().union(*samples) if samples else set()
    return {k: int(statistics.median(s.get(k, 0) for s in samples)) for k in sorted(names)}


# ==========================================================================
# profiling the daemon (optional)


def start_profiler(ctx, ws, out_dir):
    pyspy = os.environ.get("COWFS_BENCH_PYSPY") or shutil.which("py-spy")
    if not pyspy:
        warn("COWFS_BENCH_PROFILE set but no py-spy (set COWFS_BENCH_PYSPY)")
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    pid = ctx.cowfs.daemon_pid(ws)
    out = out_dir / "turns-daemon.folded"
    proc = subprocess.Popen([pyspy, "record", "--pid", str(pid), "--rate", "200",
                             "--format", "raw", "--nonblocking", "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=open(out_dir / "py-spy.log", "w"))
    time.sleep(1.0)   # py-spy attaches
    log(f"T: py-spy {proc.pid} samples daemon {pid} into {out}")
    return proc


def stop_profiler(proc):
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
