"""A pytest plugin for a Hermes agent checkout: its checkpoint manager becomes cowfs's.

Loaded by name through PYTEST_PLUGINS (Hermes reads `-p` from sys.argv as a profile name), so
Hermes' own code and its tests both get `cowfs.compat.CheckpointManager`. See scripts/hermes/check.
"""

import cowfs.compat
import tools.checkpoint_manager

tools.checkpoint_manager.CheckpointManager = cowfs.compat.CheckpointManager
