"""Kubernetes objects of a run, as plain dicts: pure functions of `RunConfig` (+ stage).

- the run config travels as a ConfigMap, mounted at `/etc/peg/run.yaml` in every pod;
- `train` is a Kubeflow Trainer v2 TrainJob (`cluster.trainer_api: trainjob`) or a v1 PyTorchJob
  (`pytorchjob`), both rendered from one `TrainingPods` description;
- the Ray stages (synth, encode, mine, judge, score) and the light stages after training (eval,
  export, report) are KubeRay RayJobs;
- `prepare` is not rendered: it reads `data.beir` / `data.train_files` from the machine that has
  them and uploads them into the store (`peg pipeline run --backend k8s` runs it there);
- every pod runs `peg pipeline stage NAME /etc/peg/run.yaml`, reads S3 keys from the Secret
  `cluster.s3_secret` mounted as files (never inlined), has a memory-backed /dev/shm and runs
  under the Pod Security Standard "restricted" profile with a read-only root filesystem.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from peg.config import ConfigError, RunConfig
from peg.k8s.names import is_dns_1035, resource_name
from peg.k8s.validation import (
    image_problem,
    inline_secret_problem,
    is_secret_name,
    label_key_problem,
    label_value_problem,
    quantity_problem,
    subdomain_problem,
)
from peg.k8s.vocabulary import GROUP, LABEL_HASH, LABEL_QUEUE, LABEL_RUN, LABEL_STAGE, PYTORCHJOB, RAYJOB, TRAINJOB
from peg.pipeline import STAGES, enabled_stages, stage_hashes

CONFIG_DIR = "/etc/peg"
CONFIG_FILE = "run.yaml"
CONFIG_PATH = f"{CONFIG_DIR}/{CONFIG_FILE}"
S3_DIR = "/etc/peg-s3"
SCRATCH_DIR = "/tmp"
LOCAL_STAGES = tuple(s.name for s in STAGES if s.runs == "local")  # run where the data is, never in a pod
TRAINING_STAGES = tuple(s.name for s in STAGES if s.runs == "torchrun")  # a TrainJob / PyTorchJob, not a RayJob
RAY_HEAD, RAY_WORKER = "ray-head", "ray-worker"
GPU = "nvidia.com/gpu"
TORCHRUN_ENV = ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT")
MANAGER = f"{GROUP}/render"  # the field manager of the TrainJob's pod-template overrides


class RenderError(ConfigError):
    """A config that cannot run on a cluster; the message names the config key."""


def cluster_stages(cfg: RunConfig) -> list[str]:
    """The enabled stages that run as cluster jobs, in pipeline order (all but `prepare`)."""
    return [s.name for s in enabled_stages(cfg) if s.name not in LOCAL_STAGES]


def check_renderable(cfg: RunConfig) -> None:
    """Raise `RenderError` naming every key that stops `cfg` from running on a cluster, all in one
    line ("key: problem; key: problem"), as every `PegError` is."""
    c = cfg.cluster
    problems = []
    if not is_dns_1035(cfg.name):
        problems.append(
            f"name: {cfg.name!r} must be a DNS-1035 label of at most 63 characters (a-z, 0-9, '-', starting "
            "with a letter): it names and labels every object"
        )
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", c.namespace) or len(c.namespace) > 63:
        problems.append(f"cluster.namespace: {c.namespace!r} is not a DNS-1123 label")
    if not cfg.store.uri.startswith("s3://"):
        problems.append(
            f"store.uri: {cfg.store.uri!r} is a local path, which pods cannot share: use s3://bucket/prefix"
        )
    else:
        if not c.s3_secret:
            problems.append("cluster.s3_secret: name the Secret holding the S3 keys (required for an s3:// store)")
        if not cfg.store.endpoint:
            problems.append("store.endpoint: set the S3 endpoint host:port the pods reach")
    beir = cfg.data.beir or ""
    if re.match(r"^[a-z][a-z0-9+.-]*://", beir):
        problems.append(
            f"data.beir: {beir!r} is a URL, but `prepare` reads data.beir from the machine it runs on (the "
            "launcher's, or yours with the operator) and uploads it into the store: give a local BEIR folder "
            "there, or beir:NAME (e.g. beir:fiqa) to have prepare download a BEIR dataset"
        )
    if not c.runtime.strip():
        problems.append("cluster.runtime: the TrainJob's ClusterTrainingRuntime name is empty")
    if c.gpus_per_node and is_cpu_image(c.image):
        problems.append(f"cluster.gpus_per_node: {c.gpus_per_node} GPUs asked with the CPU image {c.image!r}")
    if c.ray_worker_gpus and is_cpu_image(c.ray_image):
        problems.append(f"cluster.ray_worker_gpus: {c.ray_worker_gpus} GPUs asked with the CPU image {c.ray_image!r}")
    if c.gpus_per_node and cfg.train.nproc_per_node != c.gpus_per_node:
        problems.append(
            f"train.nproc_per_node: {cfg.train.nproc_per_node} processes per node with cluster.gpus_per_node "
            f"{c.gpus_per_node}: run one process per GPU"
        )
    world = c.nodes * cfg.train.nproc_per_node
    if cfg.batch.queries_per_step % world:
        problems.append(
            f"batch.queries_per_step: {cfg.batch.queries_per_step} does not divide across the world size {world} "
            f"(cluster.nodes {c.nodes} x train.nproc_per_node {cfg.train.nproc_per_node})"
        )
    if c.priority_class and c.trainer_api == "trainjob":
        problems.append(
            "cluster.priority_class: a TrainJob (Trainer v2.3) cannot set a pod priority class; set it in the "
            "ClusterTrainingRuntime or use cluster.trainer_api: pytorchjob"
        )
    reserved = sorted(set(c.env) & {"HOME", "PEG_WORK_DIR", *TORCHRUN_ENV})
    if reserved:
        problems.append(f"cluster.env: {', '.join(reserved)} are set by peg or by the trainer (torchrun); leave them out")
    problems += api_server_problems(cfg)
    problems += inline_secret_problems(cfg)
    if problems:
        raise RenderError("; ".join(problems))


def api_server_problems(cfg: RunConfig) -> list[str]:
    """The cluster keys the API server would refuse (`peg.k8s.validation`), each naming its key."""
    c = cfg.cluster
    found = [(f"cluster.{name}.{part}", quantity_problem(getattr(getattr(c, name), part)))
             for name in ("resources", "ray_head_resources") for part in ("cpu", "memory")]
    found += [("cluster.shm_size", quantity_problem(c.shm_size)),
              ("cluster.image", image_problem(c.image)), ("cluster.ray_image", image_problem(c.ray_image))]
    found += [(f"cluster.{name}", subdomain_problem(getattr(c, name)))
              for name in ("s3_secret", "service_account", "priority_class") if getattr(c, name)]
    for key, value in c.node_selector.items():
        found += [("cluster.node_selector", label_key_problem(key)), ("cluster.node_selector", label_value_problem(value))]
    found += [(f"cluster.tolerations[{i}].key", label_key_problem(t.key)) for i, t in enumerate(c.tolerations) if t.key]
    found += [(f"cluster.image_pull_secrets[{i}]", subdomain_problem(name)) for i, name in enumerate(c.image_pull_secrets)]
    if c.scratch_size:
        found.append(("cluster.scratch_size", quantity_problem(c.scratch_size)))
    if c.queue:
        found.append(("cluster.queue", label_value_problem(c.queue)))
    return [f"{key}: {problem}" for key, problem in found if problem]


SECRET_ADVICE = (
    "a value written into the run's ConfigMap and pod specs is readable by anyone who can read them: keep "
    "credentials in a Kubernetes Secret (the S3 keys: cluster.s3_secret) and out of the config"
)


def inline_secret_problems(cfg: RunConfig) -> list[str]:
    """Every config string rendered into a Kubernetes object (the whole config travels in the
    ConfigMap; `cluster.env` into every container) that carries a credential, by its key; and
    every `cluster.env` variable named like a secret that has a literal value."""
    found: dict[str, str] = {}

    def walk(key: str, value: Any) -> None:
        if isinstance(value, dict):
            for name, item in value.items():
                walk(f"{key}.{name}" if key else str(name), item)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                walk(f"{key}[{i}]", item)
        elif isinstance(value, str) and (problem := inline_secret_problem(value)):
            found[key] = problem

    walk("", pod_config(cfg).model_dump(mode="json"))
    for name, value in cfg.cluster.env.items():
        if value and is_secret_name(name):
            found.setdefault(f"cluster.env.{name}", "is named like a secret and has a literal value")
    return [f"{key}: {problem}; {SECRET_ADVICE}" for key, problem in found.items()]


def is_cpu_image(image: str) -> bool:
    """True for an image whose tag has a `cpu` part (`peg-trainer:0.1.0-cpu`)."""
    tag = image.rsplit("/", 1)[-1].partition(":")[2].partition("@")[0]
    return "cpu" in re.split(r"[-_.]", tag)


def config_map_name(cfg: RunConfig) -> str:
    return resource_name(cfg.name, "config")


def stage_hash_label(stage_hash: str) -> str:
    """The `peg.dev/stage-hash` label value: the stage hash's first 32 hex digits (labels hold 63)."""
    return stage_hash[:32]


