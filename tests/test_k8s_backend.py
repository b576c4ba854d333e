"""The cluster backend's control flow against an in-memory Kubernetes API (no cluster here):
create, follow to the end, reuse a running job of the same stage hash, replace a stale one.
The fake API denies a create the controllers' admission rules refuse (tests/controller_rules.py),
with the 422 a webhook's denial comes back as."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from controller_rules import violations
from kubernetes.client.exceptions import ApiException

from peg.config import load_config
from peg.k8s.backend import K8sBackend
from peg.k8s.client import ClusterError
from peg.k8s.vocabulary import JOB_KINDS, LABEL_HASH, PYTORCHJOB, RAYJOB, TRAINJOB, job_kind, primary_pod_selector
from peg.pipeline import STAGES, StageFailed

REPO = Path(__file__).resolve().parents[1]


class FakeCustomObjects:
    """CustomObjectsApi over a dict; each get of a job advances it along its scripted statuses."""

    def __init__(self, statuses: list[dict]):
        self.objects: dict[tuple, dict] = {}
        self.statuses = statuses
        self.calls: list[str] = []

    def create_namespaced_custom_object(self, group, version, ns, plural, body):
        key = (plural, ns, body["metadata"]["name"])
        if key in self.objects:
            raise ApiException(status=409)
        if denied := violations(body):
            raise ApiException(status=422, reason=f"admission webhook denied the request: {denied}")
        self.calls.append(f"create {plural}/{key[2]}")
        self.objects[key] = {**copy.deepcopy(body), "_gets": 0}

    def get_namespaced_custom_object(self, group, version, ns, plural, name):
        obj = self.objects.get((plural, ns, name))
        if obj is None:
            raise ApiException(status=404)
        if obj.get("_scripted", True):
            obj["status"] = self.statuses[min(obj["_gets"], len(self.statuses) - 1)]
            obj["_gets"] += 1
            if obj["status"] is GONE:  # KubeRay deleted it (DELETE_RAYJOB_CR_AFTER_JOB_FINISHES=true)
                del self.objects[(plural, ns, name)]
                raise ApiException(status=404)
        return copy.deepcopy(obj)

    def delete_namespaced_custom_object(self, group, version, ns, plural, name, propagation_policy=None):
        self.calls.append(f"delete {plural}/{name}")
        del self.objects[(plural, ns, name)]


class FakeCore:
    def __init__(self):
        self.config_maps: dict[str, dict] = {}

    def create_namespaced_config_map(self, ns, body):
        if body["metadata"]["name"] in self.config_maps:
            raise ApiException(status=409)
        self.config_maps[body["metadata"]["name"]] = body

    def read_namespaced_config_map(self, name, ns):
        from kubernetes.client import V1ConfigMap, V1ObjectMeta

        return V1ConfigMap(metadata=V1ObjectMeta(name=name, labels=self.config_maps[name]["metadata"].get("labels")))

    def replace_namespaced_config_map(self, name, ns, body):
        self.config_maps[name] = body

    def list_namespaced_pod(self, ns, label_selector):
        return type("PodList", (), {"items": []})()


GONE = {"deleted": True}  # scripted: the get that reaches it finds the object deleted (404)
RUNNING = {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}
DONE = {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}
FAILED = {"jobDeploymentStatus": "Complete", "jobStatus": "FAILED"}


def backend(statuses: list[dict]) -> tuple[K8sBackend, FakeCustomObjects, FakeCore, list[str]]:
    config = load_config(REPO / "examples" / "k8s-quickstart.yaml")
    custom, core, lines = FakeCustomObjects(statuses), FakeCore(), []
    return K8sBackend(config, apis=(custom, core), log=lines.append, poll_seconds=0), custom, core, lines


def test_submit_creates_config_map_and_job_and_follows_it_to_success():
    k8s, custom, core, lines = backend([{}, RUNNING, RUNNING, DONE])
    assert k8s.submit("encode") == "succeeded"
    assert custom.calls == ["create rayjobs/quickstart-encode"]
    assert "run.yaml" in core.config_maps["quickstart-config"]["data"]
    assert [line for line in lines if ": " in line and line.startswith("[k8s] RayJob")] == [
        "[k8s] RayJob peg/quickstart-encode: pending",
        "[k8s] RayJob peg/quickstart-encode: running",
        "[k8s] RayJob peg/quickstart-encode: succeeded",
    ]
    k8s.submit("mine")  # a second stage updates the ConfigMap in place
    assert custom.calls[-1] == "create rayjobs/quickstart-mine"


@pytest.mark.parametrize("labels", [None, {"app": "billing"}, {"peg.dev/run": "another-run"}])
def test_a_config_map_of_the_runs_name_that_is_not_the_runs_is_never_overwritten(labels):
    k8s, custom, core, _ = backend([DONE])
    theirs = {"metadata": {"name": "quickstart-config", "labels": labels}, "data": {"settings": "keep me"}}
    core.config_maps["quickstart-config"] = copy.deepcopy(theirs)
    with pytest.raises(ClusterError, match="ConfigMap peg/quickstart-config exists and is not this run's "
                                           r"\(no label peg.dev/run=quickstart\)"):
        k8s.submit("encode")
    assert core.config_maps["quickstart-config"] == theirs and custom.calls == []


@pytest.mark.parametrize(("statuses", "record", "outcome"), [
    ([RUNNING, GONE], "complete", "succeeded"),  # finished and deleted between two polls
    ([GONE], "complete", "succeeded"),  # ... before the first poll
    ([RUNNING, GONE], "partial", "failed"),
    ([{}, GONE], "pending", "failed"),
])
def test_a_rayjob_kuberay_deleted_after_it_finished_ends_as_the_stores_record_says(monkeypatch, tmp_path, statuses,
                                                                                    record, outcome):
    """KubeRay v1.7.0 with DELETE_RAYJOB_CR_AFTER_JOB_FINISHES=true and ttlSecondsAfterFinished 0
    deletes a finished RayJob at once (rayjob_controller.go, handleShutdownAfterJobFinishes): the
    404 that follows is "it ended; the store's record says how", never a lost job or a crash."""
    from peg.config import StoreConfig
    from peg.k8s import backend as backend_module
    from peg.pipeline.runner import StageStatus
    from peg.store import open_store

    monkeypatch.setattr(backend_module, "pipeline_status", lambda config, store: [StageStatus("mine", record, 1)])
    config = load_config(REPO / "examples" / "k8s-quickstart.yaml")
    custom, lines = FakeCustomObjects(statuses), []
    store = open_store(StoreConfig(uri=str(tmp_path / "store")))
    k8s = K8sBackend(config, apis=(custom, FakeCore()), log=lines.append, poll_seconds=0, store=store)
    if outcome == "succeeded":
        assert k8s.submit("mine") == "succeeded"
    else:
        with pytest.raises(StageFailed, match="stage mine: RayJob quickstart-mine failed"):
            k8s.submit("mine")
    assert f"the store's record of stage mine is {record}: {outcome}" in lines[-1]
    assert "DELETE_RAYJOB_CR_AFTER_JOB_FINISHES=true" in lines[-1]


def test_failed_job_fails_the_stage():
    k8s, _, _, _ = backend([RUNNING, FAILED])
    with pytest.raises(StageFailed, match="stage mine: RayJob quickstart-mine failed"):
        k8s.submit("mine")


def test_running_job_of_same_hash_is_followed_not_recreated():
    k8s, custom, _, lines = backend([RUNNING, DONE])
    k8s.submit("encode", wait=False)
    custom.objects[("rayjobs", "peg", "quickstart-encode")]["_gets"] = 0
    assert k8s.submit("encode") == "succeeded"
    assert custom.calls == ["create rayjobs/quickstart-encode"]
    assert any("already running: following it" in line for line in lines)


def test_job_of_another_config_or_finished_is_replaced():
    k8s, custom, _, lines = backend([RUNNING, DONE])
    k8s.submit("encode", wait=False)
    custom.objects[("rayjobs", "peg", "quickstart-encode")]["metadata"]["labels"][LABEL_HASH] = "0" * 32
    k8s.submit("encode")
    assert custom.calls == ["create rayjobs/quickstart-encode", "delete rayjobs/quickstart-encode", "create rayjobs/quickstart-encode"]
    assert any("another config" in line for line in lines)


def test_prepare_runs_here_and_train_as_trainjob(monkeypatch):
    k8s, custom, _, _ = backend([{"conditions": [{"type": "Complete", "status": "True"}]}])
    ran = []
    monkeypatch.setattr("peg.pipeline.LocalBackend.run_stage", lambda self, stage, path, env: ran.append(stage.name))
    stages = {s.name: s for s in STAGES}
    k8s.run_stage(stages["prepare"], Path("cfg.yaml"), {"PEG_RUN_LEASE": "owner-1"})
    k8s.run_stage(stages["train"], Path("cfg.yaml"), {"PEG_RUN_LEASE": "owner-1"})
    assert ran == ["prepare"] and custom.calls == ["create trainjobs/quickstart-train"]
    job = custom.objects[("trainjobs", "peg", "quickstart-train")]
    assert {"name": "PEG_RUN_LEASE", "value": "owner-1"} in job["spec"]["trainer"]["env"]


@pytest.mark.parametrize("trainer_api", ["trainjob", "pytorchjob"])
def test_run_lease_reaches_every_peg_container_in_a_shape_the_controllers_accept(trainer_api):
    """Issue 35 finding 1: the lease on the runtime patch's `node` container made Trainer v2.3.0
    reject the TrainJob; it goes into `spec.trainer.env` (TrainJob) or each container (PyTorchJob)."""
    k8s, custom, _, _ = backend([{"conditions": [{"type": "Succeeded", "status": "True"},
                                                 {"type": "Complete", "status": "True"}]}])
    k8s.config.cluster.trainer_api = trainer_api
    k8s.submit("train", env={"PEG_RUN_LEASE": "owner-1"})
    (job,) = custom.objects.values()
    assert violations(job) == []
    lease = {"name": "PEG_RUN_LEASE", "value": "owner-1"}
    if trainer_api == "trainjob":
        assert lease in job["spec"]["trainer"]["env"]
    else:
        containers = [c for r in job["spec"]["pytorchReplicaSpecs"].values() for c in r["template"]["spec"]["containers"]]
        assert containers and all(lease in c["env"] for c in containers)


def test_primary_pod_selectors():
    def job(k):
        return {"apiVersion": k.api_version, "kind": k.kind, "metadata": {"name": "run-train"}}

    assert primary_pod_selector(job(RAYJOB)) == "job-name=run-train"
    assert "replica-type=master" in primary_pod_selector(job(PYTORCHJOB))
    assert "job-completion-index=0" in primary_pod_selector(job(TRAINJOB))


def test_every_rendered_job_is_a_declared_kind():
    """The renderers make only the kinds `peg.k8s.vocabulary` declares, and make each of them."""
    from peg.k8s.render import render_stage

    rendered = set()
    config = load_config(REPO / "examples" / "k8s-quickstart.yaml")
    for trainer_api in ("trainjob", "pytorchjob"):
        cfg = config.model_copy(update={"cluster": config.cluster.model_copy(update={"trainer_api": trainer_api})})
        for stage in ("encode", "train"):
            for obj in render_stage(cfg, stage):
                if obj["kind"] != "ConfigMap":
                    rendered.add(job_kind(obj["apiVersion"], obj["kind"]))
    assert rendered == set(JOB_KINDS)
    with pytest.raises(ValueError, match="not a stage job kind"):
        job_kind("batch/v1", "Job")


def test_a_stages_log_is_kept_in_the_store(monkeypatch, tmp_path):
    """Issue 35 finding 5: finished Ray clusters go at once, so the stage's main pod log (the
    submitter's, which tails the driver) is kept in the store when the stage ends."""
    from kubernetes import watch

    from peg.config import StoreConfig
    from peg.store import open_store

    class Pod:
        metadata = type("Meta", (), {"name": "quickstart-encode-x7k2p"})()

    class OnePod(FakeCore):
        def list_namespaced_pod(self, ns, label_selector):
            assert label_selector == "job-name=quickstart-encode"
            return type("PodList", (), {"items": [Pod()]})()

        def read_namespaced_pod_log(self, pod, ns):
            raise AssertionError("read through watch.Watch().stream")

    class Log:
        def stream(self, read, pod, ns):
            assert pod == "quickstart-encode-x7k2p"
            yield from ["encoding 5183 passages", "encode: done"]

    monkeypatch.setattr(watch, "Watch", Log)
    store = open_store(StoreConfig(uri=str(tmp_path / "store")))
    config = load_config(REPO / "examples" / "k8s-quickstart.yaml")
    custom, lines = FakeCustomObjects([RUNNING, DONE]), []
    k8s = K8sBackend(config, apis=(custom, OnePod()), log=lines.append, poll_seconds=0, store=store)
    assert k8s.submit("encode") == "succeeded"
    assert store.get_bytes("quickstart/logs/encode.log") == b"encoding 5183 passages\nencode: done\n"
    assert "encode: done" in lines
