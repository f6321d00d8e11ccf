"""cowfs: copy-on-write checkpoints of a workspace, as a FUSE filesystem.

Layers, from the disk up (see docs/architecture.md):
  libc, store, catalogue   the on-disk store; nothing about FUSE
  capture, snapshot, rollback   turns and layers; nothing about the CLI
  inodes, fs               the pyfuse3 operations, thin
  daemon, control, cli     one mount's life, the control channel, the command line
"""

__version__ = "0.1.0"