def pod_config(cfg: RunConfig) -> RunConfig:
    """The config pods read: `cfg` with the S3 keys read from the mounted Secret's files."""
    pod = cfg.model_copy(deep=True)
    if cfg.cluster.s3_secret:
        pod.store.credentials_file = S3_DIR
    return pod


def render_config_map(cfg: RunConfig) -> dict:
    """The ConfigMap holding the run config every pod reads at /etc/peg/run.yaml."""
    check_renderable(cfg)
    text = yaml.safe_dump(pod_config(cfg).model_dump(mode="json"), sort_keys=False)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(cfg, config_map_name(cfg), {LABEL_RUN: cfg.name}),
        "data": {CONFIG_FILE: text},
    }


def render_stage(cfg: RunConfig, stage: str, env: Mapping[str, str] | None = None) -> list[dict]:
    """The job object(s) that run `stage`: a TrainJob or PyTorchJob for pretrain and train, else a RayJob.

    `env` (the launcher's run lease) is added to the environment of every container that runs peg,
    where each API allows it: a TrainJob's `spec.trainer.env` (Trainer v2.3.0 rejects env on the
    `node` container of a runtime patch), every container of a PyTorchJob or RayJob.
    """
    extra = [{"name": k, "value": v} for k, v in {**cfg.cluster.env, **(env or {})}.items()]
    check_renderable(cfg)
    enabled = [s.name for s in enabled_stages(cfg)]
    if stage in LOCAL_STAGES:
        raise RenderError(
            f"stage {stage}: it reads data.beir / data.train_files from this machine and uploads them to the store; "
            f"run `peg pipeline stage {stage} CONFIG` here (`peg pipeline run --backend k8s` does)"
        )
    if stage not in enabled:
        raise RenderError(f"stage {stage!r} is not enabled in this config (enabled: {', '.join(enabled)})")
    labels = {LABEL_RUN: cfg.name, LABEL_STAGE: stage, LABEL_HASH: stage_hash_label(stage_hashes(cfg)[stage])}
    if stage in TRAINING_STAGES:
        pods = training_pods(cfg, labels, stage, extra)
        return [render_trainjob(pods) if cfg.cluster.trainer_api == "trainjob" else render_pytorchjob(pods)]
    return [render_rayjob(cfg, stage, labels, extra)]


