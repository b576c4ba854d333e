"""The kind e2e (tests/e2e/kind_e2e.py) as a pytest test: marker `e2e`; it skips, naming what is
missing, where docker, kind or kubectl is absent, and unless PEG_E2E=1 (it takes ~20-40 min).
Its values and run config are checked offline on every run, so the e2e cannot rot unseen."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from chart_render import by_kind, ci_values, objects, render  # noqa: E402
from kind_e2e import RELEASE, missing_tools, tiny_run  # noqa: E402

from peg.config import parse_config  # noqa: E402
from peg.k8s.render import render_run  # noqa: E402


def test_e2e_values_and_run_render_offline(tmp_path):
    """The release the e2e upgrades to: schema-valid, and its run config renders jobs."""
    docs = objects(render({**ci_values("kind"), "run": tiny_run(tmp_path / "beir")}, name=RELEASE, namespace="peg"))
    (launcher,) = by_kind(docs, "Job")
    assert launcher["metadata"]["name"] == f"{RELEASE}-launch-r1"
    config = parse_config(by_kind(docs, "ConfigMap")[0]["data"]["run.yaml"], "run.yaml")
    assert config.store.uri == "s3://peg/e2e" and config.store.endpoint == f"{RELEASE}-s3.peg.svc:8333"
    assert {j["kind"] for j in render_run(config)} == {"ConfigMap", "RayJob", "TrainJob"}
    assert config.cluster.image.endswith("-cpu") and config.cluster.ray_image.endswith("-cpu")


@pytest.mark.e2e
def test_kind_e2e():
    missing = missing_tools()
    if missing:
        pytest.skip(f"kind e2e needs {', '.join(missing)}: not found on this machine")
    if os.environ.get("PEG_E2E") != "1":
        pytest.skip("docker, kind and kubectl found; set PEG_E2E=1 to run the kind e2e (~20-40 min)")
    script = Path(__file__).with_name("kind_e2e.py")
    result = subprocess.run([sys.executable, str(script)], timeout=5400)
    assert result.returncode == 0, "kind e2e failed; see its output above"
