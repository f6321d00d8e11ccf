"""diff and restore against a model: random turns of real changes through the mount, then every
diff between recorded turns compared with the diff of the turns' manifests, and random restores
compared with the manifest of the turn restored from.

The manifests are walks of the tree made when each turn was sealed (what a user saw then), so
the expected diffs come from whole trees while cowfs computes them from its layers alone.
Seeds: COWFS_HISTORY_SEEDS (comma-separated), default three fixed ones plus one random one,
printed on failure so that it can be replayed.
"""

import os
import random
import stat
import time

import pytest

import cowfs

FIXED_SEEDS = [1, 2, 3]


def seeds() -> list[int]:
    given = os.environ.get("COWFS_HISTORY_SEEDS")
    if given:
        return [int(s) for s in given.split(",")]
    return FIXED_SEEDS + [int(time.time()) % 100_000]


def manifest(root) -> dict[str, tuple]:
    """path -> (type, mode, content or link target, inode) of every non-directory below root."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if dirpath == str(root):
            dirnames[:] = [d for d in dirnames if d != ".snapshots"]
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            rel = os.path.relpath(full, root)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("l", 0o777, os.readlink(full), st.st_ino)
            else:
                with open(full, "rb") as f:
                    out[rel] = ("f", stat.S_IMODE(st.st_mode), f.read(), st.st_ino)
    return out


def expected_diff(old: dict, new: dict) -> set[tuple]:
    """git's letters between two manifests, renames by identity (the same inode)."""
    changes, added, removed = set(), {}, {}
    for path in old.keys() | new.keys():
        a, b = old.get(path), new.get(path)
        if a is None:
            added[path] = b
        elif b is None:
            removed[path] = a
        elif a[0] != b[0] and a[3] != b[3]:
            changes.add(("T", path))
        elif a[:3] != b[:3]:
            changes.add(("M", path))
    gone = {}
    for path in sorted(removed):
        gone.setdefault(removed[path][3], path)
    for path in sorted(added):
        source = gone.pop(added[path][3], None)
        if source is None:
            changes.add(("A", path))
        else:
            del removed[source]
            changes.add(("R", source, path))
    return changes | {("D", path) for path in removed}


def got_diff(ws: cowfs.Workspace, a, b) -> set[tuple]:
    return {("R", c.old_path, c.path) if c.kind == "R" else (c.kind, c.path) for c in ws.diff(a, b)}


class Turns:
    """Random changes to a small, deep-enough tree, through the mount."""

    def __init__(self, root, rng: random.Random):
        self.root, self.rng, self.n = root, rng, 0

    def _all(self, want_dirs: bool) -> list[str]:
        found = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            if dirpath == str(self.root):
                dirnames[:] = [d for d in dirnames if d != ".snapshots"]
            rel = os.path.relpath(dirpath, self.root)
            names = dirnames if want_dirs else filenames
            found += [os.path.normpath(os.path.join(rel, n)) for n in names]
        return found

    def _new_name(self) -> str:
        self.n += 1
        dirs = ["."] + [d for d in self._all(True) if not os.path.islink(self.root / d)]
        return os.path.normpath(os.path.join(self.rng.choice(dirs), f"n{self.n}"))

    def step(self) -> None:
        r = self.root
        files, dirs = self._all(False), [d for d in self._all(True) if not os.path.islink(r / d)]
        op = self.rng.choice(["write", "write", "append", "overwrite", "replace", "rename", "rename_dir",
                              "delete", "rmtree", "mkdir", "chmod", "symlink", "link"])
        pick = self.rng.choice
        try:
            if op == "write" or not files and op in ("append", "overwrite", "replace", "rename",
                                                       "delete", "chmod", "link"):
                (r / self._new_name()).write_bytes(os.urandom(self.rng.randint(0, 300)))
            elif op == "append":
                with open(r / pick(files), "ab") as f:
                    f.write(b"more\n")
            elif op == "overwrite":         # in place, same size: only the bytes tell
                target = pick(files)
                size = os.lstat(r / target).st_size
                if size and not os.path.islink(r / target):
                    with open(r / target, "r+b") as f:
                        f.write(os.urandom(min(size, 8)))
            elif op == "replace":           # as sed -i: a new file renamed over the old one
                target = pick(files)
                if os.path.islink(r / target):
                    return
                tmp = r / (target + ".tmp")
                tmp.write_bytes((r / target).read_bytes() + b"edited\n")
                os.rename(tmp, r / target)
            elif op == "rename":
                os.rename(r / pick(files), r / self._new_name())
            elif op == "rename_dir" and dirs:
                src = pick(dirs)
                dst = self._new_name()
                if not (dst + "/").startswith(src + "/"):
                    os.rename(r / src, r / dst)
            elif op == "delete":
                os.unlink(r / pick(files))
            elif op == "rmtree" and dirs:
                import shutil
                shutil.rmtree(r / pick(dirs))
            elif op == "mkdir":
                os.mkdir(r / self._new_name())
            elif op == "chmod":
                target = pick(files)
                if not os.path.islink(r / target):
                    os.chmod(r / target, self.rng.choice([0o600, 0o644, 0o755]))
            elif op == "symlink":
                os.symlink(self.rng.choice(files or ["nowhere"]), r / self._new_name())
            elif op == "link":
                target = pick(files)
                if not os.path.islink(r / target):
                    os.link(r / target, r / self._new_name())
        except FileNotFoundError:
            pass


@pytest.mark.parametrize("seed", seeds())
def test_diff_and_restore_match_the_manifests(workspace, seed):
    rng = random.Random(seed)
    for d in ("a/b/c/d", "e/f"):
        (workspace.path / d).mkdir(parents=True)
    for i in range(12):
        (workspace.path / rng.choice(["a", "a/b", "a/b/c/d", "e", "e/f", "."]) / f"f{i}").write_bytes(
            os.urandom(rng.randint(0, 200)))
    workspace.mount()
    ws = cowfs.Workspace(workspace.path)
    turns = Turns(workspace.path, rng)
    manifests = {0: manifest(workspace.path)}
    for _ in range(8):
        for _ in range(rng.randint(1, 6)):
            turns.step()
        if rng.random() < 0.3:
            source = rng.choice(sorted(manifests))
            paths = rng.sample(sorted(set(os.path.dirname(p) or p for p in manifests[source])), 1)
            ws.restore(source, paths)
            after = manifest(workspace.path)
            for prefix in paths:
                def under(m):
                    return {p: v[:3] for p, v in m.items() if p == prefix or p.startswith(prefix + "/")}
                assert under(after) == under(manifests[source]), (seed, source, prefix)
        live = manifest(workspace.path)
        last = max(manifests)
        assert got_diff(ws, last, None) == expected_diff(manifests[last], live), seed
        manifests[ws.checkpoint("random").number] = live
    numbers = sorted(manifests)
    for _ in range(12):
        a, b = rng.choice(numbers), rng.choice(numbers)
        assert got_diff(ws, a, b) == expected_diff(manifests[a], manifests[b]), (seed, a, b)
