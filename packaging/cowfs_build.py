"""The build backend of cowfs: setuptools', after checking that pyfuse3 can be built.

pyfuse3, the FUSE binding, has no wheels: `pipx install .` or `pip install .` builds it from
source against the system's libfuse 3, and when a piece is missing the compiler's error, deep
in pip's output, does not say what to install. This says it first, in one line. It checks
nothing when pyfuse3 is installed already where the interpreter would find it (a distribution's
python3-pyfuse3 for `pip install --user .`, say).
"""

import os
import shutil
import subprocess
import sys
import sysconfig

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403  (the rest of the PEP 517 hooks)

PACKAGES = "libfuse3-dev pkg-config python3-dev gcc"


def missing() -> list[str]:
    """The Debian packages pyfuse3's build needs that are not there."""
    gone = []
    if shutil.which("pkg-config") is None:
        gone.append("pkg-config")
    elif subprocess.run(["pkg-config", "--exists", "fuse3"]).returncode != 0:
        gone.append("libfuse3-dev")
    if not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")):
        gone.append("python3-dev")
    if not any(shutil.which(cc) for cc in (os.environ.get("CC", "cc"), "gcc")):
        gone.append("gcc")
    return gone


def _pyfuse3_installed() -> bool:
    # pip builds in an isolated environment (PYTHONPATH, PYTHONNOUSERSITE): ask the interpreter
    # as the installed cowfs will run, without them.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE")}
    return subprocess.run([sys.executable, "-c", "import pyfuse3"], env=env, cwd="/",
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0


def _check() -> None:
    gone = missing()
    if gone and not _pyfuse3_installed():
        raise SystemExit(f"cowfs: error: pyfuse3 is built from source against libfuse 3 and needs "
                         f"{', '.join(gone)}: install them first (Debian/Ubuntu: "
                         f"sudo apt-get install {PACKAGES} fuse3)")


def get_requires_for_build_wheel(config_settings=None):
    _check()
    return _setuptools.get_requires_for_build_wheel(config_settings)


def get_requires_for_build_editable(config_settings=None):
    _check()
    return _setuptools.get_requires_for_build_editable(config_settings)
