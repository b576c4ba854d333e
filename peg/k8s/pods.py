"""Run rendered Kubernetes objects' pods as Docker containers on this machine, exactly as they say.

`containers_of(obj, objects)` turns one object (Pod, Job, Deployment, TrainJob, PyTorchJob,
RayJob) into the `Container`s its controller would start, with the environment the controller
injects; `run(containers)` runs them with `docker run` and returns each one's exit status and log.
What a pod spec says and how it is honoured:

- image (must be present locally: nothing is pulled), command/args, workingDir, env (value,
  secretKeyRef, configMapKeyRef, fieldRef metadata.name/namespace, status.podIP), envFrom;
- volumes: configMap and secret (keys as files, items, defaultMode, group-owned by fsGroup as the
  kubelet does) bind-mounted read-only; emptyDir as a tmpfs (mounted exec, its sizeLimit as the
  size), at /dev/shm as the shm size;
- securityContext (pod, then container): runAsUser/runAsGroup (`--user`), fsGroup (a
  supplementary group), runAsNonRoot (refused when the user would be 0),
  readOnlyRootFilesystem (`--read-only`), capabilities drop/add, allowPrivilegeEscalation false
  (`no-new-privileges`), seccompProfile RuntimeDefault (Docker's default profile) or Unconfined;
- resources.limits cpu and memory as Docker limits (requests only schedule);
- networking: every container on the host network, addresses 127.0.0.1 (no bridge is made);
  `Container.network` can put a pod in a network of its own (`none`) or in another pod's
  (`container:NAME`), as a Service's clients reach its pod;
- the service account, when an `ApiServer` is given: what the ServiceAccount admission plugin
  and the kubelet give a pod that mounts its token (pod `automountServiceAccountToken`, else the
  ServiceAccount object's, else true): `token`, `ca.crt` and `namespace` under
  /var/run/secrets/kubernetes.io/serviceaccount and KUBERNETES_SERVICE_HOST/PORT, which is what
  in-cluster clients read. Without one, no token is mounted.

Scheduling fields (nodeSelector, tolerations, affinity, priorityClassName, imagePullPolicy,
labels) have nothing to do on one machine and are not looked at. Any other
field, volume type or value the runner cannot honour raises `PodError` naming it, before a
container starts.

The controllers' injected environment follows their pinned sources:
- Trainer v2.3.0, torch plugin (pkg/runtime/framework/plugins/torch/torch.go, EnforceMLPolicy):
  per node PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR, PET_MASTER_PORT;
- training-operator v1.9.4 (pkg/controller.v1/pytorch/envvar.go, setPodEnv): MASTER_ADDR,
  MASTER_PORT, WORLD_SIZE = replicas x nprocPerNode, RANK (Master 0, Worker i+1),
  PYTHONUNBUFFERED, PET_MASTER_ADDR/PORT, PET_NNODES, PET_NODE_RANK, PET_NPROC_PER_NODE;
- KubeRay v1.7.0 (ray-operator/controllers/ray/common/pod.go, generateRayStartCommand;
  common/job.go, BuildJobSubmitCommand): the head runs `ray start --head --block` with its
  rayStartParams, num-cpus and memory from its resources, each worker `ray start --block
  --address=HEAD`, and the submitter `ray job submit --address http://HEAD:DASHBOARD
  --submission-id ID -- ENTRYPOINT`.
The masters' addresses are 127.0.0.1 and their ports free ports of this machine (host network:
the pods' fixed ports would collide).
"""

from __future__ import annotations

import base64
import math
import os
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from peg.config import RunConfig
from peg.errors import PegError
from peg.k8s.render import LOCAL_STAGES, check_renderable, render_config_map, render_stage
from peg.k8s.vocabulary import PYTORCHJOB, RAYJOB, TRAINJOB
from peg.pipeline import LocalBackend, StageFailed
from peg.pipeline.stages import Stage

LOCALHOST = "127.0.0.1"
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"

# Pod and container fields with nothing to do on one machine (scheduling, pulling, restarts).
_IGNORED_POD_FIELDS = {"nodeSelector", "tolerations", "affinity", "priorityClassName", "restartPolicy", "imagePullSecrets",
                       "terminationGracePeriodSeconds", "activeDeadlineSeconds", "enableServiceLinks", "schedulerName",
                       "topologySpreadConstraints"}
_HONOURED_POD_FIELDS = {"containers", "initContainers", "volumes", "securityContext", "serviceAccountName",
                        "automountServiceAccountToken"}
