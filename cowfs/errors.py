"""The errors cowfs reports to its users, each knowing its exit code.

Owns the exception hierarchy of the Python API (what a harness catches) and
the exit codes of the command line (what a shell sees): 2 for bad input,
1 for an operation that failed. The daemon names the kind of a failed
control request in its reply (`kind`), and `from_reply` turns it back into
the same class on the client's side, so nobody matches words in messages.
"""

EXIT_FAILED = 1
EXIT_USAGE = 2


class CowfsError(Exception):
    """Anything cowfs refuses or fails to do; the message is one line meant for the user.

    *details*: what the client must still act on although the request failed (a history
    operation that failed part-way still has the kernel's view to refresh: `refresh`)."""
    exit_code = EXIT_FAILED
    kind = "failed"

    def __init__(self, message: str = "", details: dict | None = None):
        super().__init__(message)
        self.details = dict(details or {})


class BadInput(CowfsError):
    """The request itself is wrong (a path, a turn, an option): nothing was touched."""
    exit_code = EXIT_USAGE
    kind = "bad_input"


class NotMounted(BadInput):
    """The path is not inside a cowfs mount."""
    kind = "not_mounted"


class UnknownTurn(BadInput):
    """No such sealed turn (never existed, still open, or pruned)."""
    kind = "unknown_turn"


class PrunedTurn(UnknownTurn):
    """The turn existed but was pruned (`cowfs prune`, or the mount's limits); the message names
    the oldest turn still kept."""
    kind = "pruned_turn"


class DaemonUnreachable(CowfsError):
    """The mount exists but its daemon does not answer (or refuses this user)."""
    kind = "unreachable"


class OperationFailed(CowfsError):
    """The daemon tried and failed; the live tree and the store are as before or as the message says."""
    kind = "failed"


_BY_KIND = {cls.kind: cls for cls in (BadInput, NotMounted, UnknownTurn, DaemonUnreachable,
                                      OperationFailed, PrunedTurn)}


def from_reply(reply: dict) -> CowfsError:
    """The exception a failed control reply stands for."""
    cls = _BY_KIND.get(reply.get("kind"), OperationFailed)
    details = reply.get("details")
    return cls(reply.get("error", "unknown error"), details if isinstance(details, dict) else None)
