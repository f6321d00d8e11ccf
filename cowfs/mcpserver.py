"""`cowfs mcp`: a mount's history as an MCP server over stdio, so that an agent can inspect and undo
its own work.

Owns the translation between MCP and the Python API (api.py): the tools (their JSON schemas,
descriptions and annotations), the resources (`cowfs://turn/7/src/app.py`), paging with cursors,
and cowfs's errors as MCP tool errors carrying the CLI's one-line messages. Every tool is one API
call or a few; what changed, who changed it, how a restore or a rollback is done, and what the
noise filter leaves out are the API's answers (and noise.py's), never decided here. The protocol
is the official SDK's (`mcp`, an optional extra: `pip install 'cowfs[mcp]'`); this module is a
client of the daemon like any other, in a process of its own, never inside the daemon.

Paths are relative to the workspace root (an absolute path must lie in the mount), whatever the
server's working directory. Anything that can be long (a patch, a file, a directory, a list)
comes a page at a time: a result with `next_cursor` continues when the same call is made again
with `cursor` set to it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import stat
import time
from pathlib import Path
from typing import Annotated

from mcp.server import MCPServer
from mcp.server.mcpserver.exceptions import ResourceError
from mcp_types import CallToolResult, TextContent, ToolAnnotations
from pydantic import Field

from . import noise, patch
from .api import Change, Turn, Workspace, _turn_number
from .errors import BadInput, CowfsError

PAGE_CHARS = 20_000         # of a patch or a file's text a page holds: about 5,000 tokens
PAGE_ENTRIES = 200          # of a directory's names, or of who_changed's entries
MAX_TURNS = 200             # list_turns' largest page
WHO_TURNS = 20              # the turns who_changed searches when none are named
RESOURCE_TURNS = 50         # the turns cowfs://turns lists (each counted by a diff)
RESOURCE_MAX = 1 << 20      # a resource larger than this is refused: show_file pages it
DIFF_MAX_FILE = 10 << 20    # a side larger than this is named in the patch, not read (as compat)
PATCH_BATCH = 8             # changes whose contents diff reads at once

INSTRUCTIONS = (
    "cowfs keeps a checkpoint of this workspace at every turn. Turn numbers come from list_turns; "
    "the last turn is the open one (changes so far). diff and show_file read old turns; "
    "who_changed names the process behind a change; restore and rollback undo work and are "
    "themselves undoable (their result says how). Long results come in pages: call again with "
    "cursor=next_cursor.")

# Bounds are published in the schemas (json_schema_extra) and enforced by the API, so that a
# turn of -1 gets the CLI's one-line message rather than the SDK's multi-line validation report.
TurnArg = Annotated[int, Field(json_schema_extra={"minimum": 0},
                               description="a sealed turn's number (list_turns)")]
PathArg = Annotated[str, Field(description="relative to the workspace root (or absolute, inside it)")]
CursorArg = Annotated[str | None, Field(description="next_cursor of the previous page of this same "
                                                    "call; omit for the first page")]
IgnoredArg = Annotated[bool, Field(description="also show paths that .gitignore or the noise list "
                                               "(.venv/, node_modules/, caches, build output) "
                                               "ignore; they are left out and counted by default")]

READ_ONLY = ToolAnnotations(read_only_hint=True, destructive_hint=False, idempotent_hint=True,
                            open_world_hint=False)
UNDOABLE = ToolAnnotations(read_only_hint=False, destructive_hint=True, idempotent_hint=False,
                           open_world_hint=False)


def _tool_errors(fn):
    """A tool whose cowfs errors reach the client as MCP tool errors (isError) whose text is the
    one-line message the CLI prints after "cowfs: error: " (an OSError's too, as the CLI prints
    it). Returned, not raised: the SDK would prefix a raised error's message with its own words."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (CowfsError, OSError) as e:
            return CallToolResult(content=[TextContent(type="text", text=str(e))], is_error=True)
    return call


