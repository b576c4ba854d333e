"""The controllers' rules (tests/controller_rules.py): each rejects a broken object, every object
peg can render passes all of them, and the controllers' status vocabularies map to the phases
peg acts on (issue 35)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from chart_render import repo_run_texts
from controller_rules import RULES, violations

from peg.config import RunConfig, load_config, parse_config
from peg.k8s.render import cluster_stages, job_phase, render_config_map, render_stage

REPO = Path(__file__).resolve().parents[1]
S3 = {
    "store.uri": "s3://peg/artifacts",
    "store.endpoint": "peg-s3.peg.svc:8333",
    "cluster.s3_secret": "peg-s3",
}
LEASE = {"PEG_RUN_LEASE": "launcher-1"}


def _configs() -> dict[str, RunConfig]:
    """Every run config the repo ships (chart_render.repo_run_texts), with an S3 store and a BEIR
    folder where an example names a local store or no data (a cluster run needs both)."""
    out = {}
    for name, text in repo_run_texts().items():
        raw = yaml.safe_load(text)
        overrides = {} if str((raw.get("store") or {}).get("uri", "")).startswith("s3://") else dict(S3)
        if (raw.get("data") or {}).get("beir") is None and not (raw.get("data") or {}).get("train_files"):
            overrides["data.beir"] = "/data/beir/scifact"
        out[name] = parse_config(text, name, overrides)
    return out


def _jobs(cfg: RunConfig) -> list[dict]:
    """The jobs of every stage, for both trainer APIs, as the operator creates them (no env) and
    as the launcher does (`peg pipeline run --backend k8s`: the run lease added)."""
    jobs = []
    for api in ("trainjob", "pytorchjob"):
        c = cfg.model_copy(deep=True)
        c.cluster.trainer_api = api
        if api == "trainjob":
            c.cluster.priority_class = None
        for stage in cluster_stages(c):
            jobs += render_stage(c, stage) + render_stage(c, stage, LEASE)
    return jobs


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    out = {name: _jobs(cfg) for name, cfg in _configs().items()}
    for folder in ("rendered", "pytorchjob"):
        for path in sorted((REPO / "manifests" / folder).glob("*.yaml")):
            doc = yaml.safe_load(path.read_text())
            if doc["kind"] != "ConfigMap":
                out.setdefault(f"manifests/{folder}", []).append(doc)
    return out


def test_every_object_peg_renders_passes_every_rule(rendered):
    kinds = {o["kind"] for objs in rendered.values() for o in objs}
    assert kinds == {"TrainJob", "PyTorchJob", "RayJob"}
    assert len(rendered) >= 10
    broken = {(name, o["kind"], o["metadata"]["name"]): v for name, objs in rendered.items() for o in objs if (v := violations(o))}
    assert broken == {}


def _patch_node(job: dict) -> dict:
    return job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]


def _worker(job: dict) -> dict:
    return job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]


def _head_env(job: dict) -> list:
    return job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]


# rule name -> how to break a valid object of its kind
BREAK: dict[str, Callable[[dict], None]] = {
    "trainjob_runtime_ref_registered": lambda j: j["spec"]["runtimeRef"].update(kind="ClusterServingRuntime"),
    "trainjob_patch_manager_domain_prefixed": lambda j: j["spec"]["runtimePatches"][0].update(manager="peg"),
    "trainjob_patch_job_exists": lambda j: _patch_node(j).update(name="launcher"),
    "trainjob_patch_container_exists":
        lambda j: _patch_node(j)["template"]["spec"]["template"]["spec"]["containers"][0].update(name="trainer"),
    "trainjob_patch_no_env_on_node": lambda j: _patch_node(j)["template"]["spec"]["template"]["spec"]["containers"][0].update(
        env=[{"name": "PEG_RUN_LEASE", "value": "x"}]),
    "trainjob_no_reserved_torchrun_env": lambda j: j["spec"]["trainer"]["env"].append({"name": "PET_NNODES", "value": "2"}),
    "pytorchjob_name_dns_1035": lambda j: j["metadata"].update(name="9-train"),
    "pytorchjob_managed_by_supported": lambda j: j["spec"]["runPolicy"].update(managedBy="peg.dev/operator"),
    "pytorchjob_nproc_once": lambda j: j["spec"].update(elasticPolicy={"nProcPerNode": 2}),
    "pytorchjob_replica_types": lambda j: j["spec"]["pytorchReplicaSpecs"].update(Launcher=j["spec"]["pytorchReplicaSpecs"]["Master"]),
    "pytorchjob_pytorch_container":
        lambda j: j["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0].update(name="main"),
    "pytorchjob_replica_counts": lambda j: j["spec"]["pytorchReplicaSpecs"]["Master"].update(replicas=2),
    "rayjob_name": lambda j: j["metadata"].update(name="r" * 48),
    "rayjob_suspend_needs_shutdown": lambda j: j["spec"].update(suspend=True, shutdownAfterJobFinishes=False, ttlSecondsAfterFinished=0),
    "rayjob_ttl": lambda j: j["spec"].update(shutdownAfterJobFinishes=False, ttlSecondsAfterFinished=60),
    "rayjob_deletion_strategy": lambda j: j["spec"].update(deletionStrategy={"onSuccess": {"policy": "DeleteCluster"}}),
    "rayjob_cluster_and_mode": lambda j: j["spec"].update(submissionMode="InteractiveMode", backoffLimit=2),
    "rayjob_deadlines": lambda j: j["spec"].update(preRunningDeadlineSeconds=0),
    "raycluster_containers": lambda j: _worker(j)["template"]["spec"].update(containers=[]),
    "raycluster_replicas": lambda j: _worker(j).update(minReplicas=3, maxReplicas=1),
    "raycluster_group_resources": lambda j: _worker(j).update(rayStartParams={"num-cpus": "4"}, resources={"CPU": "4"}),
    "raycluster_group_labels": lambda j: _worker(j).update(rayStartParams={"labels": "zone=a"}),
    "raycluster_redis": lambda j: _head_env(j).append({"name": "RAY_REDIS_ADDRESS", "value": "redis:6379"}),
    "raycluster_autoscaler": lambda j: _head_env(j).append({"name": "RAY_enable_autoscaler_v2", "value": "1"}),
    "raycluster_name": lambda j: j["metadata"].update(name="Quickstart-encode"),
}


def test_every_rule_has_a_breaking_case_and_cites_its_source():
    assert sorted(BREAK) == sorted(r.name for r in RULES)
    for r in RULES:
        assert r.source.split(":")[0].endswith(("v2.3.0", "v1.9.4 (training-operator)", "v1.7.0")), r
        assert ".go, " in r.source, r


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.name)
def test_each_rule_rejects_a_broken_object(rule, rendered):
    valid = next(o for o in rendered["examples/k8s-quickstart.yaml"] if o["kind"] == rule.kind)
    broken = copy.deepcopy(valid)
    BREAK[rule.name](broken)
    assert [v for v in violations(broken) if v.startswith(f"{rule.name}: ")], (rule.name, violations(broken))
    assert violations(valid) == []


def test_config_map_is_no_job_kind():
    with pytest.raises(ValueError, match="no controller rules"):
        violations(render_config_map(load_config(REPO / "examples" / "k8s-quickstart.yaml")))


# --- status vocabularies ------------------------------------------------------------------------
# KubeRay v1.7.0 ray-operator/apis/ray/v1/rayjob_types.go: JobDeploymentStatus, JobStatus.
DEPLOYMENT = ["", "Initializing", "Running", "Complete", "Failed", "ValidationFailed", "Suspending", "Suspended",
              "Retrying", "Waiting"]
JOB = ["", "PENDING", "RUNNING", "STOPPED", "SUCCEEDED", "FAILED"]


@pytest.mark.parametrize("deployment", DEPLOYMENT)
@pytest.mark.parametrize("job", JOB)
def test_rayjob_phase_follows_the_deployment_status(deployment, job):
    """Only a terminal jobDeploymentStatus ends a stage: `FAILED` while `Retrying` (KubeRay retries
    up to backoffLimit, rayjob_controller.go updateStatusToRetrying...) or while `Running` (the
    submitter has not finished) is not a failure (issue 35 finding 3)."""
    phase = job_phase({"kind": "RayJob", "status": {"jobDeploymentStatus": deployment, "jobStatus": job}})
    expected = {
        "Failed": "failed", "ValidationFailed": "failed",
        "Complete": "succeeded" if job == "SUCCEEDED" else "failed",
        "Running": "running", "Retrying": "running",
    }.get(deployment, "pending")
    assert phase == expected


def test_rayjob_retrying_after_a_failed_attempt_is_running():
    assert job_phase({"kind": "RayJob", "status": {"jobDeploymentStatus": "Retrying", "jobStatus": "FAILED"}}) == "running"
    assert job_phase({"kind": "RayJob", "status": {"jobDeploymentStatus": "Suspended"}}) == "pending"


def _conditions(kind: str, *true: str) -> dict:
    return {"kind": kind, "status": {"conditions": [{"type": t, "status": "True"} for t in true]}}


@pytest.mark.parametrize(
    ("obj", "phase"),
    [  # Trainer v2.3.0 pkg/apis/trainer/v1alpha1/trainjob_types.go: Suspended, Complete, Failed
        (_conditions("TrainJob", "Suspended"), "pending"),
        (_conditions("TrainJob", "Complete"), "succeeded"),
        (_conditions("TrainJob", "Failed"), "failed"),
        ({"kind": "TrainJob", "status": {"jobsStatus": [{"name": "node", "active": 2}]}}, "running"),
        # training-operator v1.9.4 pkg/apis/kubeflow.org/v1/common_types.go: Created, Running,
        # Restarting, Succeeded, Suspended, Failed
        (_conditions("PyTorchJob", "Created"), "pending"),
        (_conditions("PyTorchJob", "Created", "Suspended"), "pending"),
        (_conditions("PyTorchJob", "Created", "Running"), "running"),
        (_conditions("PyTorchJob", "Created", "Restarting"), "running"),
        (_conditions("PyTorchJob", "Created", "Succeeded"), "succeeded"),
        (_conditions("PyTorchJob", "Created", "Failed"), "failed"),
    ],
)
def test_training_job_condition_vocabulary(obj, phase):
    assert job_phase(obj) == phase


def test_finished_ray_clusters_are_released_and_stuck_jobs_have_deadlines():
    """Issue 35 findings 5 and 6: with the defaults, a finished RayJob's cluster goes at once (its
    RayJob and submitter Job, holding the driver log, stay), a RayJob that never starts running
    fails after 30 min, and every stage job fails after 3 days."""
    cfg = parse_config("model: {name_or_path: m}\ndata: {beir: /data/scifact}\n", "defaults.yaml", dict(S3))
    assert (cfg.cluster.ray_cluster_ttl_seconds, cfg.cluster.pending_deadline_seconds) == (0, 1800)
    jobs = _jobs(cfg)
    rayjobs = [j for j in jobs if j["kind"] == "RayJob"]
    assert rayjobs and all(
        (j["spec"]["shutdownAfterJobFinishes"], j["spec"]["ttlSecondsAfterFinished"], j["spec"]["preRunningDeadlineSeconds"],
         j["spec"]["activeDeadlineSeconds"]) == (True, 0, 1800, 259200) and "deletionStrategy" not in j["spec"]
        for j in rayjobs)
    deadlines = {j["kind"]: j["spec"].get("activeDeadlineSeconds") or j["spec"]["runPolicy"]["activeDeadlineSeconds"]
                 for j in jobs if j["kind"] != "RayJob"}
    assert deadlines == {"TrainJob": 259200, "PyTorchJob": 259200}
    assert [v for j in jobs if (v := violations(j))] == []
    unlimited = parse_config("model: {name_or_path: m}\ndata: {beir: /d}\ncluster: {pending_deadline_seconds: null, "
                             "active_deadline_seconds: null}\n", "x.yaml", dict(S3))
    assert not any({"preRunningDeadlineSeconds", "activeDeadlineSeconds"} & set(j["spec"]) for j in _jobs(unlimited))


@pytest.mark.parametrize("beir", ["s3://my-team-peg/datasets/msmarco", "gs://bucket/scifact", "https://example.org/x"])
def test_a_url_as_data_beir_is_refused_at_render_time(beir):
    """Issue 35 finding 7: `prepare` reads data.beir on the machine it runs on; a URL is refused
    before any job is created, naming the key and what to use."""
    from peg.k8s.render import RenderError, check_renderable

    cfg = parse_config("model: {name_or_path: m}\n", "x.yaml", {**S3, "data.beir": beir})
    with pytest.raises(RenderError, match=r"data.beir: .* is a URL, .*beir:NAME"):
        check_renderable(cfg)
    check_renderable(parse_config("model: {name_or_path: m}\n", "x.yaml", {**S3, "data.beir": "beir:fiqa"}))


def _pod_specs(job: dict) -> list[dict]:
    if job["kind"] == "RayJob":
        c = job["spec"]["rayClusterSpec"]
        return [c["headGroupSpec"]["template"]["spec"], *(g["template"]["spec"] for g in c["workerGroupSpecs"]),
                job["spec"]["submitterPodTemplate"]["spec"]]
    if job["kind"] == "PyTorchJob":
        return [r["template"]["spec"] for r in job["spec"]["pytorchReplicaSpecs"].values()]
    return [_patch_node(job)["template"]["spec"]["template"]["spec"]]


def _kueue_suspended(job: dict) -> dict:
    """The job as Kueue's webhook leaves it on create: suspended until the queue admits it."""
    out = copy.deepcopy(job)
    (out["spec"]["runPolicy"] if job["kind"] == "PyTorchJob" else out["spec"])["suspend"] = True
    return out