def render_run(cfg: RunConfig) -> list[dict]:
    """The ConfigMap and every cluster stage's job objects, in pipeline order."""
    objects = [render_config_map(cfg)]
    for stage in cluster_stages(cfg):
        objects += render_stage(cfg, stage)
    return objects


# --- the pod every job runs -------------------------------------------------------------------


def _metadata(cfg: RunConfig, name: str, labels: dict[str, str]) -> dict:
    return {"name": name, "namespace": cfg.cluster.namespace, "labels": dict(labels)}


def _job_metadata(cfg: RunConfig, name: str, labels: dict[str, str]) -> dict:
    """A job's metadata: its labels, and `cluster.queue` as Kueue's queue-name label (on the job only:
    Kueue admits the job, which then creates its pods)."""
    meta = _metadata(cfg, name, labels)
    if cfg.cluster.queue:
        meta["labels"][LABEL_QUEUE] = cfg.cluster.queue
    return meta


def stage_command(stage: str) -> list[str]:
    return ["peg", "pipeline", "stage", stage, CONFIG_PATH]


def _env(extra: list[dict]) -> list[dict]:
    """The environment of every container that runs peg: scratch paths, then `extra`."""
    return [
        {"name": "HOME", "value": f"{SCRATCH_DIR}/home"},
        {"name": "PEG_WORK_DIR", "value": f"{SCRATCH_DIR}/peg-work"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": "TOKENIZERS_PARALLELISM", "value": "false"},
        *extra,
    ]


def _volumes(cfg: RunConfig) -> list[dict]:
    volumes = [
        {"name": "config", "configMap": {"name": config_map_name(cfg)}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": cfg.cluster.shm_size}},
        {"name": "scratch", "emptyDir": {"sizeLimit": cfg.cluster.scratch_size} if cfg.cluster.scratch_size else {}},
    ]
    if cfg.cluster.s3_secret:
        volumes.append({"name": "s3", "secret": {"secretName": cfg.cluster.s3_secret, "defaultMode": 0o440}})
    return volumes


def _volume_mounts(cfg: RunConfig) -> list[dict]:
    mounts = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "scratch", "mountPath": SCRATCH_DIR},
    ]
    if cfg.cluster.s3_secret:
        mounts.append({"name": "s3", "mountPath": S3_DIR, "readOnly": True})
    return mounts


