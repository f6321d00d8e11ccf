"""Read a directory tree into a comparable value: what a snapshot must reproduce."""

import os
import stat


def tree(root, *, xattrs: bool = False, mtimes: bool = False, hidden=()) -> dict:
    """{relative path (bytes): (kind, payload, permission bits[, xattrs][, mtime])}.

    kind is 'file', 'dir', 'link', 'fifo'; payload is the content, the link
    target, or None. Never follows symlinks (but *root* itself may be one, e.g.
    a /proc/PID/fd/N link), never opens FIFOs. *hidden*: names in *root* left out.
    """
    root = os.fsencode(root)
    out = {}

    def walk(rel: bytes) -> None:
        names = os.listdir(os.path.join(root, rel) if rel else root)
        for name in sorted(n for n in names if rel or n not in hidden):
            path = os.path.join(rel, name) if rel else name
            full = os.path.join(root, path)
            st = os.lstat(full)
            if stat.S_ISDIR(st.st_mode):
                value = ["dir", None]
            elif stat.S_ISLNK(st.st_mode):
                value = ["link", os.readlink(full)]
            elif stat.S_ISFIFO(st.st_mode):
                value = ["fifo", None]
            else:
                with open(full, "rb") as f:
                    value = ["file", f.read()]
            value.append(stat.S_IMODE(st.st_mode))
            if xattrs and not stat.S_ISLNK(st.st_mode):
                value.append({n: os.getxattr(full, n) for n in sorted(os.listxattr(full))})
            if mtimes and not stat.S_ISDIR(st.st_mode):
                value.append(st.st_mtime_ns)
            out[path] = tuple(value)
            if stat.S_ISDIR(st.st_mode):
                walk(path)

    walk(b"")
    return out
