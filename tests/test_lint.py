"""The tree passes ruff with the project's configuration (pyproject.toml, `[tool.ruff]`)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from venv_binary import venv_binary

ROOT = Path(__file__).resolve().parents[1]


def test_the_tree_passes_ruff():
    ruff = venv_binary("ruff", "ruff")
    result = subprocess.run([ruff, "check", "--no-cache", "--output-format", "concise", str(ROOT)],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
