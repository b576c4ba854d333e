"""The kind e2e (tests/e2e/kind_e2e.py) as a pytest test: marker `e2e`; it skips, naming what is
missing, where docker, kind or kubectl is absent, and unless PEG_E2E=1 (it takes ~20-40 min)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from kind_e2e import missing_tools  # noqa: E402

pytestmark = pytest.mark.e2e


def test_kind_e2e():
    missing = missing_tools()
    if missing:
        pytest.skip(f"kind e2e needs {', '.join(missing)}: not found on this machine")
    if os.environ.get("PEG_E2E") != "1":
        pytest.skip("docker, kind and kubectl found; set PEG_E2E=1 to run the kind e2e (~20-40 min)")
    script = Path(__file__).with_name("kind_e2e.py")
    result = subprocess.run([sys.executable, str(script)], timeout=5400)
    assert result.returncode == 0, "kind e2e failed; see its output above"
