"""Patches: the changes of a diff as git writes them (unified patch, --stat), from their contents.

Owns the text formats only: what changed comes from history.py (through the
daemon), the contents from wherever the caller reads them (the snapshots
and the live tree, through the mount). Binary content (a NUL byte in its
first 8,000 bytes, git's rule) is named, never printed.
"""

import difflib
import stat
from dataclasses import dataclass

BINARY_PROBE = 8000
NO_NEWLINE = "\\ No newline at end of file\n"


@dataclass
class FileDiff:
    """One change with its contents: what the patch and the stat of it are made from."""
    kind: str
    path: str
    old_path: str | None
    old_mode: int | None
    new_mode: int | None
    old: bytes | None          # content (a symlink's target); None: none on that side
    new: bytes | None
    insertions: int = 0
    deletions: int = 0

    @property
    def binary(self) -> bool:
        return any(data is not None and b"\0" in data[:BINARY_PROBE] for data in (self.old, self.new))


def git_mode(mode: int | None) -> str:
    if mode is None:
        return ""
    if stat.S_ISLNK(mode):
        return "120000"
    if stat.S_ISREG(mode):
        return "100755" if mode & 0o111 else "100644"
    return f"{stat.S_IFMT(mode) >> 12:o}0000" if stat.S_IFMT(mode) else f"{mode:o}"


def _lines(data: bytes | None) -> list[str]:
    return [] if data is None else data.decode("utf-8", "surrogateescape").splitlines(keepends=True)


def _hunks(old: list[str], new: list[str], fd: FileDiff) -> list[str]:
    out = []
    fd.insertions = fd.deletions = 0
    for line in list(difflib.unified_diff(old, new, n=3, lineterm="\n"))[2:]:
        if line.startswith("+"):
            fd.insertions += 1
        elif line.startswith("-"):
            fd.deletions += 1
        out.append(line if line.endswith("\n") else line + "\n" + NO_NEWLINE)
    return out


def file_patch(fd: FileDiff) -> str:
    """The patch of one change, git style (a type change is a deletion and an addition)."""
    if fd.kind == "T":
        gone = FileDiff("D", fd.old_path or fd.path, fd.old_path, fd.old_mode, None, fd.old, None)
        came = FileDiff("A", fd.path, None, None, fd.new_mode, None, fd.new)
        text = file_patch(gone) + file_patch(came)
        fd.insertions, fd.deletions = came.insertions, gone.deletions
        return text
    old_path = fd.old_path or fd.path
    head = [f"diff --git a/{old_path} b/{fd.path}\n"]
    if fd.kind == "A":
        head.append(f"new file mode {git_mode(fd.new_mode)}\n")
    elif fd.kind == "D":
        head.append(f"deleted file mode {git_mode(fd.old_mode)}\n")
    else:
        if git_mode(fd.old_mode) != git_mode(fd.new_mode) or fd.old_mode != fd.new_mode:
            head += [f"old mode {fd.old_mode:o}\n", f"new mode {fd.new_mode:o}\n"]
        if fd.kind == "R":
            head += [f"rename from {old_path}\n", f"rename to {fd.path}\n"]
    if fd.old == fd.new or (fd.old is None and fd.new is None):
        return "".join(head)
    a = "/dev/null" if fd.kind == "A" else f"a/{old_path}"
    b = "/dev/null" if fd.kind == "D" else f"b/{fd.path}"
    if fd.binary:
        return "".join(head) + f"Binary files {a} and {b} differ\n"
    body = _hunks(_lines(fd.old), _lines(fd.new), fd)
    return "".join(head + [f"--- {a}\n", f"+++ {b}\n"] + body)


def patch(diffs: list[FileDiff]) -> str:
    return "".join(file_patch(fd) for fd in diffs)


def diffstat(diffs: list[FileDiff], width: int = 80) -> str:
    """git's --stat: a line per file and a summary; counts come from file_patch (called here)."""
    for fd in diffs:
        if fd.insertions == fd.deletions == 0:
            file_patch(fd)
    if not diffs:
        return ""
    names = [fd.path if fd.kind != "R" else f"{fd.old_path} => {fd.path}" for fd in diffs]
    name_width = max(len(n) for n in names)
    counts = [fd.insertions + fd.deletions for fd in diffs]
    count_width = max(len(str(c)) for c in counts)
    bar_room = max(10, width - name_width - count_width - 6)
    biggest = max(counts) or 1
    lines = []
    for name, fd, count in zip(names, diffs, counts):
        if fd.binary:
            lines.append(f" {name:<{name_width}} | Bin {len(fd.old or b'')} -> {len(fd.new or b'')} bytes\n")
            continue
        scale = min(1.0, bar_room / biggest)
        plus, minus = round(fd.insertions * scale), round(fd.deletions * scale)
        lines.append(f" {name:<{name_width}} | {count:>{count_width}} {'+' * plus}{'-' * minus}\n")
    ins, dels = sum(fd.insertions for fd in diffs), sum(fd.deletions for fd in diffs)
    summary = f" {len(diffs)} file{'s' if len(diffs) != 1 else ''} changed"
    if ins:
        summary += f", {ins} insertion{'s' if ins != 1 else ''}(+)"
    if dels:
        summary += f", {dels} deletion{'s' if dels != 1 else ''}(-)"
    return "".join(lines) + summary + "\n"
