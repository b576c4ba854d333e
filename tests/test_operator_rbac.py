"""The operator's chart parts: RBAC equal to the API calls the code makes, and the Deployment
valid, PSS-restricted, probed and single (checkov scans it with the whole chart in test_chart.py:
the "persistent" value set enables the operator)."""

from __future__ import annotations

import helm_python as helm
import pytest
from chart_render import CHART, KUBE_VERSION, by_kind, ci_values, objects, render
from k8s_validation import validate_object

from peg.operator.api import API_CALLS, CLUSTER_SCOPED

OPERATOR = {"operator": {"enabled": True}}


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    return objects(render({**ci_values("kind"), **OPERATOR}))


def operator_objects(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "operator"]


def granted(rules: list[dict]) -> set[tuple[str, str, str]]:
    return {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


def test_cluster_role_grants_exactly_the_calls_the_controller_makes(docs):
    (role,) = by_kind(docs, "ClusterRole")
    declared = {(g, r, v) for g, r, verbs in API_CALLS for v in verbs}
    assert granted(role["rules"]) == declared
    assert not any(r == "secrets" for _, r, _ in declared)
    (binding,) = by_kind(docs, "ClusterRoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "demo-peg-operator", "namespace": "ml"}]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]


def test_namespaced_mode_grants_the_calls_in_the_watched_namespaces_only():
    """Issue 35 finding 8: with operator.watchNamespaces, Roles in those namespaces grant the calls
    (ConfigMaps and jobs nowhere else); the ClusterRole only reads the CRDs."""
    docs = objects(render({**ci_values("kind"), "operator": {"enabled": True, "watchNamespaces": ["team-a", "team-b"]}}))
    declared = {(g, r, v) for g, r, verbs in API_CALLS for v in verbs}
    (cluster_role,) = by_kind(docs, "ClusterRole")
    assert {(g, r) for g, r, _ in granted(cluster_role["rules"])} == CLUSTER_SCOPED
    roles = {d["metadata"]["namespace"]: d for d in by_kind(docs, "Role") if d["metadata"]["name"] == "demo-peg-operator"}
    assert sorted(roles) == ["team-a", "team-b"]
    for role in roles.values():
        assert granted(role["rules"]) == {c for c in declared if c[:2] not in CLUSTER_SCOPED}
        assert granted(role["rules"]) | granted(cluster_role["rules"]) == declared
    bindings = [d for d in by_kind(docs, "RoleBinding") if d["metadata"]["name"] == "demo-peg-operator"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    assert all(b["subjects"] == [{"kind": "ServiceAccount", "name": "demo-peg-operator", "namespace": "ml"}] for b in bindings)
    (deployment,) = [d for d in by_kind(docs, "Deployment") if "operator" in d["metadata"]["name"]]
    command = deployment["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:4] == ["kopf", "run", "--namespace=team-a", "--namespace=team-b"] and "--all-namespaces" not in command
    for doc in [cluster_role, *roles.values(), *bindings]:
        assert validate_object(doc) == [], doc["kind"]


def test_children_with_block_owner_deletion_are_authorized():
    """Issue 35 finding 8: OwnerReferencesPermissionEnforcement admits a child whose owner reference
    sets blockOwnerDeletion only from an account that may update the owner's finalizers."""
    assert ("peg.dev", "embeddingpipelines/finalizers", "update") in {(g, r, v) for g, r, verbs in API_CALLS for v in verbs}


def test_rbac_comparison_catches_an_extra_or_missing_verb(docs):
    (role,) = by_kind(docs, "ClusterRole")
    declared = {(g, r, v) for g, r, verbs in API_CALLS for v in verbs}
    extra = [*role["rules"], {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]
    missing = [r for r in role["rules"] if r["resources"] != ["events"]]
    assert granted(extra) - declared == {("", "secrets", "get")}
    assert declared - granted(missing) == {("", "events", "create")}


def test_operator_is_off_by_default():
    assert operator_objects(objects(render())) == []


def test_operator_objects_validate_and_follow_pss_restricted(docs):
    mine = operator_objects(docs)
    assert sorted(d["kind"] for d in mine) == ["ClusterRole", "ClusterRoleBinding", "Deployment", "Service", "ServiceAccount"]
    for doc in mine:
        assert validate_object(doc) == [], doc["kind"]
    (deployment,) = [d for d in mine if d["kind"] == "Deployment"]
    spec = deployment["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert container["resources"]["requests"] == {"cpu": "100m", "memory": "256Mi"}
    assert container["command"][:4] == ["kopf", "run", "--all-namespaces", "--standalone"]
    assert "--liveness=http://0.0.0.0:8080/healthz" in container["command"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"health": 8080, "metrics": 9090}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["PEG_OPERATOR_METRICS_PORT"] == "9090" and env["PEG_OPERATOR_INTERVAL"] == "10"
    assert env["PEG_OPERATOR_S3_CREDENTIALS"] == "/etc/peg-s3"  # it reads the store with these keys, as files
    assert {"name": "s3-credentials", "secret": {"secretName": "demo-peg-s3-credentials"}} in pod["volumes"]


def test_chart_lints_with_the_operator():
    report = helm.lint(CHART, {**ci_values("kind"), **OPERATOR}, strict=True, kube_version=KUBE_VERSION)
    assert report["errors"] == [] and [m for m in report["messages"] if m["severity"] >= 2] == [], report


def test_kind_e2e_pipeline_is_valid_and_renders(tmp_path):
    """The EmbeddingPipeline the kind e2e applies (PEG_E2E_VIA=operator), checked offline."""
    import sys

    sys.path.insert(0, str(CHART.parents[1] / "tests" / "e2e"))
    from kind_e2e import NAMESPACE, operator_run_config, tiny_run

    from peg.config import RunConfig
    from peg.k8s.render import render_run

    run = operator_run_config({**ci_values("kind"), **OPERATOR}, tiny_run(tmp_path / "beir"))
    config = RunConfig.model_validate(run)
    assert config.cluster.namespace == NAMESPACE and config.cluster.s3_secret and config.store.uri.startswith("s3://")
    kinds = sorted({o["kind"] for o in render_run(config)})
    assert kinds == ["ConfigMap", "RayJob", "TrainJob"]


def test_values_schema_rejects_a_misspelt_operator_value():
    with pytest.raises(helm.HelmValuesError, match="intervl"):
        render({"operator": {"enabled": True, "intervl": 3}})
