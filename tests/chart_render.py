"""Render charts/peg offline with the real Helm library (helm-python-sdk: Helm's Go SDK in-process).

`helm.Chart.render` and `helm.Config.render` expose no API versions or Kubernetes version, which
the chart's CRD check (`.Capabilities.APIVersions.Has`) needs; the SDK's native render calls take
them as the same JSON options `helm template --api-versions/--kube-version` sets, so `render` and
`render_against` pass them there.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml
from helm_python import _native

CHART = Path(__file__).resolve().parents[1] / "charts" / "peg"
KUBE_VERSION = "v1.33.0"
TRAINJOB = "trainer.kubeflow.org/v1alpha1/TrainJob"
PYTORCHJOB = "kubeflow.org/v1/PyTorchJob"
RAYJOB = "ray.io/v1/RayJob"
ALL_APIS = (TRAINJOB, PYTORCHJOB, RAYJOB)


def ci_values(name: str) -> dict[str, Any]:
    """charts/peg/ci/<name>-values.yaml."""
    return yaml.safe_load((CHART / "ci" / f"{name}-values.yaml").read_text())


def render(
    values: dict[str, Any] | None = None,
    api_versions: tuple[str, ...] = ALL_APIS,
    name: str = "demo",
    namespace: str = "ml",
    revision: int = 1,
) -> dict[str, str]:
    """{template path: rendered text}, as `helm install` would render it (lookup finds nothing).

    Raises helm.HelmRenderError (a template's `fail`) or helm.HelmValuesError (values.schema.json).
    """
    opts = {
        "name": name,
        "namespace": namespace,
        "revision": revision,
        "is_install": True,
        "api_versions": list(api_versions),
        "kube_version": KUBE_VERSION,
    }
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(values or {})
        return json.loads(_native.call_string("helm_render", chart._raw(), json.dumps(values or {}), json.dumps(opts)))


def render_against(kubeconfig: str, values: dict[str, Any], name: str = "demo", namespace: str = "ml") -> dict[str, str]:
    """Like `render`, but `lookup` reads the live objects of the API server `kubeconfig` names
    (Helm's cluster-aware render: nothing is created)."""
    opts = {"name": name, "namespace": namespace, "is_install": True, "api_versions": list(ALL_APIS)}
    with helm.Config(kubeconfig_content=kubeconfig, namespace=namespace) as config, helm.Chart.load(CHART) as chart:
        payload = _native.call_string(
            "helm_render_with_config", config._raw(), chart._raw(), json.dumps(values), json.dumps(opts)
        )
    return json.loads(payload)


def objects(rendered: dict[str, str]) -> list[dict[str, Any]]:
    """Every Kubernetes object rendered (NOTES.txt is text, not an object)."""
    docs = []
    for path, text in rendered.items():
        if path.endswith("NOTES.txt"):
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def repo_run_texts() -> dict[str, str]:
    """{where: YAML} of every run config the repo ships: examples/*.yaml, manifests/run.yaml and
    each CI values file's run (the run.yaml its ConfigMap hands to `peg pipeline run`)."""
    repo = CHART.parents[1]
    texts = {f"examples/{p.name}": p.read_text() for p in sorted((repo / "examples").glob("*.yaml"))}
    texts["manifests/run.yaml"] = (repo / "manifests" / "run.yaml").read_text()
    for name in sorted(p.name.removesuffix("-values.yaml") for p in (CHART / "ci").glob("*-values.yaml")):
        values = ci_values(name)
        values.setdefault("run", {"name": "tiny", "model": {"name_or_path": "sentence-transformers/all-MiniLM-L6-v2"}})
        (config_map,) = by_kind(objects(render(values)), "ConfigMap")
        texts[f"charts/peg/ci/{name}-values.yaml"] = config_map["data"]["run.yaml"]
    return texts