_IGNORED_CONTAINER_FIELDS = {"name", "imagePullPolicy", "ports", "readinessProbe", "livenessProbe", "startupProbe",
                             "terminationMessagePath", "terminationMessagePolicy"}
_HONOURED_CONTAINER_FIELDS = {"image", "command", "args", "workingDir", "env", "envFrom", "volumeMounts",
                              "resources", "securityContext"}
_SECURITY_FIELDS = {"runAsUser", "runAsGroup", "fsGroup", "runAsNonRoot", "readOnlyRootFilesystem", "capabilities",
                    "allowPrivilegeEscalation", "seccompProfile", "privileged"}


class PodError(PegError):
    """A rendered object asks for something the pod runner cannot honour (named in the message)."""


@dataclass(frozen=True)
class ApiServer:
    """The Kubernetes API server the pods reach in-cluster: where it listens (HTTPS), the CA that
    signed its certificate, and the bearer token each (namespace, service account) is given."""

    host: str
    port: int
    ca_pem: bytes
    token_for: Callable[[str, str], str]


@dataclass
class Container:
    """One container to run: everything `docker run` needs, resolved from a pod spec."""

    name: str
    image: str
    command: list[str]
    hostname: str = ""  # the pod's name, as Kubernetes sets it
    network: str = "host"  # docker's --network: host, none, or container:NAME (that pod's network)
    hosts: dict[str, str] = field(default_factory=dict)  # name -> address in /etc/hosts (what cluster DNS answers)
    env: dict[str, str] = field(default_factory=dict)
    files: dict[str, tuple[dict[str, bytes], int]] = field(default_factory=dict)  # mount path -> (files, mode)
    tmpfs: dict[str, str | None] = field(default_factory=dict)  # mount path -> size
    shm_size: str | None = None
    user: str | None = None
    groups: list[int] = field(default_factory=list)
    file_group: int | None = None  # fsGroup: the group that owns the ConfigMap/Secret files
    read_only: bool = False
    cap_drop: list[str] = field(default_factory=list)
    cap_add: list[str] = field(default_factory=list)
    no_new_privileges: bool = False
    seccomp_unconfined: bool = False
    cpus: str | None = None
    memory: str | None = None
    workdir: str | None = None
    server: bool = False  # runs until the others are done (Ray head/workers, a Deployment)
    wait_for_urls: list[str] = field(default_factory=list)  # started once these answer (a submitter: its Ray cluster ready)


@dataclass
class Result:
    """A finished container: its exit status, its output, and whether the kernel's OOM killer
    acted in it (its memory limit was too small, as a pod's `OOMKilled`)."""

    name: str
    status: int
    log: str
    oom_killed: bool = False


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOCALHOST, 0))
        return s.getsockname()[1]


