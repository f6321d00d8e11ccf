"""`cowfs mcp`: the MCP server, started as a subprocess over a real mount and driven by the MCP
SDK's own stdio client, as an agent's client would drive it.

Every answer is checked against the Python API or the CLI on the same mount, and every change
against the backing files themselves (workspace.backing), never against the server's own words.
"""

import json
import os
import subprocess
import sys
import tempfile
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
from mcp import ClientSession, MCPError, StdioServerParameters
from mcp.client.stdio import stdio_client

import cowfs
from cowfs import mcpserver
from conftest import REPO, run

XFS = pytest.mark.parametrize("backing", ["xfs"], indirect=True)

TOOLS = {"list_turns", "diff", "show_file", "who_changed", "checkpoint", "restore", "rollback"}


@asynccontextmanager
async def session(workspace, errlog=None):
    """A client session with `cowfs mcp -C PATH`, initialized, run as the mount's owner (the
    user of a rootless mount: the daemon serves the user it was made for)."""
    argv = [*workspace.cowfs_cmd, "mcp", "-C", str(workspace.path)]
    params = StdioServerParameters(command=argv[0], args=argv[1:], env={"PYTHONPATH": str(REPO)})
    async with stdio_client(params, errlog=errlog or sys.stderr) as (read, write):
        async with ClientSession(read, write) as s:
            await s.initialize()
            yield s


def drive(workspace, script):
    """Run `await script(session)` against a fresh server of *workspace*; returns its result.
    The server's stderr must stay free of tracebacks."""
    async def main():
        async with session(workspace, errlog=log) as s:
            return await script(s)
    with tempfile.TemporaryFile("w+") as log:
        result = anyio.run(main)
        log.seek(0)
        assert "Traceback" not in log.read()
    return result


def calls(workspace, *requests):
    """The results of tool calls [(name, arguments), ...], made in order in one session."""
    async def script(s):
        return [await s.call_tool(name, args) for name, args in requests]
    return drive(workspace, script)


def ok(result) -> dict:
    assert not result.is_error, result.content[0].text
    return result.structured_content


def error(result) -> str:
    assert result.is_error and result.structured_content is None, result
    (content,) = result.content
    assert "\n" not in content.text.strip()
    return content.text


