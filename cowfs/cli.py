"""The `cowfs` command line.

Owns the commands, the one-line errors and exit codes (2: bad input, 1: the
operation failed), and the human-readable output; the grammar is arguments.py.
`log`, `diff`, `restore`, `run`, `prune` and `fsck` go through api.py;
`checkpoint`, `rollback`, `status` and `export-git` send their requests through
control.py themselves; `mount` and `umount` go through mounting.py (`mount`
starts the daemon and returns once the mount is live).

A harness runs `cowfs checkpoint` once a turn in a process of its own, so that
command in its plain form (plain_checkpoint) takes a path that imports nothing
Python does not load at start: no argparse, json, socket or ctypes.
"""

import os
import sys
import time

from . import control
from .errors import EXIT_FAILED, BadInput, CowfsError, NotMounted

# -- mount / umount ------------------------------------------------------------------------
def cmd_mount(args) -> int:
    from . import mounting
    req = mounting.MountRequest(args.workspace, args.at, args.snapdir, args.force, args.debug,
                                args.export_git_on_checkpoint, args.owner, args.allow_other,
                                args.initial_message, args.auto_checkpoint, keep=args.keep,
                                older_than=args.older_than, max_store=args.max_store,
                                options=",".join(args.options or ()),
                                idle_umount=args.idle_umount)
    if args.foreground:
        from .daemon import run
        return run(mounting.options(req), args.ready_fd)
    m = mounting.mount(req)
    print(f"mounted {m.mountpoint}" + (f" (workspace {m.workspace})" if m.mountpoint != m.workspace else ""))
    for note in m.notes:
        print(f"cowfs: {note}", file=sys.stderr)
    if m.stale_cwds:
        print(f"cowfs: warning: {len(m.stale_cwds)} process(es) (e.g. pid {m.stale_cwds[0]}) were "
              f"already inside {m.mountpoint}: they bypass cowfs until they cd there again "
              f"(cd \"$PWD\")", file=sys.stderr)
    return 0


def cmd_umount(args) -> int:
    from . import mounting
    u = mounting.unmount(args.path or args.cwd, args.lazy)
    if u.cleared_dead:
        print(f"cleared the dead mount at {u.mountpoint} (its daemon had stopped; "
              "`cowfs mount` recovers its open turn)")
        return 0
    if u.sealed is not None:
        print(f"sealed turn-{u.sealed}")
    if u.detached:
        print(f"detached {u.mountpoint}; the daemon serves the processes still inside it and "
              "seals their changes as a last turn when the last one leaves")
    else:
        print(f"unmounted {u.mountpoint}")
    return 0


# -- commands that talk to the daemon ---------------------------------------------------------
def cmd_checkpoint(args) -> int:
    print(f"turn-{control.checkpoint(args.cwd, args.message)}")
    return 0


class working:
    """While long work runs in the daemon, a spinner with the time so far on stderr when it is a
    terminal (rich), and nothing otherwise. The daemon does the work in one request, without
    letting anything else in, so there is no count of done and total to show, only that it runs."""

    def __init__(self, what: str):
        self.what, self.status = what, None

    def __enter__(self):
        if sys.stderr.isatty():
            from rich.console import Console
            self.status = Console(stderr=True).status(self.what)
            self.status.__enter__()
        return self

    def __exit__(self, *exc):
        if self.status is not None:
            self.status.__exit__(*exc)


def cmd_rollback(args) -> int:
    with working(f"rolling back to turn-{args.turn}"):
        reply = control.rollback(args.cwd, args.turn)
    if reply.get("sealed_pending") is not None:
        print(f"sealed pending changes as turn-{reply['sealed_pending']}")
    print(f"rolled back to turn-{reply['target']} (recorded as turn-{reply['turn']})")
    return 0


