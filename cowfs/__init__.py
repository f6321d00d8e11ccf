"""cowfs: copy-on-write checkpoints of a workspace, as a FUSE filesystem.

Layers, from the disk up (see docs/architecture.md):
  libc, store, catalogue   the on-disk store; nothing about FUSE
  capture, attribution     turns, layers and who made each change; nothing about the CLI
  snapshot, history        any turn's tree, and what changed between two turns
  rollback, restore        the live tree made (part of) a sealed turn again
  drift, fsck              changes behind cowfs's back; the store's consistency checks and repairs
  inodes, fs               the pyfuse3 operations, thin
  daemon, control          one mount's life, the control channel
  api, errors, patch, cli  the Python API (typed results, errors that know their exit code),
                           git-style patches, the CLI on it
  agent, noise, compat     who the agent is (safe restore); what views leave out; the
                           shadow-git manager's interface
"""

__version__ = "0.1.0"

# The API is imported on first use, so that `cowfs checkpoint` (which imports this
# package) does not pay for it.
_API = {"Workspace": "api", "Turn": "api", "Status": "api", "mount": "api", "mounted": "api",
        "umount": "api", "Change": "api", "Process": "api",
        "CowfsError": "errors", "BadInput": "errors", "NotMounted": "errors",
        "UnknownTurn": "errors", "DaemonUnreachable": "errors", "OperationFailed": "errors",
        "PrunedTurn": "errors", "PruneResult": "retention"}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'cowfs' has no attribute {name!r}")
    import importlib
    return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
