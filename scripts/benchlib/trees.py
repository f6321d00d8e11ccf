"""Synthetic workspaces, agent turns, shadow git and the stdlib tarball.

A tree of N files: file i is ``dAAA/dB/dC/fNN.dat`` (100 files per leaf
directory, 10 leaves per middle directory, 10 middles per top directory), 10 KB
of random-looking bytes from a fixed seed.  Content is a function of
(i, version): version 0 is the original, a turn rewrites files with a new
version, so every rewrite really changes the bytes and anyone can check which
version a file holds.
"""

import os
import random
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from .system import run, timed, timed_run

FILE_SIZE = 10 * 1024
FILES_PER_DIR = 100
SEED = 20240503

_POOL = random.Random(SEED).randbytes(1 << 20)


def tree_path(i):
    leaf = i // FILES_PER_DIR
    return f"d{leaf // 100:03d}/d{leaf // 10 % 10}/d{leaf % 10}/f{i % FILES_PER_DIR:02d}.dat"


def file_bytes(i, version=0):
    header = b"file %d version %d\n" % (i, version)
    offset = (i * 7919 + version * 104729) % (len(_POOL) - FILE_SIZE)
    return header + _POOL[offset:offset + FILE_SIZE - len(header)]


def write_file(path, data):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def make_tree(root, nfiles):
    """Create the synthetic tree of ``nfiles`` files under ``root``."""
    root = Path(root)
    for i in range(nfiles):
        if i % FILES_PER_DIR == 0:
            os.makedirs(root / os.path.dirname(tree_path(i)), exist_ok=True)
        write_file(root / tree_path(i), file_bytes(i))
    return root


def rewrite_files(root, nfiles, count, version):
    """A turn that rewrites ``count`` distinct files (open O_TRUNC + write, as
    an agent's edit tool does).  Returns the indices changed."""
    picked = random.Random(version).sample(range(nfiles), count)
    for i in picked:
        write_file(Path(root) / tree_path(i), file_bytes(i, version))
    return picked


@dataclass
class MixedChange:
    """A bigger turn: files rewritten, deleted and created."""
    modified: list = field(default_factory=list)
    deleted: list = field(default_factory=list)
    created: list = field(default_factory=list)  # relative paths

    @property
    def size(self):
        return len(self.modified) + len(self.deleted) + len(self.created)


def mixed_change(root, nfiles, count, version):
    """``count`` changed files: 80 % rewritten, 10 % deleted, 10 % new."""
    root = Path(root)
    n_del = n_new = count // 10
    picked = random.Random(version).sample(range(nfiles), count - n_new)
    change = MixedChange(modified=picked[n_del:], deleted=picked[:n_del])
    for i in change.modified:
        write_file(root / tree_path(i), file_bytes(i, version))
    for i in change.deleted:
        os.unlink(root / tree_path(i))
    for k in range(n_new):
        rel = os.path.join(os.path.dirname(tree_path(k * 37 % nfiles)), f"new-{version}-{k}.dat")
        write_file(root / rel, file_bytes(nfiles + k, version))
        change.created.append(rel)
    return change


def reverted(root, change):
    """True if ``change`` was undone: originals back, new files gone."""
    root = Path(root)
    if any((root / rel).exists() for rel in change.created):
        return False
    for i in change.deleted[:50] + change.modified[:50]:
        try:
            if (root / tree_path(i)).read_bytes() != file_bytes(i):
                return False
        except FileNotFoundError:
            return False
    return True


# --------------------------------------------------------------------------
# git

GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@localhost",
    "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@localhost",
    "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull,
}


def git_env(**extra):
    env = dict(os.environ)
    for key in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE"):
        env.pop(key, None)
    env.update(GIT_IDENTITY)
    env.update(extra)
    return env


class ShadowGit:
    """Checkpoints the way agent tools keep them: a repository whose GIT_DIR
    lives outside the work tree, ``git add -A`` + ``git commit`` per turn.
    Automatic gc is off so a background gc never lands in a timed step."""

    def __init__(self, git_dir, work_tree):
        self.work_tree = Path(work_tree)
        self.env = git_env(GIT_DIR=str(git_dir), GIT_WORK_TREE=str(work_tree))
        self.commits = 0

    def git(self, *args, ok=(0,)):
        return run(["git", *args], cwd=self.work_tree, env=self.env, ok=ok)

    def init(self):
        self.git("init", "-q")
        self.git("config", "gc.auto", "0")
        return self

    def commit(self, message=None):
        """``git add -A`` then ``git commit -q``; return elapsed ms of both."""
        self.commits += 1
        message = message or f"turn {self.commits}"
        return timed(lambda: (self.git("add", "-A"),
                              self.git("commit", "-q", "--allow-empty", "-m", message)))[0]

    def restore(self):
        """Discard the work tree's changes; return elapsed ms."""
        return timed(lambda: (self.git("checkout", "--", "."),
                              self.git("clean", "-fdq")))[0]


def make_git_repo(path, nfiles):
    """An ordinary repository (``.git`` inside) holding a committed tree."""
    make_tree(path, nfiles)
    env = git_env()
    run(["git", "init", "-q"], cwd=path, env=env)
    run(["git", "config", "gc.auto", "0"], cwd=path, env=env)
    run(["git", "add", "-A"], cwd=path, env=env)
    run(["git", "commit", "-q", "-m", "synthetic tree"], cwd=path, env=env)
    return path


def reflink_copy(src, dst):
    """``cp -a --reflink=always``; returns elapsed ms."""
    return timed_run(["cp", "-a", "--reflink=always", src, dst])


# --------------------------------------------------------------------------
# the standard library tarball and big files


def stdlib_tarball(dest, with_tests=True):
    """Tar the running interpreter's standard library (no site-packages, no
    __pycache__; without the top-level ``test`` package if not ``with_tests``).
    Returns (path, number of regular files)."""
    stdlib = sysconfig.get_paths()["stdlib"]
    excludes = ["--exclude=./site-packages", "--exclude=__pycache__"]
    if not with_tests:
        excludes.append("--exclude=./test")
    run(["tar", "-C", stdlib, *excludes, "-cf", dest, "."])
    listing = run(["tar", "-tvf", dest]).stdout.decode(errors="replace")
    nfiles = sum(1 for line in listing.splitlines() if line.startswith("-"))
    return Path(dest), nfiles


def write_big_file(path, size, chunk=1 << 20):
    """A non-sparse file of ``size`` bytes: fallocate (so XFS does no
    speculative preallocation), then real data over every block."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.posix_fallocate(fd, 0, size)
        block = _POOL[:chunk]
        for offset in range(0, size, chunk):
            os.pwrite(fd, block[:min(chunk, size - offset)], offset)
        os.fsync(fd)
    finally:
        os.close(fd)
