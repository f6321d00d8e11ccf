"""Ignore rules: `.cowfsignore` at the workspace root, and what they spare from capture.

Owns the rules (gitignore syntax, matched by pathspec's GitIgnoreSpec), the
rules each turn used (a copy of the text in the catalogue whenever it
changes), which paths a snapshot hides, and which things of the open turn
capture may pass over. See docs/architecture.md, "Ignore rules".

- The rules of turn t are read when t opens (at the checkpoint that seals
  t-1, or at the mount that opens it) and never change during t.
- The snapshot of turn k hides every path the rules of turn k+1 match: fixed
  when k is sealed, so a snapshot never changes, and it never shows a thing
  whose changes after k may have gone unrecorded.
- Capture passes over a thing only if no sealed snapshot can show it: the
  *ignored things* (rows of table `ignored`: a file or directory made at a
  matching path outside any ignored directory, or found at one on which the
  rules of every turn so far agree) and everything below an ignored
  directory. A thing is checked once per turn, at its first change (where
  capture resolves its path anyway), a directory once per turn when a change
  inside it comes first: never on the read/write/lookup path. A thing stops
  being ignored, for good, as soon as an earlier snapshot could show it: the
  rules stop matching its path, it or a directory above it was moved
  (an entry row names it), or a row refers to it (it came from outside).
"""

import os
import re
import stat

import pathspec

from . import libc
from .store import tree_path

RULES_FILE = b".cowfsignore"
MAX_RULES_BYTES = 1 << 20


class BadRules(Exception):
    """`.cowfsignore` cannot be used; the message is one line for the user."""


def _join(parent: bytes, name: bytes) -> bytes:
    return parent + b"/" + name if parent else name


class Rules:
    """One version of `.cowfsignore`, compiled."""

    def __init__(self, text: str):
        self.text = text
        lines = text.splitlines()
        for number, line in enumerate(lines, 1):
            try:
                pathspec.GitIgnoreSpec.from_lines([line])
            except (ValueError, re.error) as e:
                raise BadRules(f".cowfsignore line {number}: {line!r} is not a valid pattern "
                               f"({str(e).splitlines()[0]})") from None
        self.spec = pathspec.GitIgnoreSpec.from_lines(lines)
        self.empty = not self.spec.patterns or all(p.include is None for p in self.spec.patterns)

    def matches(self, path: bytes, is_dir: bool) -> bool:
        """Whether *path* (relative to the root) is ignored; a directory's patterns end in '/'."""
        if self.empty:
            return False
        return self.spec.match_file(os.fsdecode(path) + ("/" if is_dir else ""))

    def hides(self, path: bytes, is_dir: bool | None) -> bool:
        """As matches, when the kind is unknown (None): hidden either way."""
        if self.empty:
            return False
        if is_dir is None:
            return self.matches(path, False) or self.matches(path, True)
        return self.matches(path, is_dir)

    def patterns(self) -> list[str]:
        return [line for line in self.text.splitlines() if line.strip() and not line.startswith("#")]


NO_RULES = Rules("")