def cmd_log(args) -> int:
    from . import noise
    from .api import Workspace
    ws = Workspace(args.cwd)
    if args.n is not None and args.n < 0:
        raise BadInput("-n needs a count of 0 or more")
    turns = ws.turns(include_ignored=args.all)
    oldest = turns[0].number        # the oldest kept (0 unless pruned)
    if args.n is not None:
        turns = turns[len(turns) - args.n:] if args.n else []
    records = [{"number": t.number, "started": t.started, "sealed": t.sealed, "message": t.message,
                "kind": t.kind, "target": t.target, "changes": t.changes, "ignored": t.ignored,
                "captured": t.captured, "bytes": t.bytes_captured} for t in turns]
    if args.verbose:
        for t in records:
            # The oldest turn kept has no predecessor left to compare with (pruned).
            t["changes_list"] = ([] if t["number"] <= oldest else _turn_changes(ws, t, args.all))
    if args.json:
        import json
        print(json.dumps(records, indent=2))
        return 0
    if oldest:
        print(f"(turns before turn-{oldest} were pruned)")
    # The count of ignored changes gets a column of its own, as wide as the widest, so that the
    # columns after it stay aligned.
    ignored = [f"(+{t['ignored']:,} ignored)" if t["ignored"] else "" for t in records]
    width = max(map(len, ignored), default=0)
    for t, left_out in zip(records, ignored):
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t["sealed"] or t["started"]))
        state = "" if t["sealed"] else " (open)"
        message = t["message"]
        if t["kind"] == "rollback":
            message = message or f"rollback to turn-{t['target']}"
        print(f"turn-{t['number']:<5} {when}  {t['changes']:>6} changed {left_out:<{width}} "
              f"{_size(t['bytes']):>9} captured  {message}{state}")
        for c in t.get("changes_list", ()):
            print(f"    {_change_line(c)}{_by(c)}")
        if t.get("changes_list") is not None and t["ignored"]:
            print(f"    {noise.left_out(t['ignored'])}")
    return 0


def _turn_changes(ws, turn: dict, include_ignored: bool) -> list[dict]:
    """A turn's changes (against the turn before it; the open turn's against the live tree)."""
    if turn["number"] == 0:
        return []
    b = turn["number"] if turn["sealed"] else None
    return [c.as_dict() for c in ws.shown_diff(turn["number"] - 1, b,
                                               include_ignored=include_ignored).changes]


def _change_line(c: dict) -> str:
    path = f"{c['old_path']} -> {c['path']}" if c["kind"] == "R" else c["path"]
    return f"{c['kind']}  {path}"


def _by(c: dict) -> str:
    p = c.get("process")
    return f"    ({p['comm']}, pid {p['pid']}, uid {p['uid']})" if p else ""


def cmd_diff(args) -> int:
    import json
    from . import noise, patch
    from .api import Workspace
    if len(args.turns) > 2:
        raise BadInput("diff takes at most two turns: A [B]")
    ws = Workspace(args.cwd)
    a, b = (args.turns + [None, None])[:2]
    paths = [_absolute(ws, p, args.base) for p in args.after_dashes]
    shown = ws.shown_diff(a, b, paths, include_ignored=args.all)
    changes = shown.changes
    note = noise.left_out(shown.ignored)
    if args.json or args.name_status:
        text = (json.dumps([c.as_dict() for c in changes], indent=2) + "\n" if args.json else
                "".join(f"{c.kind}\t{c.old_path}\t{c.path}\n" if c.kind == "R" else f"{c.kind}\t{c.path}\n"
                        for c in changes))
    else:
        diffs = ws.file_diffs(a, b, paths, changes=changes)
        text = patch.diffstat(diffs) if args.stat else patch.patch(diffs)
    if note and args.stat:
        text += f" {note}\n"           # a summary: the note is part of it
        note = ""
    _page(text, args.no_pager)
    if note:                            # a patch or a list stays what tools read: the note aside
        print(note, file=sys.stderr)
    return 0


def _absolute(ws, path: str, base: str | None) -> str:
    """A path as the user meant it (from -C or the working directory inside the mount, else
    from the root), made absolute so that the API reads it the same way."""
    return os.path.join(str(ws.path), ws.relative(path, base=base))


