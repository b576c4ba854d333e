"""kmock's in-process Kubernetes API emulator (HTTP on 127.0.0.1) set up for peg's operator tests:
every resource the operator touches, a kubeconfig naming it, and helpers that play the job
controllers' status writes.

What the emulator does not model: schema validation, pruning and defaulting, garbage collection,
uid / generation / resourceVersion, server-side label selectors, RBAC (see test_operator_kopf.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter

import kmock

from peg.k8s.vocabulary import JOB_KINDS, LABEL_STAGE, PIPELINE

GROUP, VERSION, KIND, PLURAL = PIPELINE.group, PIPELINE.version, PIPELINE.kind, PIPELINE.plural

RESOURCES = {
    f"{GROUP}/{VERSION}/{PLURAL}": (KIND, True, {"status"}),
    **{f"{k.group}/{k.version}/{k.plural}": (k.kind, True, set()) for k in JOB_KINDS},
    "v1/configmaps": ("ConfigMap", True, set()),
    "v1/pods": ("Pod", True, {"log"}),
    "v1/events": ("Event", True, set()),
    "v1/namespaces": ("Namespace", False, set()),  # kopf waits for it in discovery, never calls it
    "apiextensions.k8s.io/v1/customresourcedefinitions": ("CustomResourceDefinition", False, set()),
}
VERBS = {"get", "list", "watch", "create", "patch", "update", "delete"}
TEST_AGENT = "peg-operator-test"  # the test's own API calls carry it; the operator's do not


class Cluster:
    """The emulator plus the helpers the test drives it with."""

    def __init__(self, k8s):
        self.k8s = k8s

    def objects(self, resource: str) -> dict[str, dict]:
        return {name: obj.raw for (res, ns, name), obj in self.k8s.objects.items()
                if str(res.plural) == resource.rsplit("/", 1)[-1] and not obj.deleted}

    def job(self, stage: str) -> tuple[str, dict] | None:
        for k in JOB_KINDS:
            for obj in self.objects(k.plural).values():
                if obj["metadata"]["labels"][LABEL_STAGE] == stage:
                    return k.plural, obj
        return None

    def pipeline(self, name: str = "demo") -> dict:
        return self.objects(PLURAL).get(name, {})

    async def wait(self, what, timeout: float = 20.0):
        deadline = asyncio.get_running_loop().time() + timeout
        while (result := what()) is None or result is False:
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"timed out waiting; pipeline status: {json.dumps(self.pipeline().get('status'), indent=1)}")
            await asyncio.sleep(0.05)
        return result

    def creates(self) -> Counter:
        """How many times each job was created (POSTs that reached the emulator)."""
        return Counter(r.data["metadata"]["name"] for r in self.k8s
                       if r.method == "POST" and r.resource is not None and str(r.resource.plural) in {k.plural for k in JOB_KINDS})

    def events(self) -> list[tuple[str, str]]:
        """(reason, message) of every event posted (the emulator answers 409 to all but the first:
        it ignores generateName; the requests still show what the operator reported)."""
        return [(r.data["reason"], r.data["message"]) for r in self.k8s
                if r.method == "POST" and r.resource is not None and str(r.resource.plural) == "events"]

    def calls(self) -> set[tuple[str, str, str]]:
        """(group, resource, verb) of every request, as RBAC names them."""
        verbs = {"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}
        out = set()
        for r in self.k8s:
            if r.resource is None or r.resource.plural is None or r.headers.get("User-Agent") == TEST_AGENT:
                continue  # discovery (allowed to every authenticated user), or the test's own calls
            if r.method == "GET":
                verb = "watch" if r.params.get("watch") in ("true", "1") else "get" if r.name else "list"
            else:
                verb = verbs[str(r.method.value)]
            plural = str(r.resource.plural) + (f"/{r.subresource}" if r.subresource else "")
            out.add((str(r.resource.group or ""), plural, verb))
        return out


def as_test_client():
    from kubernetes import client

    api = client.ApiClient()
    api.user_agent = TEST_AGENT
    return client.CustomObjectsApi(api)


def job_status(kind: str, succeeded: bool) -> dict:
    """A finished job's status as its controller writes it: KubeRay v1.7.0 (rayjob_types.go:
    jobDeploymentStatus Complete / Failed with jobStatus SUCCEEDED / FAILED), Trainer v2.3.0
    (trainjob_types.go: condition Complete / Failed), training-operator v1.9.4 (Succeeded / Failed)."""
    if kind == "RayJob":
        return {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"} if succeeded else {
            "jobDeploymentStatus": "Failed", "jobStatus": "FAILED"}
    done = ("Complete" if kind == "TrainJob" else "Succeeded") if succeeded else "Failed"
    return {"conditions": [{"type": done, "status": "True"}]}


def running_job_status(kind: str) -> dict:
    """A started job's status as its controller writes it (its pods are running)."""
    if kind == "RayJob":
        return {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}
    if kind == "TrainJob":
        return {"jobsStatus": [{"name": "node", "active": 1}]}
    return {"conditions": [{"type": "Running", "status": "True"}]}


async def write_job_status(plural: str, job: dict, status: dict) -> None:
    """Play the job's controller: patch `status` onto the job's status subresource."""
    group, version = job["apiVersion"].split("/")
    meta = job["metadata"]
    await asyncio.to_thread(as_test_client().patch_namespaced_custom_object_status, group, version,
                            meta["namespace"], plural, meta["name"], {"status": status})


@contextlib.asynccontextmanager
async def emulated_cluster(tmp_path, monkeypatch):
    """kmock's Kubernetes emulator serving RESOURCES on 127.0.0.1, the kubeconfig pointing at it."""
    from kubernetes import config as kube_config

    async with kmock.KubernetesEmulator() as k8s, kmock.Server(k8s) as server:
        for key, (kind, namespaced, subresources) in RESOURCES.items():
            k8s.resources[key].kind = kind
            k8s.resources[key].namespaced = namespaced
            k8s.resources[key].verbs = VERBS
            k8s.resources[key].subresources = subresources
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
            "clusters": [{"name": "kmock", "cluster": {"server": str(server.url).rstrip("/")}}],
            "users": [{"name": "kmock", "user": {"token": "test"}}],
            "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock"}}],
        }))
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        kube_config.load_kube_config(str(kubeconfig))
        yield Cluster(k8s)