def read_rules(root_fd: int) -> str:
    """The text of `.cowfsignore` in the directory open as *root_fd* ("" if there is none).

    Read by descriptor, never by name under the mount; a symlink is refused,
    not followed (it could lead into the mount)."""
    try:
        fd = os.open(RULES_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=root_fd)
    except FileNotFoundError:
        return ""
    except OSError as e:
        raise BadRules(f".cowfsignore cannot be read: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BadRules(".cowfsignore is not a regular file")
        if st.st_size > MAX_RULES_BYTES:
            raise BadRules(f".cowfsignore is larger than {MAX_RULES_BYTES} bytes")
        data = os.pread(fd, MAX_RULES_BYTES + 1, 0)
    finally:
        os.close(fd)
    return data.decode("utf-8", "surrogateescape")


def load_rules(root_fd: int) -> Rules:
    """`.cowfsignore` compiled; raises BadRules."""
    return Rules(read_rules(root_fd))


class RuleHistory:
    """The rules of every turn: the catalogue keeps the text at each turn where it changed."""

    def __init__(self, rows: list[tuple[int, str]]):
        self._changes: list[tuple[int, Rules]] = []
        for turn, text in sorted(rows):
            try:
                self._changes.append((turn, Rules(text)))
            except BadRules:
                self._changes.append((turn, NO_RULES))    # never stored: checked before

    def add(self, turn: int, rules: Rules) -> bool:
        """Rules of *turn* and later. False (nothing to store) if they are the ones in force."""
        if self.at(turn).text == rules.text:
            return False
        self._changes = [(t, r) for t, r in self._changes if t < turn] + [(turn, rules)]
        return True

    def at(self, turn: int) -> Rules:
        found = NO_RULES
        for first, rules in self._changes:
            if first > turn:
                break
            found = rules
        return found

    def between(self, first: int, last: int) -> list[Rules]:
        """Every version of the rules in force in some turn of first..last."""
        if first > last:
            return []
        found = [self.at(first)]
        found += [rules for start, rules in self._changes if first < start <= last]
        return found

    def snapshot_rules(self, turn: int) -> Rules:
        """What the snapshot of sealed turn *turn* hides: the rules of the turn after it."""
        return self.at(turn + 1)


# What before_entry_change learns of an entry (Ignore.entry).
RECORD, INSIDE, HOLDS_IGNORED = 0, 1, 2


class Ignore:
    """The capture side: which things of the open turn capture passes over.

    Per turn it remembers, for each directory it was asked about, whether it
    lies in an ignored directory, and for each ignored thing whether it still
    is one; the `ignored` rows say since which turn no snapshot shows them.
    """

    def __init__(self, catalogue, root_fd: int, root_prefix: bytes, turn: int):
        self.catalogue = catalogue
        self.root_fd = root_fd
        self.root_ino = os.fstat(root_fd).st_ino
        self.root_prefix = root_prefix
        self.history = RuleHistory(catalogue.rules_rows())
        self.things = catalogue.ignored_things()      # ino -> turn since which no snapshot shows it
        self.new_turn(turn)

    def new_turn(self, turn: int) -> None:
        self.turn = turn
        self.rules = self.history.at(turn)
        self._inside: dict[int, bool] = {}       # directory ino -> in an ignored directory
        self._checked: dict[int, bool] = {}      # ignored thing -> still ignored this turn

    @property
    def active(self) -> bool:
        return bool(self.things) or not self.rules.empty

    def open_turn_rules(self, turn: int, rules: Rules) -> None:
        """Turn *turn* opens with *rules* (stored if they differ from the last ones)."""
        if self.history.add(turn, rules):
            self.catalogue.set_rules(turn, rules.text)
        self.new_turn(turn)

    # -- paths ---------------------------------------------------------------------------
    def path_of(self, fd: int) -> bytes | None:
        """Where the object open as *fd* is now, relative to the root; None if not in the tree."""
        try:
            return tree_path(fd, self.root_prefix)
        except OSError:
            return None

    def _ino_at(self, path: bytes) -> int | None:
        try:
            return os.stat(path or b".", dir_fd=self.root_fd, follow_symlinks=False).st_ino
        except OSError:
            return None

    def _chain(self, path: bytes) -> list[int] | None:
        """The objects along *path*, the root excluded."""
        inos, done = [], b""
        for part in path.split(b"/"):
            done = _join(done, part)
            ino = self._ino_at(done)
            if ino is None:
                return None
            inos.append(ino)
        return inos

    # -- ignored things -------------------------------------------------------------------
    def still_ignored(self, ino: int, path: bytes | None, is_dir: bool) -> bool:
        """Whether ignored thing *ino*, now at *path*, still is one (once per turn)."""
        known = self._checked.get(ino)
        if known is not None:
            return known
        since = self.things.get(ino)
        ok = since is not None and path is not None and self._hidden_since(ino, path, is_dir, since)
        if since is not None:
            if ok and since != self.turn:
                self.things[ino] = self.turn
                self.catalogue.set_ignored(ino, self.turn)
            elif not ok:
                self.forget(ino)
        self._checked[ino] = ok
        return ok

    def _hidden_since(self, ino: int, path: bytes, is_dir: bool, since: int) -> bool:
        """No snapshot of a turn from *since* - 1 on shows *ino* (at *path* since then)."""
        chain = self._chain(path)
        if chain is None or chain[-1] != ino:
            return False
        if self.catalogue.named_since(chain, since) or self.catalogue.ref(ino) is not None:
            return False        # it or a directory above it moved, or a row refers to it
        return all(r.matches(path, is_dir) for r in self.history.between(since, self.turn))

    def forget(self, ino: int) -> None:
        if self.things.pop(ino, None) is not None:
            self.catalogue.drop_ignored(ino)
        self._checked[ino] = False
        self._inside.clear()

    def grant(self, ino: int, since: int) -> None:
        self.things[ino] = since
        self.catalogue.set_ignored(ino, since)
        self._checked[ino] = True
        self._inside.pop(ino, None)

    def _found_ignored(self, ino: int, path: bytes, is_dir: bool) -> bool:
        """A thing that no row names, at a path the rules of every turn so far match (a tree
        that was there at the first mount with its `.cowfsignore`): ignored from now on."""
        if self.rules.empty or not self.rules.matches(path, is_dir):
            return False
        if not self._hidden_since(ino, path, is_dir, 1):
            return False
        self.grant(ino, self.turn)
        return True

    # -- directories -----------------------------------------------------------------------
    def inside(self, ino: int, path: bytes | None) -> bool:
        """Directory *ino* (at *path*) is an ignored directory or lies in one (once per turn)."""
        known = self._inside.get(ino)
        if known is not None:
            return known
        result = self._compute_inside(ino, path)
        self._inside[ino] = result
        return result

    def _compute_inside(self, ino: int, path: bytes | None) -> bool:
        if ino == self.root_ino or not path:
            return False
        if ino in self.things and self.still_ignored(ino, path, True):
            return True
        if self.catalogue.ref(ino) is not None:
            return False        # an earlier snapshot may show it (a row refers to it)
        parent_path = path.rpartition(b"/")[0]
        parent = self._ino_at(parent_path)
        if parent is None:
            return False
        if self.inside(parent, parent_path):
            return True
        return self._found_ignored(ino, path, True)

    # -- what capture asks ------------------------------------------------------------------------
    def entry(self, parent: int, parent_fd: int, name: bytes) -> int:
        """RECORD, INSIDE (an ignored directory's entry: record nothing) or HOLDS_IGNORED (the
        entry holds an ignored thing: its change needs no entry row, nor a kept object)."""
        if not self.active:
            return RECORD
        path = self.path_of(parent_fd)
        if self.inside(parent, path):
            return INSIDE
        if not self.things or path is None:
            return RECORD
        try:
            st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        except OSError:
            return RECORD
        if st.st_ino in self.things and self.still_ignored(st.st_ino, _join(path, name),
                                                           stat.S_ISDIR(st.st_mode)):
            return HOLDS_IGNORED
        return RECORD

    def object_passes(self, ino: int, fd: int, st: os.stat_result) -> bool:
        """Object *ino* (open as *fd*) is ignored: its attributes and content need no pre-image."""
        if not self.active:
            return False
        path = self.path_of(fd)
        if path is None:
            return False
        if stat.S_ISDIR(st.st_mode):
            return self.inside(ino, path)
        if st.st_nlink != 1:
            return False        # another name may be one a snapshot shows
        if ino in self.things:
            return self.still_ignored(ino, path, False)
        if self.catalogue.ref(ino) is not None:
            return False
        parent_path = path.rpartition(b"/")[0]
        parent = self._ino_at(parent_path)
        if parent is not None and self.inside(parent, parent_path):
            return True
        return self._found_ignored(ino, path, False)

    def created(self, parent: int, parent_fd: int, name: bytes, ino: int, is_dir: bool) -> None:
        """Object *ino* was just made as entry *name* of *parent* (not in an ignored directory):
        ignored from now on if the rules match it. No snapshot before this turn has it."""
        if self.rules.empty:
            return
        path = self.path_of(parent_fd)
        if path is None or self.inside(parent, path):
            return
        if self.rules.matches(_join(path, name), is_dir):
            self.grant(ino, self.turn)

    def moved(self, ino: int, born: bool, new_parent: int, new_parent_fd: int, new_name: bytes,
              is_dir: bool) -> None:
        """Object *ino* is about to become entry *new_name* of *new_parent* (a rename).

        An ignored thing stays one only at a path the rules match, outside any
        ignored directory; a thing made in this turn becomes one there."""
        if not self.active:
            return
        path = self.path_of(new_parent_fd)
        fits = (path is not None and not self.inside(new_parent, path)
                and self.rules.matches(_join(path, new_name), is_dir))
        if ino in self.things:
            if not fits:
                self.forget(ino)
            self._inside.pop(ino, None)
        elif born and fits:
            self.grant(ino, self.turn)

    def removed(self, ino: int) -> None:
        """Ignored thing *ino* lost its last name: its number may be reused."""
        if ino in self.things:
            self.forget(ino)

    # -- rollback and restore ---------------------------------------------------------------
    def ignored_below(self, dir_fd: int) -> bytes | None:
        """The first ignored thing below the directory open as *dir_fd* (O_PATH), relative to
        it; None if there is none. Names only (d_ino), no stat: O(the subtree)."""
        if not self.things:
            return None
        stack = [(os.open(libc.proc_path(dir_fd), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), b"")]
        try:
            while stack:
                fd, prefix = stack.pop()
                try:
                    with os.scandir(fd) as it:
                        for entry in it:
                            name = os.fsencode(entry.name)
                            if entry.inode() in self.things:
                                return _join(prefix, name)
                            if entry.is_dir(follow_symlinks=False):
                                sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                                              | os.O_CLOEXEC, dir_fd=fd)
                                stack.append((sub, _join(prefix, name)))
                finally:
                    os.close(fd)
        finally:
            for fd, _ in stack:
                os.close(fd)
        return None
