"""Attribution: which process made each change of the open turn.

Owns the in-memory record of the open turn (the last process to change each
entry and each object, and what each of those processes is) and how it is
kept with the turn when it is sealed. A FUSE request carries its caller's
thread id; what that process is (command, command line, parent, uid) is read
from /proc once per calling thread per turn, when it first changes something,
so a request costs a dictionary store and nothing more. Knows nothing about FUSE.

A write carries no caller, so content is attributed to the process that
opened the file for writing. Attribution of the open turn is lost if the
daemon dies before sealing it (it is not written ahead like the layers).
"""

from dataclasses import dataclass

UNKNOWN = "?"


@dataclass(frozen=True)
class Process:
    """A process as seen when it changed something: thread-group id, parent, uid, command, and
    its ancestors then (parent first, up to init), so "made by X or a descendant of X" can be
    told after every one of them has exited. `started` is its start time (clock ticks after
    boot, 0 if unknown): with the pid, an identity that a later process reusing the pid lacks."""
    pid: int
    ppid: int
    uid: int
    comm: str
    cmdline: str
    ancestors: tuple[int, ...] = ()
    started: int = 0

    def as_dict(self) -> dict:
        return {"pid": self.pid, "ppid": self.ppid, "uid": self.uid, "comm": self.comm,
                "cmdline": self.cmdline, "ancestors": list(self.ancestors), "started": self.started}

    def descends_from(self, pid: int) -> bool:
        """This process is *pid* or was its descendant when it made the change."""
        return self.pid == pid or pid in self.ancestors


def _status(tid: int) -> dict[bytes, str]:
    fields = {}
    with open(f"/proc/{tid}/status", "rb") as f:
        for line in f:
            key, _, value = line.partition(b":")
            if key in (b"Name", b"Tgid", b"PPid"):
                fields[key] = value.strip().decode(errors="replace")
                if len(fields) == 3:
                    break
    return fields


def start_ticks(pid: int) -> int:
    """When process *pid* started, in clock ticks after boot (/proc/PID/stat field 22); 0 if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return int(stat[stat.rindex(b")") + 2:].split()[19])   # the command may hold ") "
    except (OSError, ValueError, IndexError):
        return 0


def read_process(tid: int, uid: int, parents: dict[int, int] | None = None) -> Process:
    """What /proc says of the process of thread *tid* (gone already: what little is known).
    *parents* caches pid -> parent pid for the walk up its ancestors."""
    parents = {} if parents is None else parents
    try:
        fields = _status(tid)
        pid = int(fields.get(b"Tgid", tid))
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read(4096).rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")
    except (OSError, ValueError):
        return Process(tid, 0, uid, UNKNOWN, "")
    ppid = int(fields.get(b"PPid", 0))
    return Process(pid, ppid, uid, fields.get(b"Name", UNKNOWN), cmdline,
                   tuple(_ancestors(ppid, parents)), start_ticks(pid))


def _ancestors(pid: int, parents: dict[int, int]) -> list[int]:
    chain = []
    while pid > 1 and pid not in chain and len(chain) < 64:
        chain.append(pid)
        parent = parents.get(pid)
        if parent is None:
            try:
                parent = parents[pid] = int(_status(pid).get(b"PPid", 0))
            except (OSError, ValueError):
                break
        pid = parent
    return chain


class Attribution:
    """The open turn's writers: entry (parent, name) -> pid, object ino -> pid, pid -> Process."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.entries: dict[tuple[int, bytes], int] = {}
        self.objects: dict[int, int] = {}
        self.processes: dict[int, Process] = {}
        self._tids: dict[int, int] = {}      # caller thread -> its process (pid)
        self._parents: dict[int, int] = {}   # pid -> parent pid, as first read this turn

    def _pid(self, tid: int, uid: int) -> int:
        pid = self._tids.get(tid)
        if pid is None:
            process = read_process(tid, uid, self._parents)
            self.processes.setdefault(process.pid, process)
            pid = self._tids[tid] = process.pid
        return pid

    def copy(self) -> "Attribution":
        """A snapshot of the record, for a reader in another thread."""
        other = Attribution()
        other.entries, other.objects = dict(self.entries), dict(self.objects)
        other.processes = dict(self.processes)
        return other

    def entry(self, parent: int, name: bytes, tid: int, uid: int) -> None:
        self.entries[(parent, name)] = self._pid(tid, uid)

    def object(self, ino: int, tid: int, uid: int) -> None:
        self.objects[ino] = self._pid(tid, uid)

    def entry_writer(self, parent: int, name: bytes) -> Process | None:
        pid = self.entries.get((parent, name))
        return self.processes.get(pid) if pid is not None else None

    def object_writer(self, ino: int) -> Process | None:
        pid = self.objects.get(ino)
        return self.processes.get(pid) if pid is not None else None