def test_platform_settings_reach_every_job_and_pod():
    """Issue 35, what platform teams expect: cluster.queue puts Kueue's queue-name label on every
    job (and the jobs Kueue suspends on create pass the controllers' rules: a suspended RayJob
    needs shutdownAfterJobFinishes), image pull secrets and a /tmp size limit on every pod, extra
    environment on every container that runs peg."""
    from k8s_validation import validate_custom

    cfg = parse_config("model: {name_or_path: m}\ndata: {beir: /data/scifact}\n", "x.yaml", {
        **S3, "cluster.queue": "team-gpu", "cluster.image_pull_secrets": ["registry-creds"],
        "cluster.env": {"HTTPS_PROXY": "http://proxy:3128", "NCCL_DEBUG": "WARN"}, "cluster.scratch_size": "20Gi"})
    jobs = _jobs(cfg)
    assert {j["kind"] for j in jobs} == {"RayJob", "TrainJob", "PyTorchJob"}
    for job in jobs:
        assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-gpu"
        for pod in _pod_specs(job):
            assert pod["imagePullSecrets"] == [{"name": "registry-creds"}]
            assert {"name": "scratch", "emptyDir": {"sizeLimit": "20Gi"}} in pod["volumes"]
            assert "kueue.x-k8s.io/queue-name" not in str(pod)
        env_lists = [job["spec"]["trainer"]["env"]] if job["kind"] == "TrainJob" else [
            c["env"] for pod in _pod_specs(job) for c in pod["containers"]]
        assert all({"name": "NCCL_DEBUG", "value": "WARN"} in env for env in env_lists)
        suspended = _kueue_suspended(job)
        assert violations(suspended) == [] and validate_custom(suspended) == [], job["kind"]
        assert job_phase({**suspended, "status": {"jobDeploymentStatus": "Suspended"} if job["kind"] == "RayJob" else
                          {"conditions": [{"type": "Suspended", "status": "True"}]}}) == "pending"
    plain = [j for j in _jobs(parse_config("model: {name_or_path: m}\ndata: {beir: /d}\n", "x.yaml", dict(S3)))]
    assert not any("kueue.x-k8s.io/queue-name" in j["metadata"]["labels"] or "imagePullSecrets" in str(j) for j in plain)


def test_extra_environment_may_not_override_peg_or_torchrun():
    from peg.k8s.render import RenderError, check_renderable

    cfg = parse_config("model: {name_or_path: m}\n", "x.yaml", {**S3, "cluster.env": {"PET_NNODES": "4", "HOME": "/"}})
    with pytest.raises(RenderError, match="cluster.env: HOME, PET_NNODES are set by peg or by the trainer"):
        check_renderable(cfg)