def tree(root: Path) -> dict:
    """Every path under *root* (the store aside) with its content (files), target (symlinks)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != ".cowfs"] if Path(dirpath) == root else dirnames
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            rel = str(p.relative_to(root))
            out[rel] = (os.readlink(p) if p.is_symlink() else
                        p.read_bytes() if p.is_file() else "dir")
    return out


def cli_error(workspace, *args) -> str:
    result = workspace.cli(*args, check=False)
    assert result.returncode == 2, result
    return result.stderr.strip().removeprefix("cowfs: error: ")


# -- what the server offers -------------------------------------------------------------------
@XFS
def test_tools_have_schemas_descriptions_and_annotations(workspace):
    workspace.mount()

    async def script(s):
        return (await s.list_tools()).tools, await s.list_resources(), \
            await s.list_resource_templates()
    tools, resources, templates = drive(workspace, script)
    by_name = {t.name: t for t in tools}
    assert set(by_name) == TOOLS
    for t in tools:
        assert t.input_schema["type"] == "object" and len(t.description) > 80, t
        assert t.annotations.open_world_hint is False
    for name in ("list_turns", "diff", "show_file", "who_changed"):
        a = by_name[name].annotations
        assert (a.read_only_hint, a.destructive_hint, a.idempotent_hint) == (True, False, True)
    for name in ("restore", "rollback"):
        a = by_name[name].annotations
        assert (a.read_only_hint, a.destructive_hint, a.idempotent_hint) == (False, True, False)
        assert "undo" in by_name[name].description
    a = by_name["checkpoint"].annotations
    assert (a.read_only_hint, a.destructive_hint) == (False, False)
    assert by_name["show_file"].input_schema["required"] == ["turn", "path"]
    assert by_name["restore"].input_schema["properties"]["paths"]["minItems"] == 1
    assert [str(r.uri) for r in resources.resources] == ["cowfs://turns"]
    assert {t.uri_template for t in templates.resource_templates} == {
        "cowfs://turn/{turn}", "cowfs://turn/{turn}/{+path}"}


def test_without_the_sdk_one_line_and_exit_2(tmp_path):
    """`python -S` has no site-packages: cowfs (from PYTHONPATH) without the mcp extra."""
    result = run([sys.executable, "-S", "-m", "cowfs", "mcp", "-C", tmp_path], check=False)
    assert result.returncode == 2, result
    assert result.stderr == "cowfs: error: cowfs mcp needs the MCP SDK: pip install 'cowfs[mcp]'\n"
    assert result.stdout == ""


def test_outside_a_mount_one_line_and_exit_2(tmp_path):
    result = run([sys.executable, "-m", "cowfs", "mcp", "-C", tmp_path], check=False,
                 input="")
    assert result.returncode == 2, result
    # One line, naming the mounts there are (the CLI's message).
    assert result.stderr.startswith(f"cowfs: error: {tmp_path} is not inside a cowfs mount; ")
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stdout == ""


# -- the read-only tools, against the API -----------------------------------------------------
@XFS
def test_list_turns_diff_show_file_and_who_changed(workspace):
    (workspace.path / "src").mkdir()
    (workspace.path / "src/app.py").write_text("x = 1\n")
    (workspace.path / "logo.png").write_bytes(b"\x89PNG\0\0" + bytes(range(256)))
    workspace.mount()
    ws = cowfs.Workspace(workspace.path)
    (workspace.path / "src/app.py").write_text("x = 2\n")
    writer = subprocess.Popen(["dd", "of=" + str(workspace.path / "src/data.txt"), "status=none"],
                              stdin=subprocess.PIPE)
    writer.communicate(b"made by dd\n")
    (workspace.path / "link").symlink_to("src/app.py")

    checkpoint, turns, page, diff, under, text, binary, link, listing, who = calls(
        workspace, ("checkpoint", {"message": "edit app"}), ("list_turns", {}),
        ("list_turns", {"limit": 1, "before": 2}), ("diff", {"from_turn": 0, "to_turn": 1}),
        ("diff", {"from_turn": 0, "to_turn": 1, "paths": ["src"]}),
        ("show_file", {"turn": 0, "path": "src/app.py"}), ("show_file", {"turn": 1, "path": "logo.png"}),
        ("show_file", {"turn": 1, "path": "link"}), ("show_file", {"turn": 1, "path": "src"}),
        ("who_changed", {"path": "src/data.txt"}))

    assert ok(checkpoint)["number"] == 1 and ok(checkpoint)["message"] == "edit app"
    api = ws.turns()
    listed = ok(turns)["turns"]
    assert [t["number"] for t in listed] == [t.number for t in reversed(api)] == [2, 1, 0]
    assert [(t["message"], t["kind"], t["changes"], t["open"]) for t in listed] == [
        (t.message, t.kind, t.changes, t.sealed is None) for t in reversed(api)]
    assert listed[1]["changes"] == 3            # app.py, data.txt, link
    assert ok(page)["turns"][0]["number"] == 1 and ok(page)["next_before"] == 1

    d = ok(diff)
    assert d["patch"] == ws.patch(0, 1) and d["next_cursor"] is None
    assert [(c["kind"], c["path"]) for c in d["changes"]] == [(c.kind, c.path) for c in ws.diff(0, 1)]
    assert diff.content[0].text.startswith("turn-0 -> turn-1: 3 change(s)\n")
    assert [c["path"] for c in ok(under)["changes"]] == ["src/app.py", "src/data.txt"]
    assert ok(under)["patch"] == ws.patch(0, 1, [str(workspace.path / "src")])

    assert ok(text)["content"] == "x = 1\n" and ok(text)["kind"] == "text"
    assert ok(binary)["kind"] == "binary" and ok(binary)["size"] == 262 and "content" not in ok(binary)
    assert ok(link)["target"] == "src/app.py"
    assert ok(listing)["entries"] == ["app.py", "data.txt"]

    entries = ok(who)["entries"]
    assert [(e["turn"], e["kind"], e["process"]["command"], e["process"]["pid"], e["process"]["uid"])
            for e in entries] == [(1, "A", "dd", writer.pid, 0)]
    by_api = ws.diff(0, 1, [str(workspace.path / "src/data.txt")])[0].process
    assert entries[0]["process"]["cmdline"] == by_api.cmdline


@XFS
def test_the_noise_filter_is_on_by_default(workspace):
    (workspace.path / "app.py").write_text("v1\n")
    workspace.mount()
    (workspace.path / "app.py").write_text("v2\n")
    site = workspace.path / ".venv/lib/site-packages/pkg"
    site.mkdir(parents=True)
    for i in range(30):
        (site / f"m{i}.py").write_text(f"# {i}\n")

    shown, everything, turns = calls(
        workspace, ("diff", {}), ("diff", {"include_ignored": True}), ("list_turns", {"limit": 1}))
    s, e = ok(shown), ok(everything)
    assert [c["path"] for c in s["changes"]] == ["app.py"] and s["total_changes"] == 1
    api = cowfs.Workspace(workspace.path).shown_diff(0)
    assert s["ignored"] == api.ignored == 30 and ".venv" not in s["patch"]
    assert "changes in ignored paths (include_ignored=true shows them)" in shown.content[0].text
    assert e["ignored"] == 0 and e["total_changes"] == 1 + api.ignored
    assert ok(turns)["turns"][0]["changes"] == 1 and ok(turns)["turns"][0]["ignored"] == api.ignored


# -- errors: the CLI's one line, and nothing touched ------------------------------------------
@XFS
def test_errors_are_tool_errors_with_the_cli_message_and_touch_nothing(workspace):
    (workspace.path / "f").write_text("v0\n")
    (workspace.path / "g").write_text("g0\n")
    (workspace.path / "out").symlink_to("/etc")
    workspace.mount()
    for i in range(3):
        (workspace.path / "f").write_text(f"v{i + 1}\n")
        workspace.cli("checkpoint")
    assert "oldest turn kept is turn-2" in workspace.cli("prune", "--keep", "2").stdout
    (workspace.path / "g").write_text("pending\n")      # a pending change: restore seals none
    before = tree(workspace.backing)
    turns_before = [t.number for t in cowfs.Workspace(workspace.path).turns()]

    results = calls(
        workspace,
        ("show_file", {"turn": 99, "path": "f"}), ("rollback", {"turn": 99}),
        ("restore", {"turn": 99, "paths": ["f"]}), ("diff", {"from_turn": 99}),
        ("restore", {"turn": 0, "paths": ["f"]}), ("rollback", {"turn": 0}),
        ("show_file", {"turn": 0, "path": "f"}),
        ("restore", {"turn": 2, "paths": ["/etc/passwd"]}), ("show_file", {"turn": 2, "path": "../x"}),
        ("restore", {"turn": 2, "paths": [".cowfs/catalogue.db"]}),
        ("show_file", {"turn": 2, "path": "nothing-there"}),
        ("diff", {"cursor": "diff.0123456789.0.0"}), ("rollback", {"turn": -1}),
        ("restore", {"turn": 2, "paths": []}), ("restore", {"turn": 2, "paths": ["new/f"]}),
        ("show_file", {"turn": 2, "path": "out/passwd"}),
        ("restore", {"turn": 2, "paths": ["out/passwd"]}), ("who_changed", {"path": "f", "turns": [99]}))
    texts = [error(r) for r in results]

    assert texts[0] == "turn 99 does not exist or is not sealed (see `cowfs log`)"
    assert texts[1] == cli_error(workspace, "rollback", "99")
    assert texts[3] == cli_error(workspace, "diff", "99")
    assert texts[4] == texts[5] == texts[6] == cli_error(workspace, "rollback", "0") == \
        "turn 0 was pruned; the oldest turn kept is turn-2"
    assert texts[7] == cli_error(workspace, "restore", "2", "/etc/passwd") == \
        f"/etc/passwd is outside the workspace {workspace.path}"
    assert "outside the workspace" in texts[8] and "not in the live tree" in texts[9]
    assert texts[10] == "nothing-there did not exist at turn-2"
    assert "is not a next_cursor of this diff call" in texts[11]
    assert texts[12] == "not a turn: -1 (expected N or turn-N)"
    assert texts[13] == "restore needs at least one path"
    assert texts[14] == "new did not exist at turn-2"         # and the pending edit stays unsealed
    assert texts[15] == "out/passwd leads outside turn-2 (through a symlink)"
    assert texts[16] == "out was not a directory at turn-2"
    assert texts[17] == "turn 99 does not exist (see `cowfs log`)"
    assert tree(workspace.backing) == before
    assert [t.number for t in cowfs.Workspace(workspace.path).turns()] == turns_before


@XFS
def test_the_server_outlives_an_unmount_and_a_remount(workspace):
    workspace.mount()

    async def script(s):
        before = ok(await s.call_tool("checkpoint", {"message": "one"}))["number"]
        workspace.umount()
        gone = error(await s.call_tool("list_turns", {}))
        workspace.mount()
        turns = ok(await s.call_tool("list_turns", {}))["turns"]
        return before, gone, [t["message"] for t in turns]
    before, gone, messages = drive(workspace, script)
    assert before == 1 and gone.startswith(f"{workspace.path} is not inside a cowfs mount; ")
    assert "one" in messages                                   # the history, intact


# -- paging ---------------------------------------------------------------------------------
@XFS
def test_large_outputs_come_in_pages(workspace):
    big = "".join(f"line {i} " + "x" * 60 + "\n" for i in range(1500))       # ~100 KB
    (workspace.path / "big.txt").write_text(big)
    (workspace.path / "many").mkdir()
    for i in range(450):
        (workspace.path / "many" / f"f{i:03}").write_text("")
    workspace.mount()
    (workspace.path / "big.txt").write_text(big.replace("x", "y"))
    (workspace.path / "small.txt").write_text("€" * 20_000)         # no newline, 3 bytes a char
    workspace.cli("checkpoint")
    for i in range(25):
        workspace.cli("checkpoint", "-m", f"empty {i}")
    ws = cowfs.Workspace(workspace.path)

    async def pages(s, tool, args, key):
        out, cursor = [], None
        while True:
            r = await s.call_tool(tool, {**args, **({"cursor": cursor} if cursor else {})})
            page = ok(r)
            out.append(page[key])
            cursor = page["next_cursor"]
            if cursor is None:
                return out

    async def script(s):
        older, before = [], None
        while True:
            page = ok(await s.call_tool("list_turns", {"limit": 10, **({"before": before} if before
                                                                           else {})}))
            older += [t["number"] for t in page["turns"]]
            before = page["next_before"]
            if before is None:
                break
        foreign = ok(await s.call_tool("show_file", {"turn": 1, "path": "big.txt"}))["next_cursor"]
        return (await pages(s, "diff", {"from_turn": 0, "to_turn": 1}, "patch"),
                await pages(s, "show_file", {"turn": 1, "path": "big.txt"}, "content"),
                await pages(s, "show_file", {"turn": 1, "path": "small.txt"}, "content"),
                await pages(s, "show_file", {"turn": 1, "path": "many"}, "entries"), older,
                error(await s.call_tool("show_file", {"turn": 0, "path": "big.txt",
                                                      "cursor": foreign})))
    patch_pages, text_pages, small_pages, dir_pages, older, refused = drive(workspace, script)

    assert len(patch_pages) >= 10 and all(len(p) <= mcpserver.PAGE_CHARS for p in patch_pages)
    assert "".join(patch_pages) == ws.patch(0, 1)
    assert len(text_pages) >= 5 and "".join(text_pages) == big.replace("x", "y")
    assert all(p.endswith("\n") for p in text_pages)
    assert len(small_pages) >= 3 and "".join(small_pages) == "€" * 20_000
    assert [len(p) for p in dir_pages] == [200, 200, 50]
    assert sum(dir_pages, []) == sorted(os.listdir(workspace.path / "many"))
    assert older == list(range(27, -1, -1))
    assert "is not a next_cursor of this show_file call" in refused


# -- the changes: checked on disk, and undone -------------------------------------------------
def test_restore_and_rollback_on_disk_and_their_undo(workspace):
    (workspace.path / "src").mkdir()
    (workspace.path / "src/app.py").write_text("good\n")
    (workspace.path / "README").write_text("readme 0\n")
    workspace.mount()
    (workspace.path / "src/app.py").write_text("broken\n")
    (workspace.path / "src/junk.py").write_text("junk\n")
    workspace.cli("checkpoint", "-m", "agent broke it")                       # turn 1
    (workspace.path / "README").write_text("the user's edit\n")               # pending, kept
    turn0 = tree(workspace.snapshots / "turn-0")
    broken = tree(workspace.backing)

    restore, = calls(workspace, ("restore", {"turn": 0, "paths": ["src"]}))
    r = ok(restore)
    assert r["restored"] == [{"path": "src", "done": "restored"}]
    on_disk = tree(workspace.backing)
    assert on_disk["src/app.py"] == b"good\n" and "src/junk.py" not in on_disk
    assert on_disk["README"] == b"the user's edit\n"              # the rest is left alone
    turns = {t.number: t for t in cowfs.Workspace(workspace.path).turns()}
    assert r["undo"] == {"tool": "rollback", "turn": 2} and turns[2].message == \
        "before restoring from turn-0"                             # the pending edit, sealed first
    assert r["turn"] == 3 and turns[3].message == "restore src from turn-0"
    assert f"undo: rollback(turn=2)" in restore.content[0].text

    undo, = calls(workspace, ("rollback", r["undo"]))
    assert ok(undo)["target"] == 2
    assert tree(workspace.backing) == {**broken, "README": b"the user's edit\n"}

    rollback, = calls(workspace, ("rollback", {"turn": 0}))
    rb = ok(rollback)
    assert tree(workspace.backing) == turn0
    back, = calls(workspace, ("rollback", rb["undo"]))
    assert ok(back)["target"] == rb["turn"] - 1
    assert tree(workspace.backing) == {**broken, "README": b"the user's edit\n"}


# -- resources ------------------------------------------------------------------------------
@XFS
def test_resources_for_turns_and_old_files(workspace):
    (workspace.path / "src").mkdir()
    (workspace.path / "src/app.py").write_text("old\n")
    (workspace.path / "blob.bin").write_bytes(b"\0\1\2")
    workspace.mount()
    (workspace.path / "src/app.py").write_text("new\n")
    workspace.cli("checkpoint", "-m", "edit")

    async def script(s):
        reads = [await s.read_resource(uri) for uri in (
            "cowfs://turn/0/src/app.py", "cowfs://turn/1/src/app.py", "cowfs://turn/0/blob.bin",
            "cowfs://turn/0/src", "cowfs://turn/1", "cowfs://turns")]
        with pytest.raises(MCPError) as unknown:
            await s.read_resource("cowfs://turn/9/src/app.py")
        with pytest.raises(MCPError):        # refused (by the SDK's own path checks, first)
            await s.read_resource("cowfs://turn/0/../../etc/passwd")
        return reads, str(unknown.value)
    (old, new, blob, listing, turn, turns), unknown = drive(workspace, script)

    assert old.contents[0].text == "old\n" and new.contents[0].text == "new\n"
    import base64
    assert base64.b64decode(blob.contents[0].blob) == b"\0\1\2"
    assert listing.contents[0].text == "app.py\n"
    assert turn.contents[0].text == "turn-1: 1 change(s)\nM  src/app.py\n"
    assert "turn-1" in turns.contents[0].text and "edit" in turns.contents[0].text
    assert "turn 9 does not exist" in unknown