def _page(text: str, never: bool) -> None:
    """Through a pager on a terminal (as git does), straight out otherwise."""
    import shlex
    import subprocess
    data = text.encode("utf-8", "surrogateescape")
    pager = os.environ.get("COWFS_PAGER") or os.environ.get("PAGER") or "less -FRX"
    if never or not sys.stdout.isatty() or not text or pager.strip() in ("", "cat"):
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        return
    try:
        proc = subprocess.Popen(shlex.split(pager), stdin=subprocess.PIPE)
    except OSError:
        sys.stdout.buffer.write(data)
        return
    try:
        proc.communicate(data)
    except BrokenPipeError:
        pass


def cmd_restore(args) -> int:
    from .api import Workspace
    ws = Workspace(args.cwd)
    paths = [_absolute(ws, p, args.base) for p in args.paths]
    with working(f"restoring from turn-{args.turn}"):
        done = ws.restore(args.turn, paths)
    for path, what in done:
        print(f"{path or '.'}: {what} (turn-{args.turn})")
    return 0


def cmd_run(args) -> int:
    import shutil
    import subprocess
    from .api import Workspace, _inside
    if not args.after_dashes:
        raise BadInput("run needs a command after --: cowfs run -- CMD [ARGS...]")
    ws = Workspace(args.cwd)
    here = os.path.realpath(args.base or ".")
    cwd = here if _inside(here, str(ws.path)) else str(ws.path)
    argv = args.after_dashes
    if shutil.which(argv[0], path=os.environ.get("PATH")) is None and not os.path.exists(
            os.path.join(cwd, argv[0])):
        raise BadInput(f"{argv[0]}: command not found")
    try:
        rc = subprocess.call(argv, cwd=cwd)
    except OSError as e:
        raise BadInput(f"{argv[0]}: {e.strerror}") from None
    turn = ws.checkpoint(args.message if args.message is not None else shlex_join(argv))
    print(f"cowfs: sealed turn-{turn.number} (exit status {rc})", file=sys.stderr)
    return rc if rc >= 0 else 128 - rc


def shlex_join(argv: list[str]) -> str:
    import shlex
    return shlex.join(argv)


def cmd_status(args) -> int:
    try:
        mount = control.find_mount(args.cwd)
    except NotMounted:
        if args.base is not None:
            raise
        return _status_of_every_mount(args.json)    # asked outside any mount, with no -C
    s = control.request(mount, "status")
    s.pop("ok", None)
    if args.json:
        import json
        print(json.dumps(s, indent=2))
        return 0
    print(f"mount:        {s['mountpoint']}")
    print(f"backing dir:  {s['backing']}")
    print(f"current turn: turn-{s['open_turn']} (open, {s['pending_changes']} changes); "
          f"last sealed turn-{s['last_turn']}")
    if s.get("oldest_turn"):
        print(f"history:      from turn-{s['oldest_turn']} (the turns before it were pruned)")
    if s.get("auto_prune"):
        limits = {k: v for k, v in s["auto_prune"].items() if k != "last" and v is not None}
        print("auto-prune:   after each checkpoint: " + ", ".join(f"{k.replace('_', '-')} {v}"
                                                            for k, v in limits.items()))
    print(f"capture mode: {s['capture_mode']}" +
          ("" if s["capture_mode"] == "reflink" else " (this filesystem cannot clone: pre-images are copies)"))
    print(f"store size:   {_size(s['store_bytes'])}")
    print(f"snapshots:    .snapshots ({s['snapdir']})")
    rules = (s.get("ignore") or {}).get("rules") or []
    print("ignore rules: " + ("; ".join(rules) + " (.cowfsignore, in force in this turn)" if rules
                              else "none (nothing is ignored)"))
    print(f"daemon pid:   {s['daemon_pid']}")
    requests = sorted(s.get("requests", {}).items(), key=lambda kv: -kv[1])
    print(f"requests:     {sum(n for _, n in requests):,} since mount" +
          "".join(f"{';' if i else ':'} {op} {n:,}" for i, (op, n) in enumerate(requests[:4])))
    if s.get("drift"):
        print(f"warning:      {s['drift']}")
    mirror = s.get("git_mirror")
    if mirror:
        print("git mirror:   " + (f"error: {mirror['error']}" if "error" in mirror else
                                   f"turn-{mirror['turn']} -> {mirror['sha'][:7]} ({mirror['repo']})"))
    return 0


