"""Auto-checkpoint: seal the open turn once the mount has been quiet for a while after a change.

Owns the watcher that `cowfs mount --auto-checkpoint SECONDS` starts: a
small process of its own, a client like any other, so that the daemon's
tasks stay the serving of its mount and its control channel. It asks the
daemon how long ago the last change was, seals like `cowfs checkpoint`
when that is SECONDS or more, and exits when the mount's daemon goes away.

    python -m cowfs.autocheckpoint MOUNTPOINT SECONDS DAEMON_PID
"""

import sys
import time

from . import control
from .errors import CowfsError


def watch(mountpoint: str, quiet: float, daemon_pid: int) -> int:
    poll = max(0.2, min(1.0, quiet / 4))
    while True:
        time.sleep(poll)
        try:
            mount = control.find_mount(mountpoint)
            status = control.request(mount, "status", timeout=30, size=False)   # no store walk
            if status["daemon_pid"] != daemon_pid:
                return 0        # another daemon's mount now: its own watcher looks after it
            if status["pending_changes"] and status["quiet_seconds"] >= quiet:
                control.request(mount, "checkpoint", timeout=60,
                                message=f"auto-checkpoint after {quiet:g}s without changes")
        except CowfsError:
            return 0            # unmounted, or the daemon stopped
        except OSError:
            return 0


def main(argv: list[str]) -> int:
    mountpoint, quiet, daemon_pid = argv[0], float(argv[1]), int(argv[2])
    return watch(mountpoint, quiet, daemon_pid)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
