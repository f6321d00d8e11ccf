"""What a view of the history leaves out: paths the workspace's `.gitignore` files ignore, and noise.

Owns the display filter every view shares (`cowfs diff`, `--stat`, `--name-status`, `cowfs log`
counts, `Turn.changes`, the compat manager's diff and counts), so that they all count the same
way. History stays exact: capture, rollback and restore never ask this module anything; a view
says how many changes it left out, and `--all` (`include_ignored`) shows them.

Ignored means what git would ignore: the `.gitignore` of each directory on the way down
(deeper ones win, `!` re-includes, nothing below an ignored directory counts), the
repository's `.git/info/exclude`, and below them all a short default list of what no one reads
in a diff (virtualenvs, `node_modules`, caches, build output; a `.gitignore` can re-include
any of it). The files are read from the tree the view shows (the live tree, or a snapshot), and
only those on the paths of the changes: O(what changed), never a walk.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

import pathspec

DEFAULT_NOISE = (
    # virtualenvs and installed packages
    ".venv/", "venv/", ".tox/", ".nox/", "site-packages/", "node_modules/", ".pnpm-store/",
    # caches
    "__pycache__/", "*.py[cod]", ".cache/", ".pytest_cache/", ".mypy_cache/", ".ruff_cache/",
    ".hypothesis/", ".gradle/", ".coverage", "htmlcov/", "coverage/",
    # build output
    "build/", "dist/", "target/", "out/", ".next/", ".nuxt/", "*.egg-info/", "*.o", "*.so",
    "*.a", "*.class",
    # other tools' histories
    ".git/", ".hg/", ".svn/",
)


class Noise:
    """Which paths (relative to *root*, "/"-separated) a view leaves out."""

    def __init__(self, root: str | os.PathLike, defaults=DEFAULT_NOISE):
        self.root = Path(root)
        base = list(defaults) + _lines(self.root / ".git" / "info" / "exclude")
        self._base = pathspec.GitIgnoreSpec.from_lines(base)
        self._specs: dict[str, pathspec.GitIgnoreSpec | None] = {}
        self._decided: dict[tuple[str, bool], bool] = {}

    def ignored(self, path: str, is_dir: bool = False) -> bool:
        """*path* is ignored, or lies in an ignored directory."""
        parts = [p for p in path.split("/") if p]
        for i in range(1, len(parts) + 1):
            if self._decide("/".join(parts[:i]), is_dir or i < len(parts)):
                return True
        return False

    def _decide(self, path: str, is_dir: bool) -> bool:
        key = (path, is_dir)
        if key not in self._decided:
            self._decided[key] = self._match(path, is_dir)
        return self._decided[key]

    def _match(self, path: str, is_dir: bool) -> bool:
        """The last pattern that matches, from the defaults down to the deepest .gitignore."""
        suffix = "/" if is_dir else ""
        verdict = self._base.check_file(path + suffix).include
        parts = path.split("/")
        for depth in range(len(parts)):
            spec = self._spec("/".join(parts[:depth]))
            if spec is not None:
                found = spec.check_file("/".join(parts[depth:]) + suffix).include
                verdict = verdict if found is None else found
        return bool(verdict)

    def _spec(self, directory: str) -> pathspec.GitIgnoreSpec | None:
        if directory not in self._specs:
            lines = _lines(self.root / directory / ".gitignore")
            self._specs[directory] = pathspec.GitIgnoreSpec.from_lines(lines) if lines else None
        return self._specs[directory]


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text(errors="surrogateescape").splitlines()
    except OSError:         # none there (the usual case), or not a file
        return []


@dataclass(frozen=True)
class Shown:
    """The changes a view shows, and how many it left out."""
    changes: list
    ignored: int


def is_noise(noise: Noise, change) -> bool:
    """A change (api.Change or patch.FileDiff) is left out when every path it has is ignored."""
    is_dir = any(m is not None and stat.S_ISDIR(m) for m in (change.new_mode, change.old_mode))
    return all(noise.ignored(p, is_dir) for p in {change.path, change.old_path} if p is not None)


def split(changes: list, root: str | os.PathLike, include_ignored: bool = False) -> Shown:
    """*changes* without the noise of the tree at *root* (all of them with *include_ignored*)."""
    if include_ignored:
        return Shown(list(changes), 0)
    noise = Noise(root)
    shown = [c for c in changes if not is_noise(noise, c)]
    return Shown(shown, len(changes) - len(shown))


def left_out(count: int, how: str = "--all") -> str:
    """The line a view adds when it left changes out ("" when it did not)."""
    if not count:
        return ""
    s = "" if count == 1 else "s"
    return f"and {count:,} change{s} in ignored paths ({how} shows them)"