def _status_of_every_mount(as_json: bool) -> int:
    """One line a cowfs mount (the mounts this process sees), for `cowfs status` outside them."""
    mounts = control.cowfs_mounts()
    if not mounts:
        raise NotMounted(f"not inside a cowfs mount; {control.mounts_in_words()}")
    found = []
    for m in mounts:
        try:
            found.append({k: v for k, v in control.request(m, "status", timeout=10).items()
                          if k != "ok"})
        except CowfsError as e:
            found.append({"mountpoint": m.mountpoint, "error": str(e)})
    if as_json:
        import json
        print(json.dumps(found, indent=2))
        return 0
    for s in found:
        print(f"{s['mountpoint']}  " + (s["error"] if "error" in s else
              f"turn-{s['open_turn']} open ({s['pending_changes']} changes), last sealed "
              f"turn-{s['last_turn']}, store {_size(s['store_bytes'])}"))
    return 0


def cmd_export_git(args) -> int:
    from .gitexport import TargetError, check_branch, resolve_target
    mount = control.find_mount(args.cwd)
    try:
        check_branch(args.branch)
        repo = None
        if args.to is not None:
            backing = control.request(mount, "status")["backing"]
            repo = resolve_target(args.to, args.branch, [mount.mountpoint, backing])
    except TargetError as e:
        raise BadInput(str(e)) from None
    # The daemon reaches REPO through this process's mount namespace (its own lacks most mounts).
    with working("exporting turns to git"):
        reply = control.request(mount, "export_git", repo=repo, branch=args.branch, pid=os.getpid())
    _print_export(reply)
    return 0


def _print_export(reply: dict) -> None:
    turns, empty, left_out = reply["turns"], [], {}
    for t in turns:
        detail = f"{t['written']} written, {t['deleted']} deleted"
        if t["empty_dirs"]:
            detail += f", {t['empty_dirs']} empty director{'y' if t['empty_dirs'] == 1 else 'ies'} left out"
            empty.append(f"turn-{t['turn']}")
        for kind, count in t["left_out"].items():
            left_out[kind] = left_out.get(kind, 0) + count
            detail += f", {count} {kind} left out"
        print(f"turn-{t['turn']} -> {t['sha'][:7]}  ({detail})")
    where = f"branch {reply['branch']} of {reply['repo']}"
    tip = reply["tip"]
    if not turns:
        print(f"nothing to export: {where} is at turn-{tip[0]} ({tip[1][:7]})" if tip else
              f"nothing to export to {where}")
        return
    print(f"exported {len(turns)} turn(s) to {where}; tip turn-{tip[0]} ({tip[1][:7]})")
    if empty:
        print(f"note: git cannot hold empty directories; left out in {len(empty)} turn(s): "
              + ", ".join(empty))
    if left_out:
        print("note: git cannot hold " + ", ".join(f"{kind} entries ({n})" for kind, n in left_out.items())
              + ": left out")


def cmd_prune(args) -> int:
    from .api import Workspace
    from .retention import Limits
    limits = Limits.parse(args.keep, args.older_than, args.max_store)   # bad input: nothing sent
    if not limits:
        raise BadInput("prune needs a limit: --keep N, --older-than DURATION or --max-store SIZE")
    r = Workspace(args.cwd).prune(limits, dry_run=args.dry_run).as_dict()
    removed = r["removed"]
    span = (f"turn-{removed[0]}" if len(removed) == 1 else
            f"turn-{removed[0]} .. turn-{removed[-1]}") if removed else ""
    if args.dry_run:
        print(f"would prune {len(removed)} turn(s) ({span}); the oldest turn kept would be "
              f"turn-{r['oldest']}; they hold about {_size(r['freed_bytes'])} "
              f"(allocated, shared extents counted in full) of the store's {_size(r['store_bytes'])}"
              if removed else f"nothing to prune: the oldest turn kept is turn-{r['oldest']}")
        return 0
    if removed:
        print(f"pruned {len(removed)} turn(s) ({span}); the oldest turn kept is turn-{r['oldest']}; "
              f"freed {_size(r['freed_bytes'])}")
    else:
        print(f"nothing to prune: the oldest turn kept is turn-{r['oldest']}"
              + (f" (freed {_size(r['freed_bytes'])} left by an earlier prune)" if r["rows"] else ""))
    if r.get("note"):
        print(f"cowfs: note: {r['note']}", file=sys.stderr)
    return 0