def _pod_security(cfg: RunConfig) -> dict:
    uid = cfg.cluster.run_as_user
    return {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": uid,
        "fsGroup": uid,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _container_security(cfg: RunConfig) -> dict:
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "privileged": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "runAsUser": cfg.cluster.run_as_user,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _resources(cpu: str, memory: str, gpus: int) -> dict:
    amounts: dict[str, Any] = {"cpu": cpu, "memory": memory}
    if gpus:
        amounts[GPU] = gpus
    return {"requests": dict(amounts), "limits": dict(amounts)}


def _tolerations(cfg: RunConfig) -> list[dict]:
    out = []
    for t in cfg.cluster.tolerations:
        item = {"key": t.key, "operator": t.operator, "value": t.value, "effect": t.effect,
                "tolerationSeconds": t.toleration_seconds}
        out.append({k: v for k, v in item.items() if v is not None})
    return out


def _pod_spec(cfg: RunConfig, containers: list[dict], restart_policy: str | None) -> dict:
    """A restricted pod: config, /dev/shm, scratch and S3 key volumes, scheduling settings."""
    c = cfg.cluster
    spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "securityContext": _pod_security(cfg),
        "containers": containers,
        "volumes": _volumes(cfg),
    }
    if restart_policy:
        spec["restartPolicy"] = restart_policy
    if c.service_account:
        spec["serviceAccountName"] = c.service_account
    if c.node_selector:
        spec["nodeSelector"] = dict(c.node_selector)
    if c.tolerations:
        spec["tolerations"] = _tolerations(cfg)
    if c.priority_class:
        spec["priorityClassName"] = c.priority_class
    if c.image_pull_secrets:
        spec["imagePullSecrets"] = [{"name": name} for name in c.image_pull_secrets]
    return spec


def _container(cfg: RunConfig, name: str, image: str, resources: dict, command: list[str] | None,
               env: list[dict]) -> dict:
    container: dict[str, Any] = {
        "name": name,
        "image": image,
        "imagePullPolicy": cfg.cluster.image_pull_policy,
        "env": _env(env),
        "resources": resources,
        "securityContext": _container_security(cfg),
        "volumeMounts": _volume_mounts(cfg),
    }
    if command:
        container["command"] = command
    return container


# --- training: one description, two renderers ----------------------------------------------------


@dataclass(frozen=True)
class TrainingPods:
    """What both training APIs need: `nodes` identical pods, each running `nproc_per_node` ranks."""

    cfg: RunConfig
    name: str
    labels: dict[str, str]
    nodes: int
    nproc_per_node: int
    image: str
    command: list[str]
    resources: dict
    env: list[dict]  # beyond the base environment (`_env`)


def training_pods(cfg: RunConfig, labels: dict[str, str], stage: str, env: list[dict]) -> TrainingPods:
    c = cfg.cluster
    return TrainingPods(
        cfg=cfg,
        name=resource_name(cfg.name, stage),
        labels=labels,
        nodes=c.nodes,
        nproc_per_node=cfg.train.nproc_per_node,
        image=c.image,
        command=stage_command(stage),
        resources=_resources(c.resources.cpu, c.resources.memory, c.gpus_per_node),
        env=env,
    )


