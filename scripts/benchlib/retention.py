"""Retention (issue 9): the store stays bounded under `cowfs mount --keep N`, and a prune lets
the mount's other requests through.

`bench(cowfs, fresh_dir, ...)` (what `scripts/bench --retention` calls):

  1. TURNS turns, each rewriting one 1 MB file of new random data and checkpointing
     (an in-process client, as a harness would), on a workspace mounted with
     `--keep KEEP`: the background prune after each checkpoint must keep the store
     at about KEEP+1 MB (the pre-images of the kept turns' layers and the open
     turn's), measured after unmounting (allocated blocks of `.cowfs/content` and
     `.cowfs/objects`, each inode once), with the catalogue beside it, and as the
     growth of the XFS image's used space (statvfs) since the file was first written.
  2. The same workspace remounted without limits, GROW more turns, then one timed
     `cowfs prune --keep KEEP`, while another thread creates files through the mount
     and notes the slowest one: the prune's batches must not freeze the mount.

Prints the figures and returns them as a dict. Standalone, as root:
`.venv/bin/python scripts/benchlib/retention.py [--quick]` (on an XFS image of its own).
"""

import os
import statistics
import sys
import threading
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "benchlib"

from .cowfs_cli import Cowfs  # noqa: E402
from .system import log, shielded, syncfs, used_bytes  # noqa: E402

MB = 1 << 20


def bench(cowfs: Cowfs, fresh_dir, turns: int = 1000, keep: int = 20, grow: int = 200,
          size: int = MB) -> dict:
    ws = fresh_dir("retention")
    (ws / "data.bin").write_bytes(os.urandom(size))
    syncfs(ws)
    used_before = used_bytes(ws)
    result = {"turns": turns, "keep": keep, "file_bytes": size}
    try:
        cowfs.run("mount", ws, "--keep", str(keep), timeout=120)
        cowfs.daemon_pids[str(ws)] = cowfs.daemon_pid(ws)
        t0 = time.monotonic()
        result["checkpoint_ms"] = _turns(cowfs, ws, turns, size)
        result["turns_s"] = time.monotonic() - t0
        result["sealed_kept"] = _wait_for_oldest(cowfs, ws, keep)
        cowfs.ensure_unmounted(ws)
        result.update(_store_figures(ws))
        syncfs(ws)
        result["xfs_growth_bytes"] = used_bytes(ws) - used_before
        result.update(_timed_prune(cowfs, ws, keep, grow, size))
    finally:
        with shielded():
            cowfs.ensure_unmounted(ws)
    _print(result)
    return result


def _turns(cowfs, ws: Path, turns: int, size: int) -> dict:
    """*turns* turns of a rewrite of data.bin; the checkpoints' latency (ms: median, p99)."""
    times = []
    with cowfs.checkpoint_client(ws) as client:
        for _ in range(turns):
            (ws / "data.bin").write_bytes(os.urandom(size))
            times.append(client.checkpoint())
    times.sort()
    return {"median": statistics.median(times), "p99": times[int(len(times) * 0.99)]}


def _wait_for_oldest(cowfs, ws, keep, timeout=60.0) -> int:
    """Wait until the background prune caught up with the last seal; the sealed turns kept."""
    deadline = time.monotonic() + timeout
    while True:
        status = cowfs.status_json(ws)
        kept = status["last_turn"] - status["oldest_turn"] + 1
        if kept <= keep or time.monotonic() > deadline:
            return kept
        time.sleep(0.1)


def _store_figures(ws: Path) -> dict:
    seen, blocks = set(), 0
    for sub in ("content", "objects"):
        for root, dirs, files in os.walk(ws / ".cowfs" / sub):
            for name in dirs + files:
                st = os.lstat(os.path.join(root, name))
                if st.st_ino not in seen:
                    seen.add(st.st_ino)
                    blocks += st.st_blocks
    catalogue = sum(os.path.getsize(ws / ".cowfs" / name) for name in os.listdir(ws / ".cowfs")
                    if name.startswith("catalogue.db"))
    return {"store_bytes": blocks * 512, "store_files": len(seen), "catalogue_bytes": catalogue}


def _timed_prune(cowfs, ws: Path, keep: int, grow: int, size: int) -> dict:
    cowfs.mount(ws)
    unlimited = _turns(cowfs, ws, grow, size)
    probe = _Probe(ws / "probe")
    probe.start()
    try:
        elapsed, out = cowfs.run("prune", "-C", ws, "--keep", str(keep), timeout=600)
    finally:
        probe.stop()
    return {"checkpoint_ms_unlimited": unlimited, "prune_turns": grow, "prune_ms": elapsed, "prune_output": out.strip(),
            "probe_creates": probe.count, "probe_max_ms": probe.worst * 1000.0}


class _Probe(threading.Thread):
    """Creates and removes small files through the mount until stopped; the slowest one."""

    def __init__(self, directory: Path):
        super().__init__(daemon=True)
        directory.mkdir()
        self.directory, self.count, self.worst = directory, 0, 0.0
        self._stop_event = threading.Event()

    def run(self):
        while not self._stop_event.is_set():
            path = self.directory / f"f{self.count}"
            t0 = time.perf_counter()
            path.write_bytes(b"x")
            path.unlink()
            self.worst = max(self.worst, time.perf_counter() - t0)
            self.count += 1

    def stop(self):
        self._stop_event.set()
        self.join()


def _print(r: dict) -> None:
    log(f"retention: {r['turns']} turns of a {r['file_bytes'] // MB} MB rewrite with --keep "
        f"{r['keep']}: {r['turns_s']:.1f} s; {r['sealed_kept']} sealed turns kept; checkpoint "
        f"{r['checkpoint_ms']['median']:.2f} ms median, {r['checkpoint_ms']['p99']:.2f} ms p99 "
        f"(without limits: {r['checkpoint_ms_unlimited']['median']:.2f} / "
        f"{r['checkpoint_ms_unlimited']['p99']:.2f} ms)")
    log(f"retention: store {r['store_bytes'] / MB:.1f} MB in {r['store_files']} files "
        f"(+ catalogue {r['catalogue_bytes'] / 1024:.0f} KiB); XFS used space grew "
        f"{r['xfs_growth_bytes'] / MB:.1f} MB (beyond the live file, which was there before)")
    log(f"retention: `cowfs prune --keep {r['keep']}` of {r['prune_turns']} turns: "
        f"{r['prune_ms']:.0f} ms ({r['prune_output']}); meanwhile {r['probe_creates']} creates "
        f"through the mount, the slowest {r['probe_max_ms']:.1f} ms")


def main(argv=None) -> int:
    import argparse
    import tempfile
    from .system import install_signal_handlers, xfs_image
    p = argparse.ArgumentParser(description="retention bench (see the module docstring)")
    p.add_argument("--quick", action="store_true", help="100 turns instead of 1,000")
    args = p.parse_args(argv)
    install_signal_handlers()
    repo = Path(__file__).resolve().parent.parent.parent
    cowfs = Cowfs(os.environ.get("COWFS_PYTHON") or sys.executable, repo)
    workdir = Path(tempfile.mkdtemp(prefix="cowfs-retention-"))
    try:
        with xfs_image(workdir, 8) as xfs:
            def fresh_dir(name):
                (xfs / name).mkdir()
                return xfs / name
            bench(cowfs, fresh_dir, turns=100 if args.quick else 1000,
                  grow=50 if args.quick else 200)
    finally:
        with shielded():
            import shutil
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
