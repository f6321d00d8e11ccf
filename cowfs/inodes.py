"""The live inode table: which backing objects the kernel currently knows.

Owns the mapping from FUSE inode numbers to backing objects. Each known
object is held by an O_PATH descriptor (as libfuse's passthrough_ll does),
so that renames of it or of any directory above it cost nothing here.
The FUSE inode number is the backing inode number, except for the root.
"""

import os

import pyfuse3

from . import libc

# Inode numbers at and above this are virtual (the `.snapshots` tree).
VIRTUAL_BASE = 1 << 63


class Node:
    __slots__ = ("fd", "ino", "lookups", "writers")

    def __init__(self, fd: int, ino: int):
        self.fd = fd          # O_PATH | O_NOFOLLOW descriptor of the backing object
        self.ino = ino        # backing inode number
        self.lookups = 0      # the kernel's lookup count
        self.writers = 0      # open file handles that can write


class InodeTable:
    def __init__(self, root_fd: int):
        self.root_ino = os.fstat(root_fd).st_ino
        if self.root_ino == pyfuse3.ROOT_INODE or self.root_ino >= VIRTUAL_BASE:
            raise RuntimeError(f"backing root has unsupported inode number {self.root_ino}")
        root = Node(root_fd, self.root_ino)
        root.lookups = 1
        self.nodes: dict[int, Node] = {pyfuse3.ROOT_INODE: root}

    def nodeid(self, ino: int) -> int:
        return pyfuse3.ROOT_INODE if ino == self.root_ino else ino

    def backing_ino(self, nodeid: int) -> int:
        return self.root_ino if nodeid == pyfuse3.ROOT_INODE else nodeid

    def __getitem__(self, nodeid: int) -> Node:
        return self.nodes[nodeid]

    def get(self, nodeid: int) -> Node | None:
        return self.nodes.get(nodeid)

    def remember(self, dir_fd: int, name: bytes, st: os.stat_result) -> int:
        """Count one kernel lookup of entry *name* of *dir_fd*, whose stat is *st*. Returns its nodeid."""
        nodeid = self.nodeid(st.st_ino)
        node = self.nodes.get(nodeid)
        if node is None:
            fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
            node = self.nodes[nodeid] = Node(fd, st.st_ino)
        node.lookups += 1
        return nodeid

    def forget(self, nodeid: int, count: int) -> None:
        node = self.nodes.get(nodeid)
        if node is None or nodeid == pyfuse3.ROOT_INODE:
            return
        node.lookups -= count
        if node.lookups <= 0:
            del self.nodes[nodeid]
            os.close(node.fd)

    def close_all(self) -> None:
        for nodeid, node in list(self.nodes.items()):
            if nodeid != pyfuse3.ROOT_INODE:
                os.close(node.fd)
        self.nodes = {pyfuse3.ROOT_INODE: self.nodes[pyfuse3.ROOT_INODE]}
