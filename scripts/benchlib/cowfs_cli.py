"""Drive the cowfs command line as a black box.

The contract (from the issue; the bench never imports cowfs):
  python -m cowfs mount WORKSPACE              returns once the mount is live
  python -m cowfs checkpoint -C WS -m MSG      prints ``turn-N``
  python -m cowfs rollback -C WS N
  python -m cowfs status -C WS [--json]        --json has ``daemon_pid``
  python -m cowfs umount WORKSPACE
  python -m cowfs export-git -C WS             (issue 4; optional)

The interpreter is ``$COWFS_PYTHON`` or the one running the bench, with the
repository root put first on PYTHONPATH so the checked-out package is used.
Every failure becomes ``CowfsError("error: <first line of stderr>")``.
"""

import contextlib
import json
import os
import re
import signal
import subprocess
import time

from .system import first_line, force_unmount, is_fuse_mounted, shielded, warn


class CowfsError(Exception):
    """A cowfs command failed; str() is the text for the table row."""


class Cowfs:
    def __init__(self, python, repo_root, timeout=300):
        self.argv0 = [python, "-m", "cowfs"]
        self.timeout = timeout
        self.env = dict(os.environ)
        path = [str(repo_root)] + ([self.env["PYTHONPATH"]] if self.env.get("PYTHONPATH") else [])
        self.env["PYTHONPATH"] = os.pathsep.join(path)
        self.daemon_pids = {}  # workspace -> pid, for cleanup of last resort

    def run(self, *args, timeout=None):
        """Run one cowfs command; return (elapsed ms of the whole process, stdout)."""
        argv = self.argv0 + [str(a) for a in args]
        t0 = time.perf_counter()
        try:
            cp = subprocess.run(argv, env=self.env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                timeout=timeout or self.timeout)
        except subprocess.TimeoutExpired:
            raise CowfsError(f"error: cowfs {args[0]} timed out") from None
        elapsed = (time.perf_counter() - t0) * 1000.0
        if cp.returncode != 0:
            detail = first_line(cp.stderr) or f"cowfs {args[0]}: exit status {cp.returncode}"
            raise CowfsError(f"error: {detail}")
        return elapsed, cp.stdout.decode(errors="replace")

    @contextlib.contextmanager
    def checkpoint_client(self, ws):
        """A long-lived Python process that checkpoints *ws* on request, the way a
        harness embedding cowfs would: ``cowfs.Workspace(ws).checkpoint(msg)``, the
        Python API of issue 10 (no interpreter start per checkpoint).  The Workspace
        is made once, as a harness would keep it."""
        code = ("import sys, time\n"
                "import cowfs\n"
                "ws = cowfs.Workspace(sys.argv[1])\n"
                "for line in sys.stdin:\n"
                "    t0 = time.perf_counter()\n"
                "    ws.checkpoint('bench (Python API)')\n"
                "    print((time.perf_counter() - t0) * 1000.0, flush=True)\n")
        proc = subprocess.Popen([self.argv0[0], "-c", code, str(ws)], env=self.env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

        class Client:
            @staticmethod
            def checkpoint():
                proc.stdin.write("go\n")
                proc.stdin.flush()
                line = proc.stdout.readline()
                if not line:
                    raise CowfsError("error: the checkpoint client died")
                return float(line)
        try:
            yield Client
        finally:
            proc.stdin.close()
            proc.wait(timeout=30)

    # ---------------------------------------------------------------- commands

    def mount(self, ws):
        self.run("mount", ws, timeout=120)
        if not is_fuse_mounted(ws):
            raise CowfsError(f"error: `cowfs mount` returned but {ws} is not a FUSE mount")
        try:
            self.daemon_pids[str(ws)] = self.daemon_pid(ws)
        except CowfsError:
            pass

    def checkpoint(self, ws, message):
        """Return (elapsed ms, turn number)."""
        elapsed, out = self.run("checkpoint", "-C", ws, "-m", message)
        m = re.search(r"turn-(\d+)", out)
        if not m:
            raise CowfsError(f"error: checkpoint printed {first_line(out)!r}, expected turn-N")
        return elapsed, int(m.group(1))

    def rollback(self, ws, turn):
        return self.run("rollback", "-C", ws, turn)[0]

    def status(self, ws):
        return self.run("status", "-C", ws)[1]

    def status_json(self, ws):
        out = self.run("status", "-C", ws, "--json")[1]
        try:
            return json.loads(out)
        except ValueError:
            raise CowfsError(f"error: status --json printed {first_line(out)!r}") from None

    def daemon_pid(self, ws):
        try:
            return int(self.status_json(ws)["daemon_pid"])
        except (KeyError, TypeError, ValueError):
            raise CowfsError("error: status --json has no integer daemon_pid") from None

    def export_git(self, ws, *args):
        return self.run("export-git", "-C", ws, *args, timeout=1800)[0]

    def umount(self, ws):
        self.run("umount", ws, timeout=120)

    def availability(self, command):
        """None if ``cowfs COMMAND --help`` works, else the reason it does not."""
        try:
            self.run(command, "--help", timeout=60)
            return None
        except CowfsError as e:
            return str(e).removeprefix("error: ")

    # ---------------------------------------------------------------- lifetime

    @contextlib.contextmanager
    def mounted(self, ws):
        """Mount ``ws``; yield None, or the error text if mounting failed.
        Whatever happens, nothing stays mounted over ``ws`` afterwards."""
        error = None
        try:
            try:
                self.mount(ws)
            except CowfsError as e:
                error = str(e)
            yield error
        finally:
            with shielded():
                self.ensure_unmounted(ws)

    def ensure_unmounted(self, ws):
        pid = self.daemon_pids.pop(str(ws), None)
        if is_fuse_mounted(ws):
            t0 = time.monotonic()
            try:
                self.umount(ws)
            except CowfsError as e:
                warn(f"cowfs umount {ws}: {e}; unmounting it directly")
            if time.monotonic() - t0 > 2:
                warn(f"cowfs umount {ws} took {time.monotonic() - t0:.1f} s")
        if is_fuse_mounted(ws):
            force_unmount(ws)
        if pid:
            _stop_daemon(pid)


def _is_cowfs_process(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"cowfs" in f.read()
    except OSError:
        return False


def _stop_daemon(pid, grace=5.0):
    """The daemon should exit with its mount; if it lingers, stop it by pid."""
    deadline = time.monotonic() + grace
    while _is_cowfs_process(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not _is_cowfs_process(pid):
            return
        warn(f"cowfs daemon {pid} still running after unmount; sending {sig.name}")
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        time.sleep(1.0)