def _when(seconds: float | None) -> str | None:
    return None if seconds is None else time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(seconds))


def _turn_dict(t: Turn) -> dict:
    return {"number": t.number, "time": _when(t.sealed or t.started), "open": t.sealed is None,
            "message": t.message, "kind": t.kind, "target": t.target, "changes": t.changes,
            "ignored": t.ignored}


def _change_dict(c: Change) -> dict:
    p = c.process
    return {"kind": c.kind, "path": c.path, "old_path": c.old_path,
            "process": None if p is None else {"command": p.comm, "cmdline": p.cmdline,
                                               "pid": p.pid, "uid": p.uid}}


def _result(text: str, structured: dict) -> CallToolResult:
    """What an agent reads (text) and what a program reads (structured), together."""
    return CallToolResult(content=[TextContent(type="text", text=text)], structured_content=structured)


class Cursor:
    """Where a page starts, bound to the call it continues: "tool.digest.n.n", the digest that of
    the call's other arguments, so a cursor passed to a different call is refused, not misread."""

    def __init__(self, tool: str, args: dict):
        self.tool = tool
        self.key = hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()[:10]

    def make(self, *at: int) -> str:
        return ".".join([self.tool, self.key, *map(str, at)])

    def read(self, cursor: str | None, n: int) -> tuple[int, ...]:
        if cursor is None:
            return (0,) * n
        parts = cursor.split(".")
        if (len(parts) != 2 + n or parts[:2] != [self.tool, self.key]
                or not all(p.isdigit() for p in parts[2:])):
            raise BadInput(f"cursor {cursor!r} is not a next_cursor of this {self.tool} call "
                           "(pass the same arguments as the call that returned it)")
        return tuple(int(p) for p in parts[2:])


def _cut(text: str, start: int, budget: int) -> int:
    """Where a page of *text* from *start* ends: at a line's end within *budget*, if one is."""
    end = start + budget
    if end >= len(text):
        return len(text)
    newline = text.rfind("\n", start, end)
    return newline + 1 if newline >= start else end


