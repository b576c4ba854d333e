"""Every Kubernetes API call the controller makes, declared once, and the appliers that make them.

`API_CALLS` is what the chart's RBAC must grant, no more and no less (tests/test_operator_rbac.py
compares them, cluster-wide and namespaced; the emulator test checks that every request the running
operator sends is in it). `CLUSTER_SCOPED` are the cluster-scoped resources among them.
kopf itself watches the resources the handlers name, patches the pipelines (finalizer, status,
annotations), posts events and scans the CRDs it serves; the appliers create, replace and delete
the stage jobs and the run config's ConfigMap, and copy a finished job's main pod log into the
store, through the official `kubernetes` client.
"""

from __future__ import annotations

import json
import tempfile

from peg.k8s.vocabulary import JOB_KINDS, PIPELINE, job_kind, primary_pod_selector
from peg.operator.reconcile import CLUSTER_REJECTIONS, SPEC_REJECTIONS, Apply, Create, Delete, KeepLog
from peg.store import ArtifactStore


class Rejected(Exception):
    """The API server refused a request in a way retrying it unchanged cannot fix (`reconcile.rejected`)."""

    def __init__(self, request: str, code: int, message: str):
        super().__init__(f"{request}: HTTP {code}: {message}")
        self.request, self.code, self.message = request, code, message


# (API group, resource, verbs): what the controller calls, and why.
API_CALLS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    (PIPELINE.group, PIPELINE.plural, ("list", "watch", "patch")),  # kopf: watch pipelines; finalizer + status patches
    (PIPELINE.group, f"{PIPELINE.plural}/status", ("patch",)),  # kopf patches the status subresource
    # blockOwnerDeletion on the children (OwnerReferencesPermissionEnforcement)
    (PIPELINE.group, f"{PIPELINE.plural}/finalizers", ("update",)),
    *((k.group, k.plural, ("list", "watch", "create", "delete")) for k in JOB_KINDS),  # index, create, delete jobs
    ("", "configmaps", ("create", "get", "patch")),  # Apply: the run config a stage's pods mount (get: is it ours?)
    ("", "pods", ("list",)),  # KeepLog: the finished job's main pod
    ("", "pods/log", ("get",)),  # KeepLog: its log, copied into the store
    ("", "events", ("create",)),  # kopf.event: one per transition
    ("apiextensions.k8s.io", "customresourcedefinitions", ("list", "watch")),  # kopf: which resources exist
)


CLUSTER_SCOPED = {("apiextensions.k8s.io", "customresourcedefinitions")}


def describe(action: Create | Apply | Delete, namespace: str) -> str:
    """'create RayJob ns/name', 'apply ConfigMap ns/name', 'delete TrainJob ns/name'."""
    if isinstance(action, Delete):
        return f"delete {action.kind} {namespace}/{action.name}"
    return f"{type(action).__name__.lower()} {action.obj['kind']} {namespace}/{action.obj['metadata']['name']}"


def rejection_message(body: str | None, reason: str | None) -> str:
    """The `message` of a Kubernetes Status body (what an admission webhook or quota said), else the reason."""
    try:
        return str(json.loads(body or "")["message"])
    except (ValueError, KeyError, TypeError):
        return reason or ""


def _require_same_owner(existing, action: Apply, namespace: str) -> None:
    """Patch only a ConfigMap this pipeline owns: one of the same name made by someone else is
    refused (409), never overwritten. RBAC cannot limit writes to peg's own ConfigMaps (it cannot
    narrow `create` by name, nor anything by label), so the operator checks the owner itself."""
    owners = {r.get("uid") for r in action.obj["metadata"].get("ownerReferences", [])}
    theirs = {r.uid for r in existing.metadata.owner_references or []}
    if not owners & theirs:
        raise Rejected(describe(action, namespace), 409,
                       "a ConfigMap of that name exists and is not this pipeline's: delete it or rename the run")


def keep_log(action: KeepLog, namespace: str, store: ArtifactStore) -> bool:
    """Copy the main pod log of a finished stage job into the store at `action.key`, streamed
    through a temporary file; False when the job has no pod left. API and store errors propagate."""
    from kubernetes import client

    core = client.CoreV1Api()
    selector = primary_pod_selector({"apiVersion": action.api_version, "kind": action.kind, "metadata": {"name": action.name}})
    pods = core.list_namespaced_pod(namespace, label_selector=selector).items
    if not pods:
        return False
    response = core.read_namespaced_pod_log(pods[0].metadata.name, namespace, _preload_content=False)
    with tempfile.NamedTemporaryFile(prefix="peg-stage-log-", suffix=".log") as kept:
        for chunk in response.stream(1 << 16):
            kept.write(chunk)
        kept.flush()
        store.put_file(action.key, kept.name, "operator")
    return True


def apply_action(action: Create | Apply | Delete, namespace: str) -> None:
    """Make one reconcile action's API call; 409 on create and 404 on delete count as done.

    Raises `Rejected` for a lasting refusal (`SPEC_REJECTIONS`, `CLUSTER_REJECTIONS`); anything
    else (429, 5xx, a lost connection) propagates for kopf to retry.
    """
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    try:
        if isinstance(action, Create):
            k = job_kind(action.obj["apiVersion"], action.obj["kind"])
            client.CustomObjectsApi().create_namespaced_custom_object(k.group, k.version, namespace, k.plural, action.obj)
        elif isinstance(action, Apply):
            core = client.CoreV1Api()
            try:
                core.create_namespaced_config_map(namespace, action.obj)
            except ApiException as e:
                if e.status != 409:
                    raise
                name = action.obj["metadata"]["name"]
                _require_same_owner(core.read_namespaced_config_map(name, namespace), action, namespace)
                core.patch_namespaced_config_map(name, namespace, action.obj)
        else:
            k = job_kind(action.api_version, action.kind)
            body = client.V1DeleteOptions(propagation_policy="Background")
            client.CustomObjectsApi().delete_namespaced_custom_object(k.group, k.version, namespace, k.plural, action.name, body=body)
    except ApiException as e:
        if (isinstance(action, Create) and e.status == 409) or (isinstance(action, Delete) and e.status == 404):
            return
        if e.status in SPEC_REJECTIONS + CLUSTER_REJECTIONS:
            raise Rejected(describe(action, namespace), e.status, rejection_message(e.body, e.reason)) from None
        raise
