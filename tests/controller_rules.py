"""The admission rules of the controllers peg's jobs run under, written from their source at the
pinned tags (no cluster here): what a real cluster's webhooks and controllers would refuse.

- Kubeflow Trainer v2.3.0: the TrainJob webhook (pkg/webhooks/trainjob_webhook.go) and the plugins
  it calls for the `torch-distributed` ClusterTrainingRuntime (pkg/runtime/framework/plugins/jobset/
  jobset.go, .../torch/torch.go);
- Kubeflow training-operator v1.9.4: the PyTorchJob webhook (pkg/webhooks/pytorch/pytorchjob_webhook.go,
  pkg/common/util/webhooks.go), in the kubeflow/trainer repository at tag v1.9.4;
- KubeRay v1.7.0: ray-operator/controllers/ray/utils/validation.go, which the RayJob controller
  runs before anything else (a failure sets jobDeploymentStatus ValidationFailed).

`RULES` lists every rule with its upstream file and function; `violations(obj)` runs those of the
object's kind and returns one message per broken rule (empty: the controllers accept it).
Only create-time rules are modelled; update-only rules (immutability) are out of scope.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

TRAINER = "kubeflow/trainer v2.3.0"
TRAINING_OPERATOR = "kubeflow/trainer v1.9.4 (training-operator)"
KUBERAY = "ray-project/kuberay v1.7.0"

# The torch-distributed ClusterTrainingRuntime (charts/kubeflow-trainer/files/runtimes/torch-distributed.yaml
# at v2.3.0): replicated job name -> its container names.
TORCH_DISTRIBUTED_JOBS = {"node": {"node"}}
# pkg/constants/constants.go: TorchRunReservedEnvNames
TORCHRUN_RESERVED_ENV = {"PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT"}
# pkg/constants/constants.go: DatasetInitializer, ModelInitializer, Node
NO_ENV_PATCH_CONTAINERS = {"dataset-initializer", "model-initializer", "node"}
# ray-operator/controllers/ray/utils/constant.go: MaxRayClusterNameLength, MaxRayJobNameLength
MAX_RAYCLUSTER_NAME, MAX_RAYJOB_NAME = 53, 53 - 6
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
QUALIFIED_NAME = re.compile(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                            r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


@dataclass(frozen=True)
class Rule:
    kind: str
    source: str  # "<repo tag>: <file>, <function>"
    check: Callable[[dict], Iterator[str]]

    @property
    def name(self) -> str:
        return self.check.__name__


RULES: list[Rule] = []


def rule(kind: str, source: str) -> Callable:
    def register(check: Callable[[dict], Iterator[str]]) -> Callable:
        RULES.append(Rule(kind, source, check))
        return check

    return register


def violations(obj: dict) -> list[str]:
    """Every rule of `obj`'s kind it breaks, as "<rule>: <message>"."""
    kind = obj.get("kind")
    if kind not in {r.kind for r in RULES}:
        raise ValueError(f"no controller rules for kind {kind!r}")
    return [f"{r.name}: {m}" for r in RULES if r.kind == kind for m in r.check(obj)]


def _dig(obj: Any, *keys: str | int) -> Any:
    for key in keys:
        if isinstance(obj, dict):
            obj = obj.get(key)
        elif isinstance(obj, list) and isinstance(key, int) and key < len(obj):
            obj = obj[key]
        else:
            return None
    return obj


def _is_dns_1035(name: str, max_len: int = 63) -> bool:
    return isinstance(name, str) and len(name) <= max_len and DNS_1035.match(name) is not None


# --- Kubeflow Trainer v2.3.0: TrainJob ----------------------------------------------------------------

_JOBSET = f"{TRAINER}: pkg/runtime/framework/plugins/jobset/jobset.go, JobSet.Validate"


@rule("TrainJob", f"{TRAINER}: pkg/webhooks/trainjob_webhook.go, TrainJobValidator.ValidateCreate "
      "(runtime.RuntimeRefToRuntimeRegistryKey: only registered runtime kinds)")