def _quantity_bytes(value: str) -> int:
    """A Kubernetes memory quantity (512Mi, 2Gi, 1G, 1000) in bytes."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]i?|k)?", str(value))
    if not match:
        raise PodError(f"memory quantity {value!r}: not understood")
    return int(float(match.group(1)) * units.get(match.group(2) or "", 1))


def _cpus(value: str) -> str:
    value = str(value)
    return str(int(value[:-1]) / 1000) if value.endswith("m") else value


class Objects:
    """What a pod can refer to: the objects (ConfigMaps, Secrets, ServiceAccounts) by kind and
    name, and the API server its service account's token is for (None: no token is mounted)."""

    def __init__(self, objects: Iterable[Mapping], api: ApiServer | None = None):
        self.by_key = {(o["kind"], o["metadata"]["name"]): o for o in objects}
        self.api = api

    def data(self, kind: str, name: str, where: str) -> dict[str, bytes]:
        obj = self.by_key.get((kind, name))
        if obj is None:
            raise PodError(f"{where}: {kind} {name!r} is not among the objects given to the pod runner")
        data = {k: v.encode() for k, v in (obj.get("data") or {}).items()} if kind == "ConfigMap" else {
            k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
        data.update({k: v.encode() for k, v in (obj.get("stringData") or {}).items()})
        return data


def _check_fields(spec: Mapping, honoured: set[str], ignored: set[str], where: str) -> None:
    unknown = sorted(set(spec) - honoured - ignored)
    if unknown:
        raise PodError(f"{where}: {', '.join(unknown)}: not honoured by the pod runner")


def _security(container: Container, pod_ctx: Mapping, ctx: Mapping, where: str) -> None:
    merged = {**pod_ctx, **ctx}
    _check_fields(merged, _SECURITY_FIELDS, {"supplementalGroups"}, f"{where}.securityContext")
    if merged.get("privileged"):
        raise PodError(f"{where}.securityContext.privileged: true is not honoured by the pod runner")
    uid, gid = merged.get("runAsUser"), merged.get("runAsGroup")
    if uid is not None:
        container.user = f"{uid}:{gid}" if gid is not None else str(uid)
    elif gid is not None:
        raise PodError(f"{where}.securityContext.runAsGroup without runAsUser: not honoured by the pod runner")
    if merged.get("runAsNonRoot") and uid in (None, 0):
        raise PodError(f"{where}: runAsNonRoot with runAsUser {uid}: the pod runner runs only an explicit non-zero UID")
    if (fs_group := pod_ctx.get("fsGroup")) is not None:
        container.groups.append(int(fs_group))
        container.file_group = int(fs_group)
    container.groups.extend(int(g) for g in merged.get("supplementalGroups") or [])
    container.read_only = bool(merged.get("readOnlyRootFilesystem"))
    caps = merged.get("capabilities") or {}
    container.cap_drop, container.cap_add = list(caps.get("drop") or []), list(caps.get("add") or [])
    container.no_new_privileges = merged.get("allowPrivilegeEscalation") is False
    seccomp = (merged.get("seccompProfile") or {}).get("type", "RuntimeDefault")
    if seccomp not in ("RuntimeDefault", "Unconfined"):
        raise PodError(f"{where}.securityContext.seccompProfile.type {seccomp}: not honoured by the pod runner")
    container.seccomp_unconfined = seccomp == "Unconfined"


def _env(spec: Mapping, objects: Objects, pod_name: str, namespace: str, where: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for source in spec.get("envFrom") or []:
        prefix = source.get("prefix", "")
        for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
            if key in source:
                for k, v in objects.data(kind, source[key]["name"], f"{where}.envFrom").items():
                    env[prefix + k] = v.decode()
    fields = {"metadata.name": pod_name, "metadata.namespace": namespace, "status.podIP": LOCALHOST}
    for item in spec.get("env") or []:
        name, ref = item["name"], item.get("valueFrom")
        if ref is None:
            env[name] = str(item.get("value", ""))
        elif "fieldRef" in ref and ref["fieldRef"]["fieldPath"] in fields:
            env[name] = fields[ref["fieldRef"]["fieldPath"]]
        elif "secretKeyRef" in ref or "configMapKeyRef" in ref:
            kind, key = ("Secret", "secretKeyRef") if "secretKeyRef" in ref else ("ConfigMap", "configMapKeyRef")
            data = objects.data(kind, ref[key]["name"], f"{where}.env.{name}")
            if ref[key]["key"] not in data:
                raise PodError(f"{where}.env.{name}: {kind} {ref[key]['name']!r} has no key {ref[key]['key']!r}")
            env[name] = data[ref[key]["key"]].decode()
        else:
            raise PodError(f"{where}.env.{name}: valueFrom {sorted(ref)} is not honoured by the pod runner")
    return env


def _volumes(container: Container, spec: Mapping, pod: Mapping, objects: Objects, where: str) -> None:
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    for mount in spec.get("volumeMounts") or []:
        path, volume = mount["mountPath"], volumes.get(mount["name"])
        _check_fields(mount, {"name", "mountPath", "readOnly"}, set(), f"{where}.volumeMounts.{mount['name']}")
        if volume is None:
            raise PodError(f"{where}.volumeMounts.{mount['name']}: no volume of that name in the pod")
        kinds = set(volume) - {"name"}
        if kinds == {"emptyDir"}:
            empty = volume["emptyDir"] or {}
            size = str(_quantity_bytes(empty["sizeLimit"])) if "sizeLimit" in empty else None
            if path == "/dev/shm":
                container.shm_size = size or "64m"
            else:
                container.tmpfs[path] = size
        elif kinds in ({"configMap"}, {"secret"}):
            kind, source = ("ConfigMap", volume["configMap"]) if "configMap" in volume else ("Secret", volume["secret"])
            name = source.get("name") or source.get("secretName")
            data = objects.data(kind, name, f"{where}.volumes.{mount['name']}")
            if items := source.get("items"):
                data = {item["path"]: data[item["key"]] for item in items}
            container.files[path] = (data, int(source.get("defaultMode", 0o644)))
        else:
            raise PodError(f"{where}.volumes.{mount['name']}: {', '.join(sorted(kinds))} volumes are not honoured by the pod runner")


def _service_account(container: Container, pod: Mapping, objects: Objects, namespace: str) -> None:
    """Mount the pod's service account token and name the API server, as the ServiceAccount
    admission plugin (shouldAutomount: the pod's field, else the account's) and the kubelet do."""
    if objects.api is None:
        return
    name = pod.get("serviceAccountName", "default")
    account = objects.by_key.get(("ServiceAccount", name), {})
    if not pod.get("automountServiceAccountToken", account.get("automountServiceAccountToken", True)):
        return
    files = {"token": objects.api.token_for(namespace, name).encode(), "ca.crt": objects.api.ca_pem,
             "namespace": namespace.encode()}
    container.files[SERVICE_ACCOUNT_DIR] = (files, 0o644)
    container.env = {"KUBERNETES_SERVICE_HOST": objects.api.host, "KUBERNETES_SERVICE_PORT": str(objects.api.port),
                     **container.env}


def pod_containers(pod: Mapping, pod_name: str, objects: Objects, namespace: str = "default",
                   injected_env: Mapping[str, str] | None = None, server: bool = False) -> list[Container]:
    """A pod spec's init containers, then its containers, each with `injected_env` added."""
    where = f"pod {pod_name}"
    _check_fields(pod, _HONOURED_POD_FIELDS, _IGNORED_POD_FIELDS, where)
    containers = []
    for index, spec in enumerate([*(pod.get("initContainers") or []), *pod["containers"]]):
        cwhere = f"{where} container {spec.get('name', index)}"
        _check_fields(spec, _HONOURED_CONTAINER_FIELDS, _IGNORED_CONTAINER_FIELDS, cwhere)
        command = [*(spec.get("command") or []), *(spec.get("args") or [])]
        if not command:
            raise PodError(f"{cwhere}: no command: the pod runner does not read an image's default command")
        container = Container(name=f"{pod_name}-{spec.get('name', index)}", image=spec["image"], command=command,
                              hostname=pod_name, workdir=spec.get("workingDir"), server=server)
        container.env = {**_env(spec, objects, pod_name, namespace, cwhere), **(injected_env or {})}
        _security(container, pod.get("securityContext") or {}, spec.get("securityContext") or {}, cwhere)
        _volumes(container, spec, pod, objects, cwhere)
        _service_account(container, pod, objects, namespace)
        limits = (spec.get("resources") or {}).get("limits") or {}
        unknown = sorted(set(limits) - {"cpu", "memory"})
        if unknown:
            raise PodError(f"{cwhere}.resources.limits: {', '.join(unknown)}: not honoured by the pod runner (no such device here)")
        container.cpus = _cpus(limits["cpu"]) if "cpu" in limits else None
        container.memory = str(_quantity_bytes(limits["memory"])) if "memory" in limits else None
        containers.append(container)
    return containers


def _merge(base: Mapping, patch: Mapping) -> dict:
    """A strategic-merge-like patch: maps merge, lists of named items merge by name, others replace."""
    out = dict(base)
    for key, value in patch.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        elif isinstance(value, list) and isinstance(out.get(key), list) and all(
                isinstance(v, Mapping) and "name" in v for v in [*value, *out[key]]):
            merged = {v["name"]: v for v in out[key]}
            for v in value:
                merged[v["name"]] = _merge(merged.get(v["name"], {}), v)
            out[key] = list(merged.values())
        else:
            out[key] = value
    return out


def _torch_nproc_per_node(trainer: Mapping) -> str:
    """PET_NPROC_PER_NODE as the torch plugin computes it (calculateNumProcPerNode): an int as
    given; "auto" without a GPU resource, or "cpu", is the CPU limit (else request), at least 1."""
    value = str(trainer.get("numProcPerNode", "auto"))
    resources = trainer.get("resourcesPerNode") or {}
    if value not in ("auto", "cpu"):
        return value
    for kind in ("limits", "requests"):
        amounts = resources.get(kind) or {}
        gpu = any("gpu" in name.lower() for name in amounts)
        if "cpu" in amounts and (value == "cpu" or not gpu):
            return str(max(1, math.ceil(float(_cpus(amounts["cpu"])))))  # Quantity.Value() rounds up
    return "1" if value == "cpu" or not resources else value


def _trainjob(obj: Mapping, objects: Objects) -> list[Container]:
    """Trainer v2.3.0 torch-distributed runtime: numNodes pods of the runtime's `node` job."""
    name, trainer = obj["metadata"]["name"], obj["spec"]["trainer"]
    pod: dict = {}
    for patch in obj["spec"].get("runtimePatches") or []:
        for job in patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]:
            if job["name"] != "node":
                raise PodError(f"TrainJob {name}: replicated job {job['name']!r}: the torch runtime has only `node`")
            pod = _merge(pod, job["template"]["spec"]["template"]["spec"])
    node = next((c for c in pod.get("containers", []) if c["name"] == "node"), None)
    if node is None:
        raise PodError(f"TrainJob {name}: the runtime patch has no `node` container")
    node.update(image=trainer["image"], command=trainer["command"], env=trainer.get("env") or [])
    if "args" in trainer:
        node["args"] = trainer["args"]
    if "resourcesPerNode" in trainer:
        node["resources"] = trainer["resourcesPerNode"]
    nodes, port = int(trainer.get("numNodes", 1)), free_port()
    nproc = _torch_nproc_per_node(trainer)
    containers = []
    for rank in range(nodes):
        injected = {"PET_NNODES": str(nodes), "PET_NPROC_PER_NODE": nproc,
                    "PET_NODE_RANK": str(rank), "PET_MASTER_ADDR": LOCALHOST, "PET_MASTER_PORT": str(port)}
        containers += pod_containers(pod, f"{name}-node-0-{rank}", objects, obj["metadata"].get("namespace", "default"), injected)
    return containers


def _pytorchjob(obj: Mapping, objects: Objects) -> list[Container]:
    """training-operator v1.9.4: Master then Workers, setPodEnv's environment."""
    name, spec = obj["metadata"]["name"], obj["spec"]
    replicas = spec["pytorchReplicaSpecs"]
    unknown = sorted(set(replicas) - {"Master", "Worker"})
    if unknown:
        raise PodError(f"PyTorchJob {name}: replica types {unknown}: not honoured by the pod runner")
    if "elasticPolicy" in spec:
        raise PodError(f"PyTorchJob {name}: elasticPolicy: not honoured by the pod runner")
    total = sum(int(r.get("replicas", 1)) for r in replicas.values())
    nproc, port = str(spec.get("nprocPerNode", "1")), free_port()
    containers = []
    for role in ("Master", "Worker"):
        if role not in replicas:
            continue
        for index in range(int(replicas[role].get("replicas", 1))):
            rank = index if role == "Master" else index + 1 if "Master" in replicas else index
            injected = {"PYTHONUNBUFFERED": "1", "MASTER_ADDR": LOCALHOST, "MASTER_PORT": str(port),
                        "PET_MASTER_ADDR": LOCALHOST, "PET_MASTER_PORT": str(port),
                        "WORLD_SIZE": str(total * int(nproc)), "RANK": str(rank), "PET_NODE_RANK": str(rank),
                        "PET_NPROC_PER_NODE": nproc, "PET_NNODES": str(total)}
            containers += pod_containers(replicas[role]["template"]["spec"], f"{name}-{role.lower()}-{index}", objects,
                                         obj["metadata"].get("namespace", "default"), injected)
    return containers


def _ray_start(head: bool, params: Mapping[str, object], pod: Mapping) -> tuple[list[str], str]:
    """`ray start` as KubeRay v1.7.0 builds it (common/pod.go: generateRayStartCommand and the
    defaults before it): num-cpus from the CPU limit (else request, rounded up), memory from the
    memory limit, --block; the node's fixed ports (metrics, dashboard agent) made free ports here,
    its address 127.0.0.1 (host network: the pods share one address). Returns the command and the
    URL of the node's readiness check (the raylet health its dashboard agent serves, which
    KubeRay's readiness probe asks)."""
    resources = pod["containers"][0].get("resources") or {}
    agent_port = free_port()
    params = {**params, "node-ip-address": LOCALHOST, "metrics-export-port": free_port(),
              "dashboard-agent-listen-port": agent_port}
    for kind in ("limits", "requests"):
        cpu = (resources.get(kind) or {}).get("cpu")
        if cpu is not None and "num-cpus" not in params:
            params["num-cpus"] = math.ceil(float(_cpus(cpu)))
    if "memory" in (resources.get("limits") or {}) and "memory" not in params:
        params["memory"] = _quantity_bytes(resources["limits"]["memory"])
    flags = [f"--{k}" if v in ("", None, "true") else f"--{k}={v}" for k, v in params.items()]
    command = ["ray", "start", *(["--head"] if head else []), "--block", *flags]
    return command, f"http://{LOCALHOST}:{agent_port}/api/local_raylet_healthz"


def _with_command(pod: Mapping, command: list[str]) -> dict:
    return _merge(pod, {"containers": [{"name": pod["containers"][0]["name"], "command": command}]})


def _rayjob(obj: Mapping, objects: Objects) -> list[Container]:
    """KubeRay v1.7.0: the head (`ray start --head`), workers joining it, the submitter.

    The submitter runs `ray job submit` and waits for the job (its exit status is the job's). It
    starts once the cluster is ready, as KubeRay creates it only then: `run()` waits for the
    dashboard's api/gcs_healthz (common/job.go, BuildJobSubmitCommand) and every node's
    api/local_raylet_healthz (the Ray pods' readiness probe).
    """
    name, spec = obj["metadata"]["name"], obj["spec"]
    namespace = obj["metadata"].get("namespace", "default")
    if spec.get("submissionMode", "K8sJobMode") != "K8sJobMode":
        raise PodError(f"RayJob {name}: submissionMode {spec['submissionMode']}: the pod runner runs K8sJobMode")
    for key in ("runtimeEnvYAML", "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "metadata"):
        if key in spec:
            raise PodError(f"RayJob {name}: spec.{key}: not honoured by the pod runner")
    cluster = spec["rayClusterSpec"]
    gcs_port, dashboard_port = free_port(), free_port()
    head_group = cluster["headGroupSpec"]
    head_params = {**head_group.get("rayStartParams", {}), "port": gcs_port, "dashboard-port": dashboard_port,
                   "dashboard-host": LOCALHOST, "ray-client-server-port": free_port()}
    head_pod = head_group["template"]["spec"]
    address, dashboard = f"{LOCALHOST}:{gcs_port}", f"http://{LOCALHOST}:{dashboard_port}"
    # setContainerEnvVars (common/pod.go): what KubeRay adds to every Ray container
    ray_env = {"RAY_CLUSTER_NAME": name, "RAY_CLUSTER_NAMESPACE": namespace, "RAY_PORT": str(gcs_port),
               "RAY_ADDRESS": address, "RAY_USAGE_STATS_KUBERAY_IN_USE": "1", "RAY_DASHBOARD_ENABLE_K8S_DISK_USAGE": "1"}
    command, ready = _ray_start(True, head_params, head_pod)
    readiness = [f"{dashboard}/api/gcs_healthz", ready]
    containers = pod_containers(_with_command(head_pod, command), f"{name}-head",
                                objects, namespace, {**ray_env, "RAY_NODE_TYPE_NAME": "headgroup"}, server=True)
    for group in cluster.get("workerGroupSpecs") or []:
        worker_pod = group["template"]["spec"]
        params = {**group.get("rayStartParams", {}), "address": address}
        for index in range(int(group.get("replicas", 1))):
            command, ready = _ray_start(False, params, worker_pod)
            readiness.append(ready)
            (worker,) = pod_containers(_with_command(worker_pod, command), f"{name}-{group['groupName']}-worker-{index}",
                                       objects, namespace, {**ray_env, "RAY_NODE_TYPE_NAME": group["groupName"],
                                                            "FQ_RAY_IP": LOCALHOST, "RAY_IP": LOCALHOST}, server=True)
            # KubeRay's injected init container `wait-gcs-ready` holds a worker until the head's GCS answers
            worker.wait_for_urls = [f"{dashboard}/api/gcs_healthz"]
            containers.append(worker)
    submitter_pod = spec.get("submitterPodTemplate", {}).get("spec")
    if submitter_pod is None:
        raise PodError(f"RayJob {name}: no submitterPodTemplate: the pod runner needs the submitter's spec")
    submission_id = f"{name}-{uuid.uuid4().hex[:8]}"
    command = ["ray", "job", "submit", "--address", dashboard, "--submission-id", submission_id, "--",
               *shlex.split(spec["entrypoint"])]
    (submitter,) = pod_containers(_with_command(submitter_pod, command), f"{name}-submitter", objects, namespace,
                                  {"RAY_DASHBOARD_ADDRESS": dashboard, "RAY_JOB_SUBMISSION_ID": submission_id})
    submitter.wait_for_urls = readiness  # KubeRay submits once the RayCluster is ready
    return [*containers, submitter]


def containers_of(obj: Mapping, objects: Iterable[Mapping] = (), api: ApiServer | None = None) -> list[Container]:
    """The containers a controller would start for `obj`, servers first, in start order; with
    `api`, pods that mount their service account's token get it (see the module's docstring)."""
    known = Objects([*objects, obj], api)
    kind, name = obj["kind"], obj["metadata"]["name"]
    namespace = obj["metadata"].get("namespace", "default")
    if kind == "Pod":
        return pod_containers(obj["spec"], name, known, namespace)
    if kind == "Job":
        if int(obj["spec"].get("parallelism", 1)) != 1 or int(obj["spec"].get("completions", 1)) != 1:
            raise PodError(f"Job {name}: parallelism/completions other than 1: not honoured by the pod runner")
        return pod_containers(obj["spec"]["template"]["spec"], f"{name}-0", known, namespace)
    if kind == "Deployment":
        if int(obj["spec"].get("replicas", 1)) != 1:
            raise PodError(f"Deployment {name}: replicas other than 1: not honoured by the pod runner")
        return pod_containers(obj["spec"]["template"]["spec"], f"{name}-0", known, namespace, server=True)
    if kind == TRAINJOB.kind:
        return _trainjob(obj, known)
    if kind == PYTORCHJOB.kind:
        return _pytorchjob(obj, known)
    if kind == RAYJOB.kind:
        return _rayjob(obj, known)
    raise PodError(f"{kind} {name}: the pod runner runs Pod, Job, Deployment, TrainJob, PyTorchJob and RayJob")


def docker_run_command(container: Container, files_root: Path) -> list[str]:
    """`docker run` arguments for `container`; its ConfigMap/Secret files are written under `files_root`."""
    args = ["docker", "run", "--detach", "--name", container.name, "--network", container.network, "--init=false"]
    if container.hostname and not container.network.startswith("container:"):
        # and in /etc/hosts with the pod's address, as the kubelet writes it (a container in
        # another's network shares that one's name and hosts file, as containers of one pod do)
        args += ["--hostname", container.hostname, "--add-host", f"{container.hostname}:{LOCALHOST}"]
    args += [a for name, address in container.hosts.items() for a in ("--add-host", f"{name}:{address}")]
    if container.user:
        args += ["--user", container.user]
    args += [a for g in container.groups for a in ("--group-add", str(g))]
    if container.read_only:
        args.append("--read-only")
    args += [a for c in container.cap_drop for a in ("--cap-drop", c)]
    args += [a for c in container.cap_add for a in ("--cap-add", c)]
    if container.no_new_privileges:
        args += ["--security-opt", "no-new-privileges"]
    if container.seccomp_unconfined:
        args += ["--security-opt", "seccomp=unconfined"]
    if container.cpus:
        args += ["--cpus", container.cpus]
    if container.memory:
        args += ["--memory", container.memory]
    if container.shm_size:
        args += ["--shm-size", container.shm_size]
    for path, size in container.tmpfs.items():
        args += ["--tmpfs", f"{path}:rw,exec,mode=1777" + (f",size={size}" if size else "")]
    for index, (path, (files, mode)) in enumerate(container.files.items()):
        folder = files_root / container.name / str(index)
        folder.mkdir(parents=True)
        for relative, content in files.items():
            target = folder / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
            os.chmod(target, mode)
            if container.file_group is not None and os.geteuid() == 0:
                os.chown(target, 0, container.file_group)
        os.chmod(folder, 0o755)
        args += ["--volume", f"{folder}:{path}:ro"]
    for key, value in container.env.items():
        args += ["--env", f"{key}={value}"]
    if container.workdir:
        args += ["--workdir", container.workdir]
    return [*args, "--entrypoint", container.command[0], container.image, *container.command[1:]]


def _docker(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=check, timeout=timeout)


def _wait_for_url(url: str, timeout: float, servers: list[Container]) -> None:
    """Wait until `url` answers; a server that exits meanwhile (a Ray head that gave up) fails at once."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError as error:
            for server in servers:
                if _docker("inspect", "-f", "{{.State.Running}}", server.name).stdout.strip() != "true":
                    log = _docker("logs", "--tail", "20", server.name, check=False)
                    raise PodError(f"container {server.name} exited while {url} was awaited:\n"
                                   f"{log.stdout}{log.stderr}") from error
            if time.monotonic() > deadline:
                raise PodError(f"{url} did not answer within {timeout:.0f} s: {error}") from error
            time.sleep(1)


def run(containers: list[Container], timeout: float = 1800, server_start_timeout: float = 180,
        kill_when: tuple[str, Callable[[], bool]] | None = None) -> list[Result]:
    """Run `containers` (servers in the background) until every non-server one has exited; remove all.

    Images must be present locally. A container with `wait_for_urls` starts once they answer (a
    Ray worker: the head's GCS; a submitter: every Ray node ready); a server that exits meanwhile
    raises `PodError` with its log. `kill_when=(name, condition)` SIGKILLs that container once
    `condition()` is true, checked every second (a node preempted mid-run). When one non-server
    container fails, the others are stopped (SIGTERM, 10 s grace), as a failed TrainJob's JobSet or
    PyTorchJob deletes its other pods. Returns the non-server containers' results, in order.
    """
    for image in sorted({c.image for c in containers}):
        if _docker("image", "inspect", image, check=False).returncode != 0:
            raise PodError(f"image {image} is not on this machine (the pod runner pulls nothing): build it with images/build.sh")
    files_root = Path(tempfile.mkdtemp(prefix="peg-pods-"))
    started: list[Container] = []
    try:
        for container in containers:
            for url in container.wait_for_urls:
                _wait_for_url(url, server_start_timeout, [c for c in started if c.server])
            _docker(*docker_run_command(container, files_root)[1:])
            started.append(container)
        deadline = time.monotonic() + timeout
        waiting = [c for c in started if not c.server]
        finished: dict[str, Result] = {}
        while len(finished) < len(waiting):
            for container in waiting:
                if container.name in finished or _docker(
                        "inspect", "-f", "{{.State.Running}}", container.name).stdout.strip() == "true":
                    continue
                status, oom = _docker("inspect", "-f", "{{.State.ExitCode}} {{.State.OOMKilled}}", container.name).stdout.split()
                log = _docker("logs", container.name, check=False)
                finished[container.name] = Result(container.name, int(status), log.stdout + log.stderr, oom == "true")
                if int(status) != 0:  # the job has failed (JobSet / training-operator): its other pods are deleted
                    for other in waiting:
                        if other.name not in finished:
                            _docker("stop", "--time", "10", other.name, check=False)
            if kill_when is not None and kill_when[1]():
                _docker("kill", "--signal", "KILL", kill_when[0], check=False)
                kill_when = None
            if len(finished) < len(waiting):
                if time.monotonic() > deadline:
                    raise PodError(f"containers still run after {timeout:.0f} s: "
                                   f"{', '.join(c.name for c in waiting if c.name not in finished)}")
                time.sleep(1)
        return [finished[c.name] for c in waiting]
    finally:
        for container in started:
            _docker("rm", "--force", container.name, check=False)
        shutil.rmtree(files_root, ignore_errors=True)


def s3_secret_from_env(config: RunConfig, environ: Mapping[str, str] = os.environ) -> dict:
    """The Secret `cluster.s3_secret` the pods mount, holding this process's S3 keys (the ones
    `prepare` uploads with): keys `store.access_key_env` and `store.secret_key_env`."""
    names = (config.store.access_key_env, config.store.secret_key_env)
    missing = [n for n in names if not environ.get(n)]
    if missing:
        raise PodError(f"store keys: set {' and '.join(missing)}: the docker backend hands them to the pods as the "
                       f"Secret {config.cluster.s3_secret!r}")
    return {"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": config.cluster.s3_secret, "namespace": config.cluster.namespace},
            "data": {n: base64.b64encode(environ[n].encode()).decode() for n in names}}


class DockerBackend:
    """`peg pipeline run --backend docker`: `prepare` here, every other stage's rendered job run as
    containers by the pod runner, with the pod's exact settings (the images must be on this machine)."""

    def __init__(self, config: RunConfig, log: Callable[[str], None] = print, timeout: float = 7200):
        check_renderable(config)
        self.config, self.log, self.timeout = config, log, timeout
        self.objects = [render_config_map(config), s3_secret_from_env(config)]

    def run_stage(self, stage: Stage, config_path: Path, env: Mapping[str, str]) -> None:
        if stage.name in LOCAL_STAGES:
            LocalBackend().run_stage(stage, config_path, env)
            return
        for obj in render_stage(self.config, stage.name, env):
            results = run(containers_of(obj, self.objects), timeout=self.timeout)
            for result in results:
                if result.status != 0:
                    self.log(result.log[-4000:])
                    oom = " (OOMKilled: raise the memory limit)" if result.oom_killed else ""
                    raise StageFailed(f"stage {stage.name}: container {result.name} exited with status {result.status}{oom}")