def render_trainjob(pods: TrainingPods) -> dict:
    """A Kubeflow Trainer v2 TrainJob on the `cluster.runtime` ClusterTrainingRuntime.

    The runtime's `node` container gets image, command, resources and env from `spec.trainer`;
    volumes, security and scheduling come in as a runtime patch of its pod template, whose `node`
    container carries no env (Trainer v2.3.0's JobSet plugin rejects it: jobset.go, JobSet.Validate).
    """
    cfg, c = pods.cfg, pods.cfg.cluster
    pod = _pod_spec(cfg, [], None)
    pod.pop("automountServiceAccountToken")  # not patchable through a TrainJob
    pod["containers"] = [
        {"name": "node", "securityContext": _container_security(cfg), "volumeMounts": _volume_mounts(cfg)}
    ]
    spec: dict[str, Any] = {
        "runtimeRef": {"apiGroup": TRAINJOB.group, "kind": "ClusterTrainingRuntime", "name": c.runtime},
        "trainer": {
            "image": pods.image,
            "command": pods.command,
            "numNodes": pods.nodes,
            "numProcPerNode": pods.nproc_per_node,
            "resourcesPerNode": pods.resources,
            "env": _env(pods.env),
        },
        "runtimePatches": [
            {
                "manager": MANAGER,
                "trainingRuntimeSpec": {
                    "template": {
                        "spec": {
                            "replicatedJobs": [
                                {"name": "node", "template": {"spec": {"template": {"spec": pod}}}}
                            ]
                        }
                    }
                },
            }
        ],
    }
    if c.active_deadline_seconds:
        spec["activeDeadlineSeconds"] = c.active_deadline_seconds
    return {
        "apiVersion": TRAINJOB.api_version,
        "kind": TRAINJOB.kind,
        "metadata": _job_metadata(cfg, pods.name, pods.labels),
        "spec": spec,
    }


def render_pytorchjob(pods: TrainingPods) -> dict:
    """A Kubeflow training-operator v1 PyTorchJob: one Master and `nodes - 1` Workers."""
    cfg, c = pods.cfg, pods.cfg.cluster

    def replica(replicas: int) -> dict:
        container = _container(cfg, "pytorch", pods.image, pods.resources, pods.command, pods.env)
        return {
            "replicas": replicas,
            "restartPolicy": "OnFailure",
            "template": {"metadata": {"labels": dict(pods.labels)}, "spec": _pod_spec(cfg, [container], None)},
        }

    replicas = {"Master": replica(1)}
    if pods.nodes > 1:
        replicas["Worker"] = replica(pods.nodes - 1)
    run_policy: dict[str, Any] = {
        "cleanPodPolicy": "None",
        "backoffLimit": c.backoff_limit,
        "ttlSecondsAfterFinished": c.ttl_seconds_after_finished,
    }
    if c.active_deadline_seconds:
        run_policy["activeDeadlineSeconds"] = c.active_deadline_seconds
    return {
        "apiVersion": PYTORCHJOB.api_version,
        "kind": PYTORCHJOB.kind,
        "metadata": _job_metadata(cfg, pods.name, pods.labels),
        "spec": {"nprocPerNode": str(pods.nproc_per_node), "runPolicy": run_policy, "pytorchReplicaSpecs": replicas},
    }


# --- Ray stages ------------------------------------------------------------------------------