def trainjob_runtime_ref_registered(obj: dict) -> Iterator[str]:
    ref = _dig(obj, "spec", "runtimeRef") or {}
    if ref.get("apiGroup", "trainer.kubeflow.org") != "trainer.kubeflow.org" or ref.get(
        "kind", "ClusterTrainingRuntime"
    ) not in ("ClusterTrainingRuntime", "TrainingRuntime"):
        yield f"unsupported runtime: {ref.get('kind')}.{ref.get('apiGroup')}"
    elif not ref.get("name"):
        yield "spec.runtimeRef.name is empty"


@rule("TrainJob", _JOBSET + " (validation.IsDomainPrefixedPath on runtimePatches[].manager)")
def trainjob_patch_manager_domain_prefixed(obj: dict) -> Iterator[str]:
    for patch in _dig(obj, "spec", "runtimePatches") or []:
        manager = patch.get("manager", "")
        domain, slash, path = manager.partition("/")
        if not slash or not path or not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)+", domain):
            yield f"spec.runtimePatches.manager {manager!r} must be a domain-prefixed path (such as 'acme.io/foo')"


def _patched_jobs(obj: dict) -> Iterator[dict]:
    for patch in _dig(obj, "spec", "runtimePatches") or []:
        yield from _dig(patch, "trainingRuntimeSpec", "template", "spec", "replicatedJobs") or []


@rule("TrainJob", _JOBSET + " (a patched replicated job must exist in the runtime)")
def trainjob_patch_job_exists(obj: dict) -> Iterator[str]:
    for job in _patched_jobs(obj):
        if job.get("name") not in TORCH_DISTRIBUTED_JOBS:
            yield f"must not have replicated job that doesn't exist in the runtime job template: {job.get('name')!r}"


@rule("TrainJob", _JOBSET + " (a patched container must exist in the runtime job)")
def trainjob_patch_container_exists(obj: dict) -> Iterator[str]:
    for job in _patched_jobs(obj):
        known = TORCH_DISTRIBUTED_JOBS.get(job.get("name"), set())
        pod = _dig(job, "template", "spec", "template", "spec") or {}
        for c in (pod.get("initContainers") or []) + (pod.get("containers") or []):
            if job.get("name") in TORCH_DISTRIBUTED_JOBS and c.get("name") not in known:
                yield f"must not have container that doesn't exist in the runtime job {job.get('name')}: {c.get('name')!r}"


@rule("TrainJob", _JOBSET + " (no env on the dataset-initializer, model-initializer, node containers)")
def trainjob_patch_no_env_on_node(obj: dict) -> Iterator[str]:
    for job in _patched_jobs(obj):
        for c in _dig(job, "template", "spec", "template", "spec", "containers") or []:
            if c.get("env") and c.get("name") in NO_ENV_PATCH_CONTAINERS:
                yield f"must not have envs for the dataset-initializer, model-initializer, node containers ({c['name']})"


@rule("TrainJob", f"{TRAINER}: pkg/runtime/framework/plugins/torch/torch.go, Torch.Validate (reserved torchrun envs)")
def trainjob_no_reserved_torchrun_env(obj: dict) -> Iterator[str]:
    names = {e.get("name") for e in _dig(obj, "spec", "trainer", "env") or []}
    if names & TORCHRUN_RESERVED_ENV:
        yield f"spec.trainer.env must not have reserved envs, invalid envs configured: {sorted(names & TORCHRUN_RESERVED_ENV)}"


# --- training-operator v1.9.4: PyTorchJob ----------------------------------------------------------

_PYTORCH = f"{TRAINING_OPERATOR}: pkg/webhooks/pytorch/pytorchjob_webhook.go"


@rule("PyTorchJob", f"{_PYTORCH}, validatePyTorchJob (NameIsDNS1035Label)")
def pytorchjob_name_dns_1035(obj: dict) -> Iterator[str]:
    if not _is_dns_1035(_dig(obj, "metadata", "name")):
        yield f"metadata.name {_dig(obj, 'metadata', 'name')!r} should match a DNS-1035 label"


