"""The mount's watcher: seal after a quiet while (--auto-checkpoint), unmount when idle (--idle-umount).

Owns the small process of its own that `cowfs mount` starts for either option,
a client like any other, so that the daemon's tasks stay the serving of its
mount and its control channel. Every poll is one `activity` request on the
control socket (never a request of the mount itself, which would count as
activity) and a look at /proc:

- auto-checkpoint: when the last change is QUIET seconds old or more and
  something is pending, seal like `cowfs checkpoint`;
- idle unmount: when for IDLE seconds no file was open through the mount, no
  process had its working directory in it, and no request reached it,
  unmount like `cowfs umount` (pending changes become a turn); the
  next mount finds the history as it was. A busy unmount is retried later.

It exits when the mount's daemon goes away.

    python -m cowfs.autocheckpoint MOUNTPOINT QUIET DAEMON_PID [IDLE]     (QUIET 0: none)
"""

import os
import sys
import time

from . import control
from .errors import CowfsError


class Watch:
    def __init__(self, mountpoint: str, quiet: float, daemon_pid: int, idle: float | None):
        self.mountpoint, self.quiet, self.daemon_pid, self.idle = mountpoint, quiet, daemon_pid, idle
        self.mount = control.find_mount(mountpoint)
        self.mount.socket = control.socket_path(self.mount)
        self.requests = None
        self.busy_at = time.monotonic()

    def poll(self) -> bool:
        """One look; False once there is nothing left to watch."""
        if not any(m.mountpoint == self.mountpoint for m in control.cowfs_mounts()):
            moved = control.mount_of_daemon(self.daemon_pid)   # its parent was renamed, say
            if moved is None:
                return False
            self.mountpoint, self.mount = moved.mountpoint, moved
        activity = control.request(self.mount, "activity", timeout=30)
        if activity["daemon_pid"] != self.daemon_pid:
            return False        # another daemon's mount now: its own watcher looks after it
        if self.quiet and activity["pending_changes"] and activity["quiet_seconds"] >= self.quiet:
            control.request(self.mount, "checkpoint", timeout=60,
                            message=f"auto-checkpoint after {self.quiet:g}s without changes")
        return self.idle is None or not self._unmounted_when_idle(activity)

    def _unmounted_when_idle(self, activity: dict) -> bool:
        from . import mounting
        now = time.monotonic()
        if activity["requests"] != self.requests or activity["open_files"] or self._working_inside():
            self.requests, self.busy_at = activity["requests"], now
            return False
        if now - self.busy_at < self.idle:
            return False
        try:
            mounting.unmount(self.mountpoint)
            return True
        except CowfsError:
            self.busy_at = now      # someone came in meanwhile: idle again from now
            return False


    def _working_inside(self) -> bool:
        """A process has its working (or root) directory in the mount. Files open through it the
        daemon counts itself. By device: a process still in the directory underneath (there
        before the mount) has the same path, and does not keep the mount busy."""
        inside = self.mountpoint.rstrip("/") + "/"
        for pid in os.listdir("/proc"):
            if not pid.isdigit() or int(pid) in (self.daemon_pid, os.getpid()):
                continue
            for link in (f"/proc/{pid}/cwd", f"/proc/{pid}/root"):
                try:
                    target = os.readlink(link)
                    if ((target == self.mountpoint or target.startswith(inside))
                            and os.stat(link).st_dev == self.mount.dev):
                        return True
                except OSError:
                    continue        # gone, or another user's
        return False


def watch(mountpoint: str, quiet: float, daemon_pid: int, idle: float | None = None) -> int:
    limits = [t for t in (quiet, idle) if t]
    poll = max(0.2, min(1.0, min(limits) / 4))
    try:
        watcher = Watch(mountpoint, quiet, daemon_pid, idle)
        while True:
            time.sleep(poll)
            if not watcher.poll():
                return 0
    except (CowfsError, OSError):
        return 0            # unmounted, or the daemon stopped


def main(argv: list[str]) -> int:
    mountpoint, quiet, daemon_pid = argv[0], float(argv[1]), int(argv[2])
    idle = float(argv[3]) if len(argv) > 3 else None
    return watch(mountpoint, quiet, daemon_pid, idle)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