def cmd_fsck(args) -> int:
    from . import api
    report = api.fsck(args.workspace, args.repair)
    for finding in report.findings:
        print(finding.line())
    print(report.summary())
    return 0 if report.clean else EXIT_FAILED


def cmd_mcp(args) -> int:
    try:
        from . import mcpserver
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in ("mcp", "mcp_types", "pydantic"):
            raise
        raise BadInput("cowfs mcp needs the MCP SDK: pip install 'cowfs[mcp]'") from None
    return mcpserver.serve(args.cwd)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


COMMANDS = {"mount": cmd_mount, "umount": cmd_umount, "checkpoint": cmd_checkpoint,
            "rollback": cmd_rollback, "log": cmd_log, "status": cmd_status,
            "export-git": cmd_export_git, "diff": cmd_diff, "restore": cmd_restore, "run": cmd_run,
            "prune": cmd_prune, "fsck": cmd_fsck, "mcp": cmd_mcp}


def plain_checkpoint(argv: list[str]) -> tuple[str, str] | None:
    """(where, message) if *argv* is `checkpoint` with at most -C PATH (before or after it) and
    -m/--message MSG, parsed as argparse would parse it; else None, and argparse decides (help,
    abbreviations, values that look like options, errors)."""
    top_cwd = cwd = None
    message, named = "", False
    words = iter(argv)
    for word in words:
        if word == "checkpoint" and not named:
            named = True
        elif word == "-C" or (named and word in ("-m", "--message")):
            value = next(words, None)
            if value is None or value.startswith("-"):
                return None
            if word != "-C":
                message = value
            elif named:
                cwd = value
            else:
                top_cwd = value
        elif named and word.startswith("--message="):
            message = word.removeprefix("--message=")
        else:
            return None
    return (cwd or top_cwd or ".", message) if named else None


# Options mount(8) and mount.fuse3 pass that mean nothing to cowfs or that a cowfs mount has
# anyway (mount.fuse3 adds dev,suid; the mount is nosuid,nodev: README).
_HELPER_IGNORED = frozenset({"rw", "defaults", "auto", "noauto", "nouser", "nofail", "_netdev",
                             "async", "exec", "dev", "suid", "nodev", "nosuid"})


def mount_helper_argv(argv: list[str]) -> list[str] | None:
    """`mount -t fuse.cowfs WORKSPACE MOUNTPOINT -o OPTIONS` (or an fstab line) runs mount.fuse3,
    which runs `cowfs WORKSPACE MOUNTPOINT -o OPTIONS`: that command line as `cowfs mount`'s;
    None for any other."""
    if len(argv) < 2 or argv[0] in COMMANDS or not (os.path.isdir(argv[0]) and os.path.isdir(argv[1])):
        return None     # a mistyped command still gets argparse's error
    out, options, words = ["mount", argv[0], "--at", argv[1]], [], iter(argv[2:])
    for word in words:
        if word != "-o":
            return None
        options += next(words, "").split(",")
    options = [o for o in options if o and o not in _HELPER_IGNORED]
    if "allow_other" in options:
        options.remove("allow_other")
        out.append("--allow-other")
    return out + (["-o", ",".join(options)] if options else [])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = mount_helper_argv(argv) or argv
    plain = plain_checkpoint(argv)
    if plain is None:
        from .arguments import parse_args
        args = parse_args(argv)
    try:
        if plain is not None:
            print(f"turn-{control.checkpoint_in_one_shot(*plain)}")
            return 0
        code = COMMANDS[args.command](args)
        sys.stdout.flush()      # here, where a closed pipe is handled, not at the interpreter's exit
        return code
    except CowfsError as e:
        print(f"cowfs: error: {e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:
        # The reader went away (`cowfs log | head`): the rest is not wanted, as for git. Python
        # would try to flush stdout again at exit and complain: point it at /dev/null first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141      # what a shell reports for SIGPIPE
    except OSError as e:
        print(f"cowfs: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