@rule("PyTorchJob", f"{TRAINING_OPERATOR}: pkg/common/util/webhooks.go, ValidateRunPolicy (managedBy)")
def pytorchjob_managed_by_supported(obj: dict) -> Iterator[str]:
    manager = _dig(obj, "spec", "runPolicy", "managedBy")
    if manager is not None and manager not in ("kubeflow.org/training-operator", "kueue.x-k8s.io/multikueue"):
        yield f"spec.runPolicy.managedBy: Unsupported value {manager!r}"


@rule("PyTorchJob", f"{_PYTORCH}, validateSpec (elasticPolicy.nProcPerNode with nprocPerNode)")
def pytorchjob_nproc_once(obj: dict) -> Iterator[str]:
    spec = obj.get("spec") or {}
    if _dig(spec, "elasticPolicy", "nProcPerNode") is not None and spec.get("nprocPerNode") is not None:
        yield "spec.elasticPolicy.nProcPerNode: must not be used with spec.nprocPerNode"
    if spec.get("elasticPolicy") is not None and "Worker" not in (spec.get("pytorchReplicaSpecs") or {}):
        yield "spec.pytorchReplicaSpecs[Worker]: must be configured if elastic policy is used"


def _replicas(obj: dict) -> Iterator[tuple[str, dict]]:
    yield from ((_dig(obj, "spec", "pytorchReplicaSpecs") or {}).items())


@rule("PyTorchJob", f"{_PYTORCH}, validatePyTorchReplicaSpecs (replica types Master and Worker only)")
def pytorchjob_replica_types(obj: dict) -> Iterator[str]:
    if not _dig(obj, "spec", "pytorchReplicaSpecs"):
        yield "spec.pytorchReplicaSpecs: must be required"
    for rtype, _ in _replicas(obj):
        if rtype not in ("Master", "Worker"):
            yield f"spec.pytorchReplicaSpecs[{rtype}]: Unsupported value"


@rule("PyTorchJob", f"{_PYTORCH}, validatePyTorchReplicaSpecs (containers, images, a container named pytorch)")
def pytorchjob_pytorch_container(obj: dict) -> Iterator[str]:
    for rtype, spec in _replicas(obj):
        containers = _dig(spec, "template", "spec", "containers") or []
        if not containers:
            yield f"spec.pytorchReplicaSpecs[{rtype}].template.spec.containers: must be specified"
        for i, c in enumerate(containers):
            if not c.get("image"):
                yield f"spec.pytorchReplicaSpecs[{rtype}].template.spec.containers[{i}].image: must be required"
        if not any(c.get("name") == "pytorch" for c in containers):
            yield f"spec.pytorchReplicaSpecs[{rtype}].template.spec.containers: must have at least one container with name pytorch"


@rule("PyTorchJob", f"{_PYTORCH}, validatePyTorchReplicaSpecs (Master replicas 1, Worker at least 1)")
def pytorchjob_replica_counts(obj: dict) -> Iterator[str]:
    for rtype, spec in _replicas(obj):
        n = spec.get("replicas")
        if rtype == "Master" and n != 1:
            yield f"spec.pytorchReplicaSpecs[Master].replicas: must be 1 (got {n})"
        if rtype == "Worker" and n is not None and n < 1:
            yield f"spec.pytorchReplicaSpecs[Worker].replicas: must be at least 1 (got {n})"


# --- KubeRay v1.7.0: RayJob (and the RayCluster it creates) ---------------------------------------

_KUBERAY = f"{KUBERAY}: ray-operator/controllers/ray/utils/validation.go"


@rule("RayJob", f"{_KUBERAY}, ValidateRayJobMetadata (name: DNS-1035, at most MaxRayJobNameLength)")
def rayjob_name(obj: dict) -> Iterator[str]:
    name = _dig(obj, "metadata", "name")
    if not _is_dns_1035(name, MAX_RAYJOB_NAME):
        yield f"RayJob name {name!r} should be a DNS-1035 label of no more than {MAX_RAYJOB_NAME} characters"


