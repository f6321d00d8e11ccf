"""Who the agent is, and what a safe restore therefore reverts.

Owns the record of the agent kept in the workspace's store (every harness
session that used it, as pid plus process start time; the ledger of the
files the harness's write tools recorded, with their digest and writer) and
the rule that classifies a change as the agent's or the user's:

- made by a process *descended from* a harness session (a terminal command:
  `sed -i`, `pip install`, `rm -rf`), whatever the ledger says;
- or recorded in the ledger, no other process having changed it since (its
  last writer is the recorded one or a harness session itself) and its
  content still the recorded one (or the file gone);
- anything else is the user's, including what a harness process wrote itself
  without recording it.

With no ledger and no change by a descendant there is nothing to tell the
agent by: the plan says `full`, and the caller restores everything. Because
the record lives in the store, a new harness process (a restart, a gateway)
classifies earlier sessions' changes as they would have.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from .attribution import Process, start_ticks


@dataclass(frozen=True)
class Identity:
    """A process, told apart from a later one with the same pid by its start time."""
    pid: int
    started: int

    @classmethod
    def of(cls, pid: int) -> Identity:
        return cls(pid, start_ticks(pid))

    def made(self, process: Process) -> bool:
        return process.pid == self.pid and process.started in (self.started, 0)

    def is_ancestor_of(self, process: Process) -> bool:
        """*process* was started by this one or a descendant of it (a later process reusing the
        pid cannot have started earlier than this one)."""
        return self.pid in process.ancestors and process.started >= self.started


@dataclass(frozen=True)
class Recorded:
    """A ledger entry: what the write tool left at *path*, and the process that had written it."""
    path: str
    sha256: str | None
    writer: Identity | None


@dataclass(frozen=True)
class SafePlan:
    """What a safe restore reverts (`agent`) and keeps (`user`), paths relative to the root;
    `full`: nothing tells the agent apart (no ledger, no descendant writes): restore all."""
    agent: list[str]
    user: list[str]
    full: bool


class AgentRecord:
    """The harness sessions and the ledger, as a control reply holds them."""

    def __init__(self, reply: dict):
        self.sessions = [Identity(pid, started) for pid, started in reply["sessions"]]
        self.ledger = {path: Recorded(path, sha, None if pid is None else Identity(pid, started or 0))
                       for path, sha, pid, started, _ in reply["ledger"]}

    def by_session(self, process: Process) -> bool:
        return any(s.made(process) for s in self.sessions)

    def by_descendant(self, process: Process | None) -> bool:
        return process is not None and any(s.is_ancestor_of(process) for s in self.sessions)

    def recorded_still(self, root: Path, path: str, process: Process | None) -> bool:
        """The ledger names *path*, nobody but its recorded writer or a harness session changed it
        since, and it holds what was recorded (or is gone)."""
        entry = self.ledger.get(path)
        if entry is None:
            return False
        if process is not None and not self.by_session(process) and not (
                entry.writer is not None and entry.writer.made(process)):
            return False
        now = digest(root / path)
        return now is None or now == entry.sha256


def digest(path: Path) -> str | None:
    """sha256 of a file's bytes (a symlink's target); None if it is neither, or gone."""
    try:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            return hashlib.sha256(os.fsencode(os.readlink(path))).hexdigest()
        if not stat.S_ISREG(st.st_mode):
            return None
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    except OSError:
        return None


def plan(record: AgentRecord, root: Path, changes) -> SafePlan:
    """Classify *changes* (api.Change, relative to *root*) by the rule of this module."""
    agents: set[str] = set()
    users: set[str] = set()
    for change in changes:
        paths = {change.path} | ({change.old_path} if change.old_path else set())
        mine = record.by_descendant(change.process) or any(
            record.recorded_still(root, p, change.process) for p in paths)
        (agents if mine else users).update(paths - (agents | users))
    descendants = any(record.by_descendant(c.process) for c in changes)
    return SafePlan(sorted(agents), sorted(users), full=not record.ledger and not descendants)


def is_dir_at(root: Path, rel: str) -> bool:
    """*rel* is a directory below *root*, reached without following a symlink."""
    here = root
    for part in (p for p in rel.split("/") if p):
        here = here / part
        try:
            if not stat.S_ISDIR(os.lstat(here).st_mode):
                return False
        except OSError:
            return False
    return True


def parent(rel: str) -> str:
    return rel.rpartition("/")[0]


def remove_with_new_parents(root: Path, then: Path, path: str, stop: str) -> None:
    """Remove *path* (made since the turn whose snapshot is *then*, in a directory made since
    too), then each directory above it up to *stop* that did not exist then, while empty."""
    os.unlink(root / path)
    up = parent(path)
    while up and up != stop and not is_dir_at(then, up):
        try:
            os.rmdir(root / up)
        except OSError:
            return          # someone else's files are in it: it stays
        up = parent(up)