class History:
    """The tools and resources of one mount; each call finds the mount anew (Workspace), so the
    server outlives a remount (an idle mount ends and is mounted again, history intact)."""

    def __init__(self, mountpoint: str):
        self.root = mountpoint

    def ws(self) -> Workspace:
        return Workspace(self.root)

    def _absolute(self, ws: Workspace, path: str) -> str:
        return os.path.join(str(ws.path), ws.relative(path, base=str(ws.path)))

    # -- read-only -------------------------------------------------------------------------
    def list_turns(self, limit: Annotated[int, Field(json_schema_extra={
                       "minimum": 1, "maximum": MAX_TURNS})] = 20,
                   before: Annotated[int | None, Field(description=(
                       "only turns numbered below this (next_before of the previous page)"))] = None,
                   include_ignored: IgnoredArg = False) -> CallToolResult:
        """The turns of the workspace's history, newest first: number, time, message, kind
        ("initial" for turn 0, "turn", "rollback" with its target) and how many paths each changed
        (`ignored`: how many more in ignored paths). The first is the open turn (open: true), what
        changed since the last checkpoint. For older turns pass before=next_before."""
        if not 1 <= limit <= MAX_TURNS:
            raise BadInput(f"limit must be 1 to {MAX_TURNS}, not {limit}")
        turns = self.ws().turns(include_ignored=include_ignored)
        older = [t for t in reversed(turns) if before is None or t.number < before]
        page = [_turn_dict(t) for t in older[:limit]]
        more = len(older) > limit
        structured = {"turns": page, "oldest_turn": turns[0].number,
                      "next_before": page[-1]["number"] if more else None}
        lines = [f"turn-{t['number']:<4} {t['time']}  {t['changes']:>5} changed"
                 + (f" (+{t['ignored']} ignored)" if t["ignored"] else "")
                 + "  " + " ".join(w for w in (t["message"] or _default_message(t),
                                                "(open)" if t["open"] else "") if w)
                 for t in page]
        if more:
            lines.append(f"(older turns: before={structured['next_before']})")
        return _result("\n".join(lines) + "\n", structured)

    def diff(self, from_turn: Annotated[int | None, Field(description=(
                 "a sealed turn; default: the last sealed turn"))] = None,
             to_turn: Annotated[int | None, Field(description=(
                 "a sealed turn; default: the live tree now"))] = None,
             paths: Annotated[list[str] | None, Field(description=(
                 "only changes at or below these paths (relative to the workspace root)"))] = None,
             include_ignored: IgnoredArg = False, cursor: CursorArg = None) -> CallToolResult:
        """What changed from one turn to another, as a list of changes (kind A/M/D/R/T, path, the
        process that made it) and a git-style unified patch. With no turns: what the open turn
        did so far. Paths that .gitignore or the noise list ignore are left out and counted
        (`ignored`); include_ignored shows them. The patch comes a page at a time (`changes` are
        the ones this page's patch covers); call again with cursor=next_cursor for the rest."""
        ws = self.ws()
        a = ws.status().last_turn if from_turn is None else from_turn
        wanted = [self._absolute(ws, p) for p in paths or ()]
        pager = Cursor("diff", {"a": a, "b": to_turn, "paths": wanted, "all": include_ignored})
        first, offset = pager.read(cursor, 2)
        shown = ws.shown_diff(a, to_turn, wanted, include_ignored=include_ignored)
        text, covered, next_at = self._patch_page(ws, a, to_turn, shown.changes, first, offset)
        head = (f"turn-{a} -> {'live tree' if to_turn is None else f'turn-{to_turn}'}: "
                f"{len(shown.changes)} change(s)")
        if shown.ignored:
            head += f", {noise.left_out(shown.ignored, 'include_ignored=true')}"
        next_cursor = None if next_at is None else pager.make(*next_at)
        structured = {"from_turn": a, "to_turn": to_turn, "total_changes": len(shown.changes),
                      "ignored": shown.ignored, "changes": [_change_dict(c) for c in covered],
                      "patch": text, "next_cursor": next_cursor}
        tail = f"\n(more: cursor={next_cursor})\n" if next_cursor else ""
        return _result(f"{head}\n{text}{tail}", structured)

    def _patch_page(self, ws: Workspace, a: int, b: int | None, changes: list[Change],
                    first: int, offset: int) -> tuple[str, list[Change], tuple[int, int] | None]:
        """The patch text from change *first*, character *offset* of its patch, up to a page:
        (text, the changes it covers, where the next page starts or None). Changes are read a
        few at a time (PATCH_BATCH), so a page reads little more than what it shows."""
        out, covered, room = [], [], PAGE_CHARS
        for batch in range(first, len(changes), PATCH_BATCH):
            diffs = ws.file_diffs(a, b, changes=changes[batch:batch + PATCH_BATCH],
                                  max_size=DIFF_MAX_FILE)
            for i, fd in enumerate(diffs, batch):
                if room <= 0:
                    return "".join(out), covered, (i, 0)
                text = patch.file_patch(fd)
                start = offset if i == first else 0
                end = _cut(text, start, room)
                out.append(text[start:end])
                covered.append(changes[i])
                room -= end - start
                if end < len(text):
                    return "".join(out), covered, (i, end)
        return "".join(out), covered, None

    def show_file(self, turn: TurnArg, path: PathArg, cursor: CursorArg = None) -> CallToolResult:
        """A file as it was at a sealed turn: its text a page at a time (call again with
        cursor=next_cursor), a description for a binary file or a symlink, the names in a
        directory."""
        ws = self.ws()
        full, rel = self._old_path(ws, turn, path)
        pager = Cursor("show_file", {"turn": turn, "path": rel})
        (at,) = pager.read(cursor, 1)
        st = full.lstat()
        info = {"turn": turn, "path": rel, "size": st.st_size, "mode": f"{stat.S_IMODE(st.st_mode):o}"}
        if stat.S_ISDIR(st.st_mode):
            names = sorted(e.name + ("/" if e.is_dir(follow_symlinks=False) else "")
                           for e in os.scandir(full))
            page = names[at:at + PAGE_ENTRIES]
            more = at + PAGE_ENTRIES < len(names)
            info.update(kind="directory", entries=page, total_entries=len(names),
                        next_cursor=pager.make(at + PAGE_ENTRIES) if more else None)
            text = "\n".join(page) + "\n" + (f"(more: cursor={info['next_cursor']})\n" if more else "")
            return _result(text, info)
        if stat.S_ISLNK(st.st_mode):
            info.update(kind="symlink", target=os.readlink(full), next_cursor=None)
            return _result(f"{rel}: a symlink to {info['target']} at turn-{turn}\n", info)
        if not stat.S_ISREG(st.st_mode):
            info.update(kind="special", next_cursor=None)
            return _result(f"{rel}: not a regular file at turn-{turn} (mode {st.st_mode:o})\n", info)
        with open(full, "rb") as f:
            probe = f.read(patch.BINARY_PROBE)
            if b"\0" in probe:
                info.update(kind="binary", next_cursor=None)
                return _result(f"{rel}: a binary file of {st.st_size:,} bytes at turn-{turn}\n", info)
            f.seek(at)
            data = f.read(PAGE_CHARS)
        end = _text_end(data, at + len(data) < st.st_size)
        text = data[:end].decode("utf-8", "replace")
        more = at + end < st.st_size
        info.update(kind="text", offset=at, content=text,
                    next_cursor=pager.make(at + end) if more else None)
        tail = f"\n(more: cursor={info['next_cursor']})\n" if more else ""
        return _result(text + tail, info)

    def _old_path(self, ws: Workspace, turn: int, path: str) -> tuple[Path, str]:
        """Where *path* of sealed turn *turn* is read, refusing what leads outside that turn (a
        symlink of the turn's tree on the way to it) and what did not exist then."""
        rel = ws.relative(path, base=str(ws.path))
        snap = ws.snapshot_path(turn)       # the mount point is a real path already (find_mount)
        full = snap / rel if rel else snap
        inside = str(snap)
        parent = os.path.realpath(full.parent) if "/" in rel else inside
        if parent != inside and not parent.startswith(inside + "/"):
            raise BadInput(f"{rel} leads outside turn-{turn} (through a symlink)")
        if not os.path.lexists(full):
            raise BadInput(f"{rel} did not exist at turn-{turn}")
        return full, rel

    def who_changed(self, path: PathArg,
                    turns: Annotated[list[int] | None, Field(description=(
                        f"the turns to search (default: the last {WHO_TURNS}, the open one "
                        "included)"))] = None,
                    cursor: CursorArg = None) -> CallToolResult:
        """Which processes changed a path (or what lies below a directory), turn by turn, newest
        first: the change (A/M/D/R/T), and the process cowfs saw making it (command, command
        line, pid, uid). Ignored paths are included: the path was named."""
        ws = self.ws()
        wanted = self._absolute(ws, path)
        known = ws.turns()
        numbers = {t.number for t in known}
        chosen = ([t for t in known if t.number in set(turns)] if turns is not None
                  else known[-WHO_TURNS:])
        for n in sorted(set(turns or ()) - numbers):
            ws.turn(n)          # UnknownTurn, or PrunedTurn naming the oldest kept
        pager = Cursor("who_changed", {"path": wanted, "turns": [t.number for t in chosen]})
        (at,) = pager.read(cursor, 1)
        entries = []
        for t in reversed(chosen):
            if t.number == known[0].number:
                continue        # the oldest kept turn: nothing before it to compare with
            for c in ws.diff(t.number - 1, None if t.sealed is None else t.number, [wanted]):
                entries.append({"turn": t.number, **_change_dict(c)})
        page = entries[at:at + PAGE_ENTRIES]
        more = at + PAGE_ENTRIES < len(entries)
        structured = {"path": ws.relative(wanted), "entries": page, "total": len(entries),
                      "next_cursor": pager.make(at + PAGE_ENTRIES) if more else None}
        lines = [f"turn-{e['turn']}: {e['kind']} {e['path']}  " + _by(e["process"]) for e in page]
        if not entries:
            lines.append(f"no change at or below {structured['path'] or '.'} in "
                         f"{len(chosen)} turn(s) searched")
        if more:
            lines.append(f"(more: cursor={structured['next_cursor']})")
        return _result("\n".join(lines) + "\n", structured)

    # -- changes -----------------------------------------------------------------------------
    def checkpoint(self, message: Annotated[str, Field(description="what happened in the turn")] = ""
                   ) -> CallToolResult:
        """Seal the open turn: the workspace as it is now becomes a turn that diff, show_file,
        restore and rollback can name. Returns its number and what it changed."""
        t = self.ws().checkpoint(message)
        structured = _turn_dict(t)
        return _result(f"sealed turn-{t.number}: {t.changes} change(s)"
                       + (f" (+{t.ignored} ignored)" if t.ignored else "") + "\n", structured)

    def restore(self, turn: TurnArg, paths: Annotated[list[str], Field(json_schema_extra={
                    "minItems": 1}, description=(
                    "files or directories, relative to the workspace root"))]) -> CallToolResult:
        """Make each path (file, symlink or whole directory) exactly what it was at a sealed turn;
        the rest of the workspace is left alone (a directory's later additions go; a path that
        did not exist then is removed). Undoable: pending changes are sealed first, the restore
        is sealed as a turn of its own, and the result names the rollback that undoes it."""
        if not paths:
            raise BadInput("restore needs at least one path")
        ws = self.ws()
        wanted = [self._absolute(ws, p) for p in paths]
        ws.snapshot_path(turn)              # refused before any seal: an unknown or pruned
        for parent in {os.path.dirname(os.path.relpath(p, ws.path)) for p in wanted} - {""}:
            old, _ = self._old_path(ws, turn, parent)       # turn, a directory not there then
            if old.is_symlink() or not old.is_dir():
                raise BadInput(f"{parent} was not a directory at turn-{turn}")
        before = ws.status().last_turn
        if ws.diff():
            before = ws.checkpoint(f"before restoring from turn-{turn}").number
        done = ws.restore(turn, wanted)
        names = ", ".join(p or "." for p, _ in done)
        sealed = ws.checkpoint(f"restore {names} from turn-{turn}")
        structured = {"restored": [{"path": p or ".", "done": what} for p, what in done],
                      "turn": sealed.number, "undo": {"tool": "rollback", "turn": before}}
        return _result("".join(f"{p or '.'}: {what} (turn-{turn})\n" for p, what in done)
                       + f"recorded as turn-{sealed.number}; undo: rollback(turn={before})\n",
                       structured)

    def rollback(self, turn: TurnArg) -> CallToolResult:
        """Make the whole workspace exactly what it was at a sealed turn. Pending changes are
        sealed first as their own turn; the rollback is recorded as a turn of its own, and the
        result names the rollback that undoes it."""
        t = self.ws().rollback(turn)
        undo = t.number - 1
        structured = {"turn": t.number, "target": t.target, "undo": {"tool": "rollback", "turn": undo}}
        return _result(f"rolled back to turn-{t.target} (recorded as turn-{t.number}); "
                       f"undo: rollback(turn={undo})\n", structured)

    # -- resources ---------------------------------------------------------------------------
    def turns_resource(self) -> str:
        return self.list_turns(RESOURCE_TURNS).content[0].text

    def turn_resource(self, turn: str) -> str:
        n, ws = _turn_number(turn), self.ws()
        ws.snapshot_path(n)
        if n <= ws.turns()[0].number:
            return f"turn-{n}: the oldest turn kept (nothing before it to compare with)\n"
        shown = ws.shown_diff(n - 1, n)
        return (f"turn-{n}: {len(shown.changes)} change(s)\n"
                + "".join(f"{c.kind}  {c.path}\n" for c in shown.changes)
                + (noise.left_out(shown.ignored) + "\n" if shown.ignored else ""))

    def file_resource(self, turn: str, path: str) -> str | bytes:
        full, rel = self._old_path(self.ws(), _turn_number(turn), path)
        if full.is_dir() and not full.is_symlink():
            return "".join(sorted(e.name + ("/" if e.is_dir(follow_symlinks=False) else "") + "\n"
                                  for e in os.scandir(full)))
        size = full.lstat().st_size
        if size > RESOURCE_MAX:
            raise BadInput(f"{rel} at turn-{turn} has {size:,} bytes: read it with show_file, "
                           "a page at a time")
        data = os.fsencode(os.readlink(full)) if full.is_symlink() else full.read_bytes()
        if b"\0" in data[:patch.BINARY_PROBE]:
            return data
        return data.decode("utf-8", "replace")