@rule("RayJob", f"{_KUBERAY}, ValidateRayJobSpec (suspend needs shutdownAfterJobFinishes)")
def rayjob_suspend_needs_shutdown(obj: dict) -> Iterator[str]:
    spec = obj.get("spec") or {}
    if spec.get("suspend") and not spec.get("shutdownAfterJobFinishes"):
        yield "a RayJob with shutdownAfterJobFinishes set to false is not allowed to be suspended"
    if spec.get("suspend") and spec.get("clusterSelector"):
        yield "the ClusterSelector mode doesn't support the suspend operation"


@rule("RayJob", f"{_KUBERAY}, ValidateRayJobSpec + validateDeletionConfiguration (TTL)")
def rayjob_ttl(obj: dict) -> Iterator[str]:
    spec = obj.get("spec") or {}
    ttl = spec.get("ttlSecondsAfterFinished", 0)
    if ttl < 0:
        yield "TTLSecondsAfterFinished must be a non-negative integer"
    if not spec.get("shutdownAfterJobFinishes") and ttl > 0:
        yield "a RayJob with shutdownAfterJobFinishes set to false cannot have TTLSecondsAfterFinished"


@rule("RayJob", f"{_KUBERAY}, validateDeletionConfiguration + validateLegacyDeletionPolicies (deletionStrategy)")
def rayjob_deletion_strategy(obj: dict) -> Iterator[str]:
    spec = obj.get("spec") or {}
    strategy = spec.get("deletionStrategy")
    if strategy is None:
        return
    yield "deletionStrategy needs the RayJobDeletionPolicy feature gate (off by default in v1.7.0)"


@rule("RayJob", f"{_KUBERAY}, ValidateRayJobSpec (rayClusterSpec or clusterSelector; submission mode limits)")
def rayjob_cluster_and_mode(obj: dict) -> Iterator[str]:
    spec = obj.get("spec") or {}
    mode = spec.get("submissionMode", "K8sJobMode")
    if spec.get("rayClusterSpec") is None and not spec.get("clusterSelector"):
        yield "one of RayClusterSpec or ClusterSelector must be set"
    if (mode == "InteractiveMode" or spec.get("clusterSelector")) and (spec.get("backoffLimit") or 0) > 0:
        yield f"BackoffLimit is incompatible with {'InteractiveMode' if mode == 'InteractiveMode' else 'ClusterSelector mode'}"
    if mode == "SidecarMode" and (spec.get("submitterPodTemplate") is not None or spec.get("submitterConfig") is not None):
        yield "SidecarMode doesn't support SubmitterPodTemplate / SubmitterConfig"


@rule("RayJob", f"{_KUBERAY}, ValidateRayJobSpec (activeDeadlineSeconds, preRunningDeadlineSeconds > 0; backoffLimit >= 0)")
def rayjob_deadlines(obj: dict) -> Iterator[str]:
    spec = obj.get("spec") or {}
    for key in ("activeDeadlineSeconds", "preRunningDeadlineSeconds"):
        if spec.get(key) is not None and spec[key] <= 0:
            yield f"{key} must be a positive integer"
    if spec.get("backoffLimit") is not None and spec["backoffLimit"] < 0:
        yield "backoffLimit must be a positive integer"


def _groups(obj: dict) -> Iterator[tuple[str, dict]]:
    cluster = _dig(obj, "spec", "rayClusterSpec") or {}
    if "headGroupSpec" in cluster:
        yield "Head", cluster["headGroupSpec"]
    for group in cluster.get("workerGroupSpecs") or []:
        yield group.get("groupName", "?"), group


def _autoscaling(obj: dict) -> bool:
    return bool(_dig(obj, "spec", "rayClusterSpec", "enableInTreeAutoscaling"))


@rule("RayJob", f"{_KUBERAY}, ValidateRayClusterSpec (head and every worker group have a container)")
def raycluster_containers(obj: dict) -> Iterator[str]:
    for name, group in _groups(obj):
        if not _dig(group, "template", "spec", "containers"):
            yield f"{'headGroupSpec' if name == 'Head' else 'workerGroupSpec ' + name} should have at least one container"