def render_rayjob(cfg: RunConfig, stage: str, labels: dict[str, str], env: list[dict]) -> dict:
    """A KubeRay RayJob: head (runs the entrypoint) + one worker group.

    Its Ray cluster is deleted `cluster.ray_cluster_ttl_seconds` after the job ends (KubeRay
    v1.7.0 rayjob_controller.go, handleShutdownAfterJobFinishes: the RayJob and its submitter Job,
    which holds the driver log, stay); a job not running within `cluster.pending_deadline_seconds`
    fails (preRunningDeadlineSeconds)."""
    c = cfg.cluster
    head = _container(cfg, RAY_HEAD, c.ray_image, _resources(c.ray_head_resources.cpu, c.ray_head_resources.memory, 0), None, env)
    worker = _container(cfg, RAY_WORKER, c.ray_image, _resources(c.resources.cpu, c.resources.memory, c.ray_worker_gpus), None, env)
    submitter = _container(cfg, "ray-job-submitter", c.ray_image, _resources("500m", "512Mi", 0), None, env)
    submitter["volumeMounts"] = [m for m in submitter["volumeMounts"] if m["name"] == "scratch"]

    def template(container: dict, restart_policy: str | None = None) -> dict:
        return {"metadata": {"labels": dict(labels)}, "spec": _pod_spec(cfg, [container], restart_policy)}

    submitter_template = template(submitter, "Never")
    submitter_template["spec"]["volumes"] = [v for v in submitter_template["spec"]["volumes"] if v["name"] == "scratch"]
    spec: dict[str, Any] = {
        "entrypoint": " ".join(stage_command(stage)),
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": c.ray_cluster_ttl_seconds,
        "backoffLimit": c.backoff_limit,
        "submissionMode": "K8sJobMode",
        "submitterPodTemplate": submitter_template,
        "rayClusterSpec": {
            "headGroupSpec": {"rayStartParams": {"dashboard-host": "0.0.0.0"}, "template": template(head)},
            "workerGroupSpecs": [
                {
                    "groupName": "gpu" if c.ray_worker_gpus else "cpu",
                    "replicas": c.ray_workers,
                    "minReplicas": c.ray_workers,
                    "maxReplicas": c.ray_workers,
                    "rayStartParams": {},
                    "template": template(worker),
                }
            ],
        },
    }
    if c.active_deadline_seconds:
        spec["activeDeadlineSeconds"] = c.active_deadline_seconds
    if c.pending_deadline_seconds:
        spec["preRunningDeadlineSeconds"] = c.pending_deadline_seconds
    return {
        "apiVersion": RAYJOB.api_version,
        "kind": RAYJOB.kind,
        "metadata": _job_metadata(cfg, resource_name(cfg.name, stage), labels),
        "spec": spec,
    }


# --- status ----------------------------------------------------------------------------------


def job_phase(obj: dict) -> str:
    """"pending", "running", "succeeded" or "failed" from a TrainJob's, PyTorchJob's or RayJob's status.

    A RayJob is read by its `jobDeploymentStatus` alone, as KubeRay v1.7.0 sets it
    (ray-operator/controllers/ray/rayjob_controller.go): `jobStatus` FAILED also shows while
    KubeRay retries (`Retrying`, then `Initializing` again, up to `backoffLimit`) and while the
    submitter is still running; only `Failed`/`ValidationFailed`, or `Complete` without SUCCEEDED
    (a STOPPED job), is the end of it. `Suspended`/`Suspending` (Kueue holds it) is pending.
    """
    status = obj.get("status") or {}
    kind = obj.get("kind")
    if kind == RAYJOB.kind:
        deployment, job = status.get("jobDeploymentStatus", ""), status.get("jobStatus", "")
        if deployment in ("Failed", "ValidationFailed"):
            return "failed"
        if deployment == "Complete":
            return "succeeded" if job == "SUCCEEDED" else "failed"
        return "running" if deployment in ("Running", "Retrying") else "pending"
    true = {c.get("type") for c in status.get("conditions") or [] if c.get("status") == "True"}
    if kind == TRAINJOB.kind:
        if "Failed" in true:
            return "failed"
        if "Complete" in true:
            return "succeeded"
        if "Suspended" in true:
            return "pending"
        jobs = status.get("jobsStatus") or []
        return "running" if any(j.get("active") or j.get("ready") or j.get("succeeded") for j in jobs) else "pending"
    if kind == PYTORCHJOB.kind:
        if "Failed" in true:
            return "failed"
        if "Succeeded" in true:
            return "succeeded"
        return "running" if "Running" in true or "Restarting" in true else "pending"
    raise ValueError(f"job_phase: unknown kind {kind!r}")


# --- files ------------------------------------------------------------------------------------


def manifest_files(objects: list[dict]) -> dict[str, str]:
    """{file name: YAML} for `objects` in order, each headed by the command its pods run."""
    files = {}
    for i, obj in enumerate(objects):
        kind, name = obj["kind"], obj["metadata"]["name"]
        stage = obj["metadata"]["labels"].get(LABEL_STAGE)
        if stage:
            head = f"# {kind} {name}: runs `{' '.join(stage_command(stage))}` (the config is the ConfigMap's run.yaml)\n"
        else:
            head = f"# {kind} {name}: the run config every pod reads at {CONFIG_PATH}\n"
        files[f"{i:02d}-{stage or 'config'}-{kind.lower()}.yaml"] = head + yaml.safe_dump(obj, sort_keys=False)
    return files