def _default_message(t: dict) -> str:
    return f"rollback to turn-{t['target']}" if t["kind"] == "rollback" else ""


def _by(p: dict | None) -> str:
    return "(no record of the process)" if p is None else \
        f"({p['command']}, pid {p['pid']}, uid {p['uid']}): {p['cmdline']}"


def _text_end(data: bytes, more: bool) -> int:
    """Where a page of a file's bytes ends: after its last newline if the file goes on, else at
    the page's end, moved back before a UTF-8 character the page splits."""
    if not more:
        return len(data)
    newline = data.rfind(b"\n")
    if newline >= 0:
        return newline + 1
    lead = len(data) - 1
    while lead > 0 and len(data) - lead < 4 and data[lead] & 0xC0 == 0x80:
        lead -= 1
    width = 4 if data[lead] >= 0xF0 else 3 if data[lead] >= 0xE0 else 2 if data[lead] >= 0xC0 else 1
    return lead if lead + width > len(data) and lead > 0 else len(data)


def _resource_errors(fn):
    @functools.wraps(fn)
    def read(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (CowfsError, OSError) as e:
            raise ResourceError(str(e)) from None
    return read


def server(mountpoint: str) -> MCPServer:
    """The MCP server of the mount at *mountpoint*."""
    from . import __version__
    history = History(mountpoint)
    app = MCPServer("cowfs", version=__version__, instructions=INSTRUCTIONS, log_level="WARNING")
    for name in ("list_turns", "diff", "show_file", "who_changed"):
        app.add_tool(_tool_errors(getattr(history, name)), annotations=READ_ONLY)
    app.add_tool(_tool_errors(history.checkpoint), annotations=ToolAnnotations(
        read_only_hint=False, destructive_hint=False, idempotent_hint=False, open_world_hint=False))
    for name in ("restore", "rollback"):
        app.add_tool(_tool_errors(getattr(history, name)), annotations=UNDOABLE)
    app.resource("cowfs://turns", name="turns", mime_type="text/plain",
                 description=f"the newest {RESOURCE_TURNS} turns (list_turns pages further)")(
        _resource_errors(history.turns_resource))
    app.resource("cowfs://turn/{turn}", name="turn", mime_type="text/plain",
                 description="what a sealed turn changed")(_resource_errors(history.turn_resource))
    app.resource("cowfs://turn/{turn}/{+path}", name="file at a turn",
                 description="a file (or a directory's names) as it was at a sealed turn")(
        _resource_errors(history.file_resource))
    return app


def serve(path: str) -> int:
    """Serve the mount holding *path* on stdin/stdout until the client goes."""
    mountpoint = str(Workspace(path).path)      # NotMounted: refused before serving
    server(mountpoint).run("stdio")
    return 0