@rule("RayJob", f"{_KUBERAY}, ValidateRayClusterSpec (min/maxReplicas without autoscaling, non-negative, min <= max)")
def raycluster_replicas(obj: dict) -> Iterator[str]:
    for name, group in _groups(obj):
        if name == "Head":
            continue
        lo, hi = group.get("minReplicas"), group.get("maxReplicas")
        if not _autoscaling(obj) and (lo is None or hi is None):
            yield f"worker group {name} must set both minReplicas and maxReplicas when autoscaling is disabled"
        if (lo is not None and lo < 0) or (hi is not None and hi < 0):
            yield f"worker group {name} has negative minReplicas/maxReplicas"
        if lo is not None and hi is not None and lo > hi:
            yield f"worker group {name} has minReplicas {lo} greater than maxReplicas {hi}"


@rule("RayJob", f"{_KUBERAY}, validateRayGroupResources (resources in rayStartParams and Resources)")
def raycluster_group_resources(obj: dict) -> Iterator[str]:
    for name, group in _groups(obj):
        params = group.get("rayStartParams") or {}
        if any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")) and group.get("resources"):
            yield f"resource fields should not be set in both rayStartParams and Resources for {name} group"


@rule("RayJob", f"{_KUBERAY}, validateRayGroupLabels (no rayStartParams labels; label syntax)")
def raycluster_group_labels(obj: dict) -> Iterator[str]:
    for name, group in _groups(obj):
        if "labels" in (group.get("rayStartParams") or {}):
            yield f"rayStartParams['labels'] is not supported for {name} group"
        for key, value in (group.get("labels") or {}).items():
            if not QUALIFIED_NAME.match(key) or not LABEL_VALUE.match(str(value)) or len(str(value)) > 63:
                yield f"invalid label {key}={value!r} in {name} group"


@rule("RayJob", f"{_KUBERAY}, ValidateRayClusterSpec (Redis settings need GcsFaultToleranceOptions; no redis username)")
def raycluster_redis(obj: dict) -> Iterator[str]:
    cluster = _dig(obj, "spec", "rayClusterSpec") or {}
    head = _dig(cluster, "headGroupSpec", "template", "spec", "containers", 0) or {}
    env = {e.get("name") for e in head.get("env") or []}
    annotations = _dig(obj, "metadata", "annotations") or {}
    if "RAY_REDIS_ADDRESS" in env and not cluster.get("gcsFaultToleranceOptions") and annotations.get("ray.io/ft-enabled") != "true":
        yield "RAY_REDIS_ADDRESS is set which implicitly enables GCS fault tolerance, but GcsFaultToleranceOptions is not set"
    if _dig(cluster, "headGroupSpec", "rayStartParams", "redis-username") or "REDIS_USERNAME" in env:
        yield "cannot set redis username in rayStartParams or environment variables"


@rule("RayJob", f"{_KUBERAY}, ValidateRayClusterSpec (RAY_enable_autoscaler_v2 without enableInTreeAutoscaling; suspended groups)")
def raycluster_autoscaler(obj: dict) -> Iterator[str]:
    head = _dig(obj, "spec", "rayClusterSpec", "headGroupSpec", "template", "spec", "containers", 0) or {}
    v2 = next((e.get("value") for e in head.get("env") or [] if e.get("name") == "RAY_enable_autoscaler_v2"), None)
    if not _autoscaling(obj) and v2 in ("1", "true"):
        yield "RAY_enable_autoscaler_v2 cannot be set when enableInTreeAutoscaling is false"
    for name, group in _groups(obj):
        if name != "Head" and group.get("suspend"):
            yield f"worker group {name} can be suspended only when the RayJobDeletionPolicy feature gate is enabled"


@rule("RayJob", f"{_KUBERAY}, ValidateRayClusterMetadata (the RayCluster named after the RayJob: DNS-1035, <= 53)")
def raycluster_name(obj: dict) -> Iterator[str]:
    # KubeRay names the cluster <rayjob name>-<5 random characters> (utils.GenerateRayClusterName).
    name = f"{_dig(obj, 'metadata', 'name')}-abcde"
    if not _is_dns_1035(name, MAX_RAYCLUSTER_NAME):
        yield f"RayCluster name {name!r} should be a DNS-1035 label of no more than {MAX_RAYCLUSTER_NAME} characters"
