"""The live inode table: which backing objects the kernel currently knows.

Owns the mapping from FUSE inode numbers to backing objects. A known object
is held by an O_PATH descriptor (as libfuse's passthrough_ll does), so that
renames of it or of any directory above it cost nothing here. The kernel may
know more inodes than the process may hold descriptors (a `find` over 100,000
files), so past a budget the oldest descriptors are closed and reopened when
next needed from the entry the node was last known by (its parent's node and
its name, kept current by lookups and renames), else through the store (a
recorded object). No file handles: they need CAP_DAC_READ_SEARCH. The FUSE
inode number is the backing inode number, except for the root.
"""

import os
import resource
from collections import OrderedDict
from contextlib import contextmanager

import pyfuse3

from .catalogue import ObjectRef

# Inode numbers at and above this are virtual (the `.snapshots` tree).
VIRTUAL_BASE = 1 << 63

_O_PATH = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


class Node:
    __slots__ = ("_fd", "ino", "lookups", "writers", "pins", "parent", "name", "table",
                 "entry", "entry_generation", "size_unsure", "tree_epoch", "write_error")

    def __init__(self, fd: int, ino: int, table: "InodeTable"):
        self._fd = fd         # O_PATH | O_NOFOLLOW descriptor, or -1 while closed
        self.ino = ino        # backing inode number
        self.lookups = 0      # the kernel's lookup count
        self.writers = 0      # open file handles that can write
        self.pins = 0         # while > 0 the descriptor stays open (open files, awaited captures)
        self.parent = 0       # the entry it was last known by: parent nodeid and name,
        self.name = b""       # ... to reopen it by once the descriptor was closed
        self.table = table
        self.entry = None     # the attributes readdir last sent, None once changed since,
        self.entry_generation = -1  # ... valid only in this generation (CowFS.generation)
        self.size_unsure = False    # a write failed: the kernel's size may be more (fs.write)
        self.write_error = 0        # errno of a failed write-back its writer has not seen yet
        self.tree_epoch = table.tree_epoch  # last seen in the live tree then (CowFS._in_tree)

    @property
    def fd(self) -> int:
        if self._fd < 0:
            self.table.reopen(self)
        return self._fd


class InodeTable:
    def __init__(self, root_fd: int, store):
        self.root_ino = os.fstat(root_fd).st_ino
        if self.root_ino == pyfuse3.ROOT_INODE or self.root_ino >= VIRTUAL_BASE:
            raise RuntimeError(f"backing root has unsupported inode number {self.root_ino}")
        self.store = store
        # Ends whenever a history operation took objects out of the tree behind the kernel's
        # back: a directory node then proves once that it is still in the tree (CowFS._in_tree).
        self.tree_epoch = 0
        root = Node(root_fd, self.root_ino, self)
        root.lookups = root.pins = 1
        self.nodes: dict[int, Node] = {pyfuse3.ROOT_INODE: root}
        self._open: OrderedDict[int, Node] = OrderedDict()   # nodes holding a descriptor, oldest first
        # Half the descriptors this process may have; the rest serve open files and the store.
        self.budget = max(256, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 2)

    def nodeid(self, ino: int) -> int:
        return pyfuse3.ROOT_INODE if ino == self.root_ino else ino

    def backing_ino(self, nodeid: int) -> int:
        return self.root_ino if nodeid == pyfuse3.ROOT_INODE else nodeid

    def __getitem__(self, nodeid: int) -> Node:
        return self.nodes[nodeid]

    def get(self, nodeid: int) -> Node | None:
        return self.nodes.get(nodeid)

    def remember(self, parent: Node, name: bytes, ino: int) -> Node:
        """Count one kernel lookup of entry *name* of *parent*, whose inode is *ino*."""
        node = self.nodes.get(self.nodeid(ino))
        if node is None:
            node = self._add(parent, name, ino)
        node.lookups += 1
        node.parent, node.name = self.nodeid(parent.ino), name
        return node

    def moved(self, ino: int, parent: Node, name: bytes) -> None:
        """Object *ino* is now entry *name* of *parent* (a rename)."""
        node = self.nodes.get(self.nodeid(ino))
        if node is not None:
            node.parent, node.name = self.nodeid(parent.ino), name

    def _add(self, parent: Node, name: bytes, ino: int) -> Node:
        parent.pins += 1       # _make_room must not close the descriptor we open by
        try:
            self._make_room()
            fd = os.open(name, _O_PATH, dir_fd=parent.fd)
        finally:
            parent.pins -= 1
        nodeid = self.nodeid(ino)
        node = self.nodes[nodeid] = self._open[nodeid] = Node(fd, ino, self)
        return node

    def reopen(self, node: Node) -> None:
        self._make_room()
        node._fd = self._locate(node)
        self._open[self.nodeid(node.ino)] = node

    def _locate(self, node: Node) -> int:
        parent = self.nodes.get(node.parent)
        if parent is not None and parent is not node:
            try:
                fd = os.open(node.name, _O_PATH, dir_fd=parent.fd)
                if os.fstat(fd).st_ino == node.ino:
                    return fd
                os.close(fd)
            except OSError:
                pass
        # Moved behind the kernel's back (a rollback), or its last name went into the store.
        return self.store.open_object(ObjectRef(node.ino))

    @contextmanager
    def pinned(self, node: Node):
        """Keep *node*'s descriptor open (and its number valid) across awaits."""
        node.pins += 1
        try:
            yield node
        finally:
            node.pins -= 1

    def _make_room(self) -> None:
        if len(self._open) < self.budget:
            return
        for nodeid in list(self._open)[: self.budget // 8 or 1]:
            node = self._open[nodeid]
            if node.pins:
                self._open.move_to_end(nodeid)
                continue
            os.close(node._fd)
            node._fd = -1
            del self._open[nodeid]

    def forget(self, nodeid: int, count: int) -> None:
        node = self.nodes.get(nodeid)
        if node is None or nodeid == pyfuse3.ROOT_INODE:
            return
        node.lookups -= count
        if node.lookups <= 0:
            del self.nodes[nodeid]
            if node._fd >= 0:
                del self._open[nodeid]
                os.close(node._fd)

    def close_all(self) -> None:
        for nodeid, node in list(self._open.items()):
            os.close(node._fd)
        self._open.clear()
        self.nodes = {pyfuse3.ROOT_INODE: self.nodes[pyfuse3.ROOT_INODE]}
