"""The grammar of the `cowfs` command line: its argparse parsers, and what parsing leaves in
the Namespace the commands of cli.py take.

Apart from cli.py because argparse (with re and enum under it) costs a one-shot process
about 8 ms: a plain `cowfs checkpoint` never imports it (cli.plain_checkpoint).
"""

import argparse
import os
import sys

from . import __version__
from .cli import COMMANDS

# Commands whose arguments after "--" are not options (diff's paths, run's command), and how
# the synopsis shows them.
_AFTER_DASHES = {"diff": "[-- PATH...]", "run": "-- CMD [ARGS...]"}

def parse_turn(text: str) -> int:
    value = text.removeprefix("turn-")
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"not a turn: {text!r} (expected N or turn-N)")
    return int(value)


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors in one line as every other error of cowfs."""

    def error(self, message):
        print(f"cowfs: error: {message} (see: {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


class _Unparsed:
    """Stands for the parser of a command this run does not parse, never built: argparse takes
    ~0.2 ms for each (a gettext lookup, a help formatter), ~2 ms for them all. Takes any call
    and ignores it."""

    def __getattr__(self, name):
        return self._ignore

    def _ignore(self, *args, **kwargs):
        return self


class _Commands:
    """The subparsers: only the command *only*, or all of them if None (`cowfs --help`, and
    a command line naming none, whose error lists them)."""

    def __init__(self, sub, only: str | None):
        self.sub, self.only = sub, only

    def add_parser(self, name: str, **kwargs):
        if self.only in (None, name):
            return self.sub.add_parser(name, **kwargs)
        return _Unparsed()


def command_named(argv: list[str]) -> str | None:
    """The command *argv* names: its first word that is not an option (or -C's value), if it
    is one of COMMANDS."""
    words = iter(argv)
    for word in words:
        if word == "-C":
            next(words, None)
        elif word == "--":
            return None
        elif not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = _Parser(
        prog="cowfs",
        description="Copy-on-write checkpoints of a workspace: mount cowfs over it, end each turn "
                    "with `cowfs checkpoint`, browse .snapshots/turn-N, `cowfs rollback N`.")
    parser.add_argument("--version", action="version", version=f"cowfs {__version__}")
    parser.add_argument("-C", dest="top_cwd", metavar="PATH",
                        help="run as if cowfs was started in PATH (as git -C); also after the command")
    sub = _Commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"),
                    only)

    p = sub.add_parser("mount", help="mount cowfs over a workspace (returns once mounted)",
                       description="Mount cowfs over WORKSPACE (or at --at) and start recording turns. "
                                   "The first mount of a workspace makes its current tree turn 0.")
    p.add_argument("workspace", metavar="WORKSPACE")
    p.add_argument("--at", metavar="MOUNTPOINT", help="mount here instead of over WORKSPACE itself")
    p.add_argument("--foreground", action="store_true", help="run the daemon in this process")
    p.add_argument("--snapdir", choices=("hidden", "visible"), default="hidden",
                   help="list .snapshots in the root directory (default: hidden, reachable by name)")
    p.add_argument("--force", action="store_true",
                   help="mount even if files changed while cowfs was not mounted")
    p.add_argument("--debug", action="store_true", help="log every request to the daemon log")
    p.add_argument("--export-git-on-checkpoint", action="store_true",
                   help="after each checkpoint, export the new turns to the store's git repository "
                        "in the background (see export-git)")
    p.add_argument("--owner", metavar="USER",
                   help="as root: the user served by the mount's control channel "
                        "(default: the one sudo ran for)")
    p.add_argument("--allow-other", action="store_true",
                   help="let other users reach the mount (as the files' permissions allow); "
                        "always on as root, else needs user_allow_other in /etc/fuse.conf")
    p.add_argument("-o", dest="options", action="append", metavar="OPTIONS",
                   help="comma-separated mount options: noatime, relatime or strictatime (how reads "
                        "move atime; default: as the backing mount), nodiratime")
    p.add_argument("--initial-message", default="", metavar="MSG",
                   help="the message of turn 0 when this mount starts the history")
    p.add_argument("--auto-checkpoint", type=float, metavar="SECONDS",
                   help="seal the open turn after SECONDS without changes following a change "
                        "(a watcher process does it, as `cowfs checkpoint` would)")
    p.add_argument("--idle-umount", metavar="DURATION",
                   help="unmount by itself (sealing pending changes, as `cowfs umount`) once idle "
                        "for DURATION (e.g. 90s, 10m): no open file, no process working inside, "
                        "no request; mounting again finds the history intact")
    _add_limits(p, "after each checkpoint, in the background, prune ")
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)

    p = sub.add_parser("umount", help="seal pending changes as a turn and unmount",
                       description="Seal pending changes as a turn, unmount, and stop the daemon.")
    p.add_argument("path", nargs="?", metavar="PATH", help="the mount (default: -C or .)")
    p.add_argument("--lazy", action="store_true",
                   help="if processes still use the mount, detach it now; the daemon serves them "
                        "until the last one leaves, then seals their changes as a last turn and stops")
    _add_c(p)

    p = sub.add_parser("checkpoint", help="end the current turn; prints the sealed turn",
                       description="Flush pending writes and seal the open turn. Prints turn-N.")
    _add_c(p)
    p.add_argument("-m", "--message", default="", help="what happened in this turn")

    p = sub.add_parser("rollback", help="make the live tree exactly turn N",
                       description="Seal pending changes, make the live tree exactly TURN, and "
                                   "record that as a new turn (so it can be rolled back too).")
    _add_c(p)
    p.add_argument("turn", type=parse_turn, metavar="TURN", help="N or turn-N")

    p = sub.add_parser("log", help="list the turns (-v: what each changed, and which process)",
                       description="One line a turn, oldest first. With -v, each turn's changes "
                                   "follow it: kind (A/M/D/R/T), path, and the process that made "
                                   "the change (command, pid, uid).",
                       epilog="example: cowfs log -v -n 3     # the last three turns, change by change",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_c(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="list each turn's changes with the process that made each")
    p.add_argument("-n", type=int, metavar="N", help="only the last N turns")
    p.add_argument("--all", action="store_true",
                   help="count (and with -v list) changes in ignored paths too (.gitignore, "
                        ".venv/, node_modules/, caches, build output)")

    p = sub.add_parser(
        "diff", help="what changed between two turns (default: the open turn so far)",
        description="What changed from turn A to turn B. No turn: from the last sealed turn to the "
                    "live tree (what the open turn did so far); A alone: from A to the live tree. "
                    "Paths after -- limit the diff to those files and directories. Renames are the "
                    "ones the filesystem saw, never guessed. Paths the workspace's .gitignore files "
                    "ignore, virtualenvs, node_modules, caches and build output are left out and "
                    "counted (--all shows them; they are in the history all the same). On a "
                    "terminal the output goes through a pager ($COWFS_PAGER, $PAGER, else less -FRX).",
        epilog="examples:\n  cowfs diff                   # the open turn so far, as a patch\n"
               "  cowfs diff 3 5 --stat        # turn-3 to turn-5\n"
               "  cowfs diff 2 --name-status -- src",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_c(p)
    p.add_argument("turns", nargs="*", type=parse_turn, metavar="TURN", help="A [B]: N or turn-N")
    shown = p.add_mutually_exclusive_group()
    shown.add_argument("--name-status", action="store_true", help="one line a change: kind, path")
    shown.add_argument("--stat", action="store_true", help="a line a file with +/- counts")
    shown.add_argument("--json", action="store_true",
                       help="one object a change: kind, path, old_path, sizes, modes, process")
    p.add_argument("--no-pager", action="store_true", help="never page the output")
    p.add_argument("--all", action="store_true",
                   help="show changes in ignored paths too (.gitignore, .venv/, node_modules/, ...)")

    p = sub.add_parser(
        "restore", help="make some paths exactly what they were at a turn",
        description="Make each PATH (file, symlink or whole directory) exactly what it was at TURN: "
                    "content, mode, mtime, xattrs; a directory's later additions are removed; a "
                    "path that did not exist at TURN is removed. The restore is a change of the "
                    "open turn: `cowfs diff` shows it and `cowfs rollback` to the last sealed turn "
                    "undoes it. PATHs are relative to the current directory when it is inside the "
                    "mount, else to the workspace root.",
        epilog="example: cowfs restore 4 src/app.py docs/",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_c(p)
    p.add_argument("turn", type=parse_turn, metavar="TURN", help="N or turn-N")
    p.add_argument("paths", nargs="+", metavar="PATH")

    p = sub.add_parser(
        "run", help="run one command in the workspace, then seal its turn",
        description="Run CMD with the current directory (if inside the mount, else the workspace "
                    "root) as its working directory, through the mount, then seal the open turn "
                    "with MSG (default: the command line). Exits with the command's status.",
        epilog="example: cowfs -C ~/proj run -m 'format' -- black src",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_c(p)
    p.add_argument("-m", "--message", help="the turn's message (default: the command line)")

    p = sub.add_parser("status", help="show the mount, current turn, capture mode and store size")
    _add_c(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("export-git", help="write every sealed turn as a git commit",
                       description="Write each sealed turn not yet exported as one commit on BRANCH "
                                   "(tree = the turn's snapshot, message = the turn's message with a "
                                   "Cowfs-Turn trailer). Default repository: a bare one in the store "
                                   "(WORKSPACE/.cowfs/git). Git cannot hold empty directories, "
                                   "FIFOs, sockets, devices or .git directories: they are left out "
                                   "and counted.")
    _add_c(p)
    p.add_argument("--to", metavar="REPO", help="an existing git repository outside the workspace")
    p.add_argument("--branch", default="cowfs", help="the branch to create or extend (default: cowfs)")

    p = sub.add_parser(
        "prune", help="free the store of the oldest turns",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Remove the oldest turns and everything only they needed (pre-images,\n"
                    "objects kept for them); print the turns removed and the bytes freed (from\n"
                    "the filesystem's free space). The open turn and the newest sealed turn are\n"
                    "never pruned; turn numbers are never reused. A pruned turn is gone from\n"
                    ".snapshots and `cowfs log`; asking for it is an error naming the oldest\n"
                    "turn kept. Several limits: the strictest wins.",
        epilog="examples:\n  cowfs prune --keep 20            # keep the newest 20 sealed turns\n"
               "  cowfs prune --older-than 7d --dry-run\n"
               "  cowfs prune --max-store 2G       # oldest turns first, until the store fits")
    _add_c(p)
    _add_limits(p, "prune ")
    p.add_argument("--dry-run", action="store_true",
                   help="say what would go and about how much it holds; change nothing")

    p = sub.add_parser(
        "mcp", help="serve the history to an agent: an MCP server on stdin/stdout",
        description="Run an MCP server over stdio for the mount holding PATH (default: the "
                    "current directory): tools to list turns, diff, show old files, name the "
                    "process behind a change, checkpoint, restore and roll back (undoably), and "
                    "cowfs:// resources for turns and old files. Needs the extra: "
                    "pip install 'cowfs[mcp]'. See docs/harness.md to register it with an agent.",
        epilog="example: claude mcp add cowfs -- cowfs mcp -C ~/proj",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_c(p)

    p = sub.add_parser(
        "fsck", help="check an unmounted workspace's store (and --repair it)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Check the store of an unmounted WORKSPACE: the catalogue file, turn records, "
                    "rows against the store's files (missing pre-images, orphans, objects gone), "
                    "and the tree against the last session (drift). One line per finding, then "
                    "a summary.",
        epilog="exit codes:\n"
               "  0  the store is consistent (with --repair: after the repairs)\n"
               "  1  problems found (with --repair: some could not be repaired)\n"
               "  2  bad input: not a directory, no store, mounted, a newer format\n\n"
               "--repair loses nothing: orphan files are moved into .cowfs/lost+found, a lost\n"
               "pre-image or object is recorded as lost (snapshots that need it answer EIO),\n"
               "a damaged catalogue is copied row by row into a new one (the old one kept).\n"
               "Drift is only reported: `cowfs mount --force` accepts it.")
    p.add_argument("workspace", nargs="?", default=".", metavar="WORKSPACE",
                   help="the workspace directory (default: the current directory)")
    p.add_argument("--repair", action="store_true",
                   help="mend what can be mended without losing anything")
    return parser


def _add_limits(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--keep", metavar="N", help=what + "all but the newest N sealed turns")
    p.add_argument("--older-than", metavar="DURATION",
                   help=what + "turns sealed longer ago than DURATION (30m, 12h, 7d, 2w)")
    p.add_argument("--max-store", metavar="SIZE",
                   help=what + "the oldest turns until pre-images and kept objects fit in SIZE "
                               "(500M, 2G)")


def _add_c(p: argparse.ArgumentParser) -> None:
    p.add_argument("-C", dest="cwd", metavar="PATH",
                   help="any path inside the mount (default: the current directory)")


def synopsis(width: int = 100) -> str:
    """Every command with every option, one command a paragraph: README's synopsis, which
    tests/test_first_hour.py holds to this (regenerate: python -c 'from cowfs.arguments import
    synopsis; print(synopsis())')."""
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    lines = [_wrapped("cowfs " + " ".join(_words(parser, skip={"command"})) + " COMMAND ...", width)]
    for name, p in commands.choices.items():
        lines.append(_wrapped(" ".join([f"cowfs {name}", *_words(p)]), width))
    return "\n".join(lines)


def _words(p: argparse.ArgumentParser, skip=frozenset()) -> list[str]:
    """The usage words of *p*'s arguments, positionals first, help and hidden ones left out,
    options of a mutually exclusive group in one pair of brackets."""
    shown = [a for a in p._actions if a.help != argparse.SUPPRESS and a.dest not in skip
             and not isinstance(a, argparse._HelpAction)]
    words = [_word(a) for a in shown if not a.option_strings]
    done = set()
    for a in shown:
        if a.option_strings and id(a) not in done:
            group = next((g._group_actions for g in p._mutually_exclusive_groups
                          if a in g._group_actions), [a])
            done.update(map(id, group))
            words.append("[" + " | ".join(map(_word, group)) + "]")
    command = p.prog.removeprefix("cowfs ")
    return words + ([_AFTER_DASHES[command]] if command in _AFTER_DASHES else [])


def _word(a: argparse.Action) -> str:
    if not a.option_strings:
        name = a.metavar or a.dest
        return {"?": f"[{name}]", "*": f"[{name}...]", "+": f"{name}..."}.get(a.nargs, name)
    value = "" if a.nargs == 0 else " " + (a.metavar or "|".join(a.choices or []) or a.dest.upper())
    return "|".join(a.option_strings) + value


def _wrapped(text: str, width: int) -> str:
    out, line = [], ""
    for word in _usage_words(text):
        if line and len(line) + 1 + len(word) > width:
            out.append(line)
            line = "    " + word
        else:
            line = f"{line} {word}" if line else word
    return "\n".join(out + [line])


def _usage_words(text: str) -> list[str]:
    """*text* split at spaces outside brackets: an option and its value stay on one line."""
    words, depth, word = [], 0, ""
    for ch in text:
        depth += ch == "["
        depth -= ch == "]"
        if ch == " " and depth == 0:
            words.append(word)
            word = ""
        else:
            word += ch
    return words + [word]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse, keeping what follows "--" of diff and run apart; -C before the command or after it
    (after wins) names where the command runs, as git -C."""
    argv = list(sys.argv[1:] if argv is None else argv)
    tail: list[str] = []
    command = command_named(argv)
    if command in _AFTER_DASHES and "--" in argv:
        cut = argv.index("--")
        argv, tail = argv[:cut], argv[cut + 1:]
    args = build_parser(command).parse_args(argv)
    args.after_dashes = tail
    args.base = getattr(args, "cwd", None) or args.top_cwd    # relative paths are taken from here
    if hasattr(args, "cwd"):
        args.cwd = args.cwd or args.top_cwd or "."
    if args.top_cwd and args.command == "mount":
        args.workspace = os.path.join(args.top_cwd, args.workspace)
        if args.at:
            args.at = os.path.join(args.top_cwd, args.at)
    if args.top_cwd and args.command == "fsck":
        args.workspace = os.path.join(args.top_cwd, args.workspace)
    if args.top_cwd and args.command == "umount" and args.path:
        args.path = os.path.join(args.top_cwd, args.path)
    return args
