"""The real kopf operator against an in-process Kubernetes API emulator (kmock) over HTTP.

An EmbeddingPipeline is created through the official kubernetes client; the operator creates the
stage jobs with the real renderers; the test plays the job controllers (patches a job's status
to succeeded) and the stage pods (writes the stage record into a real S3 store on 127.0.0.1);
the pipeline ends Succeeded with its metrics and report URI in the status. The controller is
stopped and started again in the middle: it continues without creating any job twice.

What the emulator does not model (tested elsewhere or not at all): schema validation, pruning
and defaulting (the CRD is validated offline in test_operator_crd.py; the test creates each
pipeline as the API server would store it, `k8s_validation.as_stored`), garbage collection by
owner references (asserted here only as the references the jobs carry), uid / generation /
resourceVersion / creationTimestamp (the test sets them), label selectors on the server side
(kopf filters labels itself), RBAC (test_operator_rbac.py compares the calls below with the
chart's rules), and the real job controllers (KubeRay, Kubeflow Trainer): the kind e2e covers them.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections import Counter

import pytest

os.environ["PEG_OPERATOR_INTERVAL"] = "0.3"  # before the handlers module reads it

kopf = pytest.importorskip("kopf")
kmock = pytest.importorskip("kmock")

import prometheus_client as prom  # noqa: E402
from k8s_validation import as_stored  # noqa: E402
from kmock_cluster import Cluster, as_test_client, emulated_cluster, job_status, write_job_status  # noqa: E402
from s3server import ADMIN  # noqa: E402

from peg.config import RunConfig, StoreConfig  # noqa: E402
from peg.operator import handlers  # noqa: E402, F401  (importing registers the handlers)
from peg.k8s.vocabulary import JOB_KINDS, PIPELINE  # noqa: E402
from peg.operator.api import API_CALLS  # noqa: E402
from peg.operator.reconcile import Child, StoreState, claim_keys  # noqa: E402
from peg.pipeline import STAGES, stage_hashes  # noqa: E402
from peg.pipeline.state import StageRecord, read_record, write_record  # noqa: E402
from peg.store import open_store  # noqa: E402

pytestmark = pytest.mark.timeout(120)

GROUP, VERSION, KIND, PLURAL = PIPELINE.group, PIPELINE.version, PIPELINE.kind, PIPELINE.plural
NAMESPACE = "team"
SUMMARY = {"split": "test", "metrics": {"base": {"ndcg@10": 0.645}, "fine-tuned": {"ndcg@10": 0.702}}}


@pytest.fixture
def bucket(s3_server, monkeypatch):
    name = f"op-{uuid.uuid4().hex[:8]}"
    s3_server.client().make_bucket(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ADMIN[0])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", ADMIN[1])
    return name


def run_config(s3_server, bucket: str) -> dict:
    return {
        "name": "demo",
        "model": {"name_or_path": "sentence-transformers/all-MiniLM-L6-v2"},
        "data": {"beir": "/data/scifact"},
        "store": {"uri": f"s3://{bucket}/peg", "endpoint": s3_server.endpoint, "secure": False},
        "cluster": {"namespace": NAMESPACE, "s3_secret": "peg-s3", "image": "peg-trainer:0.1.0-cpu",
                    "ray_image": "peg-ray:0.1.0-cpu"},
    }


def metric(name: str, **labels) -> float:
    return prom.REGISTRY.get_sample_value(name, labels) or 0.0


@kopf.on.login()
def login_to_emulator(**kwargs):
    """kopf reads the kubeconfig path only at import time; the test's kubeconfig comes later."""
    return kopf.login_with_kubeconfig(**kwargs)


def finish_stage(store, config: RunConfig, stage: str) -> None:
    """What a stage's pod leaves behind: its outputs and a complete record for its hash, naming
    the digests of the upstream records it read (as peg.pipeline.runner._run_stage writes it)."""
    if stage == "eval":
        store.put_bytes("demo/eval/summary.json", json.dumps(SUMMARY).encode(), "eval", "h")
    hashes = stage_hashes(config)
    needs = next(s.needs for s in STAGES if s.name == stage)
    inputs = {n: read_record(store, f"demo/{n}").digest() for n in needs if n in hashes}
    write_record(store, f"demo/{stage}", StageRecord(stage, hashes[stage], "complete", {}, inputs))


async def succeed(cluster: Cluster, plural: str, job: dict) -> None:
    """Play the job controller: the job's status says it succeeded."""
    await write_job_status(plural, job, job_status(job["kind"], succeeded=True))


def test_operator_runs_a_pipeline_through_a_restart(s3_server, bucket, tmp_path, monkeypatch):
    spec = {"run": run_config(s3_server, bucket), "retries": {"limit": 1, "backoffSeconds": 1}}
    config = RunConfig.model_validate(spec["run"])
    store = open_store(StoreConfig.model_validate(spec["run"]["store"]))
    finish_stage(store, config, "prepare")  # `peg pipeline stage prepare` ran where the data is
    uid = str(uuid.uuid4())

    async def main():
        async with emulated_cluster(tmp_path, monkeypatch) as cluster:

            stop = asyncio.Event()
            operator = asyncio.create_task(kopf.operator(clusterwide=True, standalone=True, stop_flag=stop))
            body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "spec": spec,
                    "metadata": {"name": "demo", "namespace": NAMESPACE, "uid": uid, "generation": 1, "resourceVersion": "1",
                                 "creationTimestamp": "2026-11-30T12:00:00Z"}}
            await asyncio.to_thread(as_test_client().create_namespaced_custom_object,
                                    GROUP, VERSION, NAMESPACE, PLURAL, as_stored(body))

            plural, encode = await cluster.wait(lambda: cluster.job("encode"))
            assert plural == "rayjobs" and encode["metadata"]["name"] == "demo-encode"
            assert encode["metadata"]["ownerReferences"] == [
                {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "name": "demo", "uid": uid,
                 "controller": True, "blockOwnerDeletion": True}]
            config_map = cluster.objects("configmaps")["demo-config"]
            assert config_map["metadata"]["ownerReferences"][0]["uid"] == uid
            status = await cluster.wait(lambda: cluster.pipeline().get("status", {}).get("stage") == "encode"
                                        and cluster.pipeline()["status"])
            assert status["phase"] == "Running"

            for stage in ("encode", "mine"):
                plural, job = cluster.job(stage)
                finish_stage(store, config, stage)
                await succeed(cluster, plural, job)
                nxt = {"encode": "mine", "mine": "train"}[stage]
                await cluster.wait(lambda nxt=nxt: cluster.job(nxt))

            # restart the controller while train runs: it must continue, not start train again
            started = ("StageStarted", "stage train: created TrainJob demo-train (attempt 1/2)")
            await cluster.wait(lambda: started in cluster.events())  # kopf drops events queued at exit
            stop.set()
            await asyncio.wait_for(operator, 30)
            assert cluster.creates()["demo-train"] == 1
            stop = asyncio.Event()
            operator = asyncio.create_task(kopf.operator(clusterwide=True, standalone=True, stop_flag=stop))
            await asyncio.sleep(1.5)  # several reconcile intervals of the new controller
            assert cluster.creates()["demo-train"] == 1
            assert cluster.pipeline()["status"]["stage"] == "train"

            for stage, nxt in (("train", "eval"), ("eval", "export"), ("export", "report"), ("report", None)):
                plural, job = cluster.job(stage)
                finish_stage(store, config, stage)
                await succeed(cluster, plural, job)
                if nxt:
                    await cluster.wait(lambda nxt=nxt: cluster.job(nxt))
            status = await cluster.wait(lambda: cluster.pipeline().get("status", {}).get("phase") == "Succeeded"
                                        and cluster.pipeline()["status"])
            await cluster.wait(lambda: "PipelineSucceeded" in dict(cluster.events()))
            await cluster.wait(lambda: metric("peg_operator_pipelines", phase="Succeeded") == 1)  # a tick later
            assert cluster.pipeline()["metadata"]["finalizers"] == ["peg.dev/operator"]
            # deleting the pipeline: the operator stops its timer and releases its finalizer
            await asyncio.to_thread(as_test_client().delete_namespaced_custom_object, GROUP, VERSION, NAMESPACE, PLURAL, "demo")
            await cluster.wait(lambda: "demo" not in cluster.objects(PLURAL))
            stop.set()
            await asyncio.wait_for(operator, 30)

            assert cluster.creates() == Counter({f"demo-{s}": 1 for s in ("encode", "mine", "train", "eval", "export", "report")})
            assert cluster.job("train")[0] == "trainjobs"
            assert {x["name"]: x["attempts"] for x in status["stages"]} == {"prepare": 0, **{s: 1 for s in
                    ("encode", "mine", "train", "eval", "export", "report")}}  # fmt: skip
            assert not [e for e in cluster.events() if e[0] in ("JobMissing", "StageFailed")]
            assert status["metrics"]["ndcgAt10"] == 0.702 and status["metrics"]["baseNdcgAt10"] == 0.645
            assert status["artifacts"]["report"] == f"s3://{bucket}/peg/demo/report/report.html"
            assert [c["status"] for c in status["conditions"]] == ["True", "False", "False"]
            reasons = Counter(reason for reason, _ in cluster.events())
            assert reasons["StageStarted"] == 6 and reasons["StageSucceeded"] == 7 and reasons["PipelineSucceeded"] == 1
            # every call is declared (so the chart's RBAC grants it); the declared ones this run never
            # needed are deleting jobs (no retry here), creating PyTorchJobs (trainer_api: trainjob) and
            # updating finalizers (only authorized, for blockOwnerDeletion: the emulator enforces nothing)
            assert metric("peg_operator_actions_total", action="create") >= 6
            assert metric("peg_operator_transitions_total", reason="StageSucceeded") >= 7
            declared = {(g, r, v) for g, r, verbs in API_CALLS for v in verbs}
            assert cluster.calls() <= declared, cluster.calls() - declared
            unused = {(k.group, k.plural, "delete") for k in JOB_KINDS} | {("kubeflow.org", "pytorchjobs", "create"),
                                                                        (GROUP, f"{PLURAL}/finalizers", "update"),
                                                                        ("", "pods/log", "get")}  # no pods here
            assert declared - cluster.calls() == unused

    asyncio.run(main())


def test_observe_store_reports_the_older_claimant_and_an_unreachable_store():
    run = {"name": "demo", "model": {"name_or_path": "m"},
           "store": {"uri": "s3://bucket/peg", "endpoint": "127.0.0.1:9", "secure": False, "max_attempts": 1,
                     "connect_timeout": 0.5}}  # fmt: skip
    config = RunConfig.model_validate(run)
    claims = {key: [("2026-11-30T10:00:00Z", "a/first"), ("2026-11-30T11:00:00Z", "b/second")]
              for key in claim_keys("a", config)[:1]}  # fmt: skip
    assert handlers.observe_store({"run": run}, "b", "second", claims).claimed_by == "a/first (" + claim_keys("b", config)[0] + ")"
    unreachable = handlers.observe_store({"run": run}, "a", "first", claims)
    assert unreachable.claimed_by is None and unreachable.error
    assert handlers.observe_store({"run": {"name": "demo"}}, "a", "first", {}) == StoreState()  # invalid: reconcile says why


def test_job_observation_reads_stage_hash_and_phase():
    body = kopf.Body({"apiVersion": "ray.io/v1", "kind": "RayJob",
                      "metadata": {"name": "demo-mine", "labels": {"peg.dev/stage": "mine", "peg.dev/stage-hash": "abc"},
                                   "deletionTimestamp": "2026-11-30T12:00:00Z"},
                      "status": {"jobDeploymentStatus": "Failed", "message": "OOMKilled"}})  # fmt: skip
    assert handlers.job_observation(body) == Child("ray.io/v1", "RayJob", "demo-mine", "mine", "abc", "failed", True, "OOMKilled")


DENIAL = 'admission webhook "validate.trainer.kubeflow.org" denied the request: spec.runtimePatches: Invalid value'


def test_a_lasting_refusal_is_a_condition_and_an_event_in_the_same_reconcile(monkeypatch):
    """Issue 35 finding 4: the handler turns a refused create into the Failed condition and an
    event at once (before: the exception went to kopf, which retried with nothing reported)."""
    import logging

    from peg.operator.api import Rejected, describe

    run = {"name": "demo", "model": {"name_or_path": "m"}, "data": {"beir": "/data/scifact"},
           "store": {"uri": "s3://b/peg", "endpoint": "s3:9000"}, "cluster": {"namespace": NAMESPACE, "s3_secret": "s3"}}
    body = kopf.Body({"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "spec": {"run": run},
                      "metadata": {"name": "demo", "namespace": NAMESPACE, "uid": "u1", "generation": 3}, "status": {}})
    asked = []

    def refuse(action, namespace):
        asked.append(describe(action, namespace))
        raise Rejected(asked[-1], 422, DENIAL)

    posted = []
    monkeypatch.setattr(handlers, "observe_store", lambda *a: StoreState(stages={"prepare": "complete"}))
    monkeypatch.setattr(handlers.api, "apply_action", refuse)
    monkeypatch.setattr(handlers.kopf, "event", lambda obj, **kw: posted.append((kw["type"], kw["reason"], kw["message"])))
    patch = kopf.Patch()
    indexes = {"pipeline_phases": {}, **{k.plural: {} for k in JOB_KINDS}}
    handlers._reconcile(body, body.spec, body.metadata, body.status, NAMESPACE, "demo", patch, logging.getLogger("t"), {}, indexes)
    assert asked == [f"apply ConfigMap {NAMESPACE}/demo-config"]
    assert [(t, r) for t, r, _ in posted] == [("Warning", "ApiRejected"), ("Warning", "PipelineFailed")]
    status = patch["status"]
    assert status["phase"] == "Failed" and status["rejected"]["code"] == 422 and status["rejected"]["generation"] == 3
    assert DENIAL in next(c["message"] for c in status["conditions"] if c["type"] == "Failed")


@pytest.mark.parametrize(("code", "lasting"), [(422, True), (400, True), (403, True), (404, True), (429, False), (500, False)])
def test_apply_action_tells_lasting_refusals_from_passing_errors(monkeypatch, code, lasting):
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    from peg.operator.api import Rejected, apply_action
    from peg.operator.reconcile import Create

    def create(self, *args):
        e = ApiException(status=code, reason="Unprocessable Entity")
        e.body = json.dumps({"kind": "Status", "message": DENIAL})
        raise e

    monkeypatch.setattr(client.CustomObjectsApi, "create_namespaced_custom_object", create)
    monkeypatch.setattr(client.CustomObjectsApi, "__init__", lambda self, *a: None)
    job = {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": "demo-encode"}}
    with pytest.raises(Rejected if lasting else ApiException) as err:
        apply_action(Create(job), NAMESPACE)
    if lasting:
        assert (err.value.request, err.value.code, err.value.message) == (f"create RayJob {NAMESPACE}/demo-encode", code, DENIAL)


async def operate_on_a_new_pipeline(spec: dict) -> tuple[asyncio.Event, asyncio.Task]:
    """Start the operator and create the EmbeddingPipeline `demo` with `spec`: (its stop flag, its task)."""
    stop = asyncio.Event()
    operator = asyncio.create_task(kopf.operator(clusterwide=True, standalone=True, stop_flag=stop))
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "spec": spec,
            "metadata": {"name": "demo", "namespace": NAMESPACE, "uid": str(uuid.uuid4()), "generation": 1,
                         "resourceVersion": "1", "creationTimestamp": "2026-11-30T12:00:00Z"}}
    await asyncio.to_thread(as_test_client().create_namespaced_custom_object,
                            GROUP, VERSION, NAMESPACE, PLURAL, as_stored(body))
    return stop, operator


def test_operator_keeps_a_finished_stages_log_in_the_store(s3_server, bucket, tmp_path, monkeypatch):
    """Issue 35: as `peg pipeline run --backend k8s` does, the operator copies the main pod log of
    each finished stage job (a RayJob's submitter, `job-name=<job>`) to `<run>/logs/<stage>.log`."""
    from kubernetes import client

    spec = {"run": run_config(s3_server, bucket)}
    config = RunConfig.model_validate(spec["run"])
    store = open_store(StoreConfig.model_validate(spec["run"]["store"]))
    finish_stage(store, config, "prepare")
    driver_log = "encoding 5183 passages\nencode: done\n"

    async def main():
        async with emulated_cluster(tmp_path, monkeypatch) as cluster:
            pods = kmock.resource("", "v1", "pods")
            cluster.k8s["get", pods, kmock.name("demo-encode-x7k2p"), kmock.subresource("log")] << kmock.body(driver_log.encode())
            stop, operator = await operate_on_a_new_pipeline(spec)
            plural, encode = await cluster.wait(lambda: cluster.job("encode"))
            core = client.CoreV1Api(as_test_client().api_client)
            submitter = {"apiVersion": "v1", "kind": "Pod", "metadata": {
                "name": "demo-encode-x7k2p", "namespace": NAMESPACE, "labels": {"job-name": "demo-encode"}}}
            await asyncio.to_thread(core.create_namespaced_pod, NAMESPACE, submitter)
            assert not store.exists("demo/logs/encode.log")
            finish_stage(store, config, "encode")
            await succeed(cluster, plural, encode)
            await cluster.wait(lambda: store.exists("demo/logs/encode.log"))
            assert store.get_bytes("demo/logs/encode.log").decode() == driver_log
            assert ("", "pods/log", "get") in cluster.calls()
            stop.set()
            await asyncio.wait_for(operator, 30)

    asyncio.run(main())


def test_operator_reports_a_denied_create_at_once_and_stops_asking(s3_server, bucket, tmp_path, monkeypatch):
    """Issue 35 finding 4, end to end: the API server (an admission webhook) denies the first
    stage job; the pipeline shows Failed / ApiRejected with the webhook's message and an event,
    and the operator does not send the same create again (before: kopf retried it forever with
    the pipeline Running)."""
    spec = {"run": run_config(s3_server, bucket)}
    config = RunConfig.model_validate(spec["run"])
    finish_stage(open_store(StoreConfig.model_validate(spec["run"]["store"])), config, "prepare")
    denial = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Invalid", "code": 422,
              "message": 'admission webhook "vrayjob.kb.io" denied the request: RayJob name is too long'}

    async def main():
        async with emulated_cluster(tmp_path, monkeypatch) as cluster:
            cluster.k8s["post", kmock.resource("ray.io", "v1", "rayjobs")] << kmock.Response(status=422, payload=denial)
            stop, operator = await operate_on_a_new_pipeline(spec)
            status = await cluster.wait(lambda: cluster.pipeline().get("status", {}).get("phase") == "Failed"
                                        and cluster.pipeline()["status"])
            failed = next(c for c in status["conditions"] if c["type"] == "Failed")
            assert failed["reason"] == "ApiRejected" and denial["message"] in failed["message"]
            assert status["rejected"]["code"] == 422 and status["rejected"]["request"] == f"create RayJob {NAMESPACE}/demo-encode"
            await cluster.wait(lambda: "ApiRejected" in dict(cluster.events()))
            await asyncio.sleep(1.5)  # several reconcile intervals: the same create is not sent again
            assert cluster.creates()["demo-encode"] == 1
            stop.set()
            await asyncio.wait_for(operator, 30)

    asyncio.run(main())


@pytest.mark.parametrize("owner_uid", ["u1", "someone-else", None])
def test_the_run_config_map_is_patched_only_when_it_is_this_pipelines(monkeypatch, owner_uid):
    """Issue 35 finding 8: RBAC cannot narrow ConfigMap writes to peg's own, so the operator
    patches an existing `<run>-config` only when this pipeline owns it."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    from peg.operator.api import Rejected, apply_action
    from peg.operator.reconcile import Apply

    patched = []
    refs = [client.V1OwnerReference(api_version="peg.dev/v1alpha1", kind=KIND, name="demo", uid=owner_uid)] if owner_uid else None
    existing = client.V1ConfigMap(metadata=client.V1ObjectMeta(name="demo-config", owner_references=refs))

    def create(self, ns, body):
        raise ApiException(status=409, reason="AlreadyExists")

    monkeypatch.setattr(client.CoreV1Api, "__init__", lambda self, *a: None)
    monkeypatch.setattr(client.CoreV1Api, "create_namespaced_config_map", create)
    monkeypatch.setattr(client.CoreV1Api, "read_namespaced_config_map", lambda self, name, ns: existing)
    monkeypatch.setattr(client.CoreV1Api, "patch_namespaced_config_map", lambda self, name, ns, body: patched.append(name))
    ours = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "demo-config", "ownerReferences": [
        {"apiVersion": "peg.dev/v1alpha1", "kind": KIND, "name": "demo", "uid": "u1"}]}, "data": {}}
    if owner_uid == "u1":
        apply_action(Apply(ours), NAMESPACE)
        assert patched == ["demo-config"]
    else:
        with pytest.raises(Rejected, match="not this pipeline's") as err:
            apply_action(Apply(ours), NAMESPACE)
        assert err.value.code == 409 and patched == []


def test_operator_leaves_a_retrying_or_suspended_job_alone(s3_server, bucket, tmp_path, monkeypatch):
    """Issue 35 finding 3, end to end: KubeRay's `Retrying` (jobStatus FAILED) and Kueue's
    `Suspended` are no failure: the operator neither deletes the RayJob nor counts an attempt."""
    spec = {"run": run_config(s3_server, bucket)}
    config = RunConfig.model_validate(spec["run"])
    finish_stage(open_store(StoreConfig.model_validate(spec["run"]["store"])), config, "prepare")

    async def main():
        async with emulated_cluster(tmp_path, monkeypatch) as cluster:
            stop, operator = await operate_on_a_new_pipeline(spec)
            await cluster.wait(lambda: cluster.job("encode"))
            for status in ({"jobDeploymentStatus": "Retrying", "jobStatus": "FAILED", "failed": 1},
                           {"jobDeploymentStatus": "Suspended"}):
                await asyncio.to_thread(as_test_client().patch_namespaced_custom_object_status,
                                        "ray.io", "v1", NAMESPACE, "rayjobs", "demo-encode", {"status": status})
                await asyncio.sleep(1.5)  # several reconcile intervals
                assert not [r for r in cluster.k8s if r.method == "DELETE"]
                encode = next(s for s in cluster.pipeline()["status"]["stages"] if s["name"] == "encode")
                assert (encode["phase"], encode["attempts"]) == ("Running", 1), encode
            assert cluster.creates()["demo-encode"] == 1
            stop.set()
            await asyncio.wait_for(operator, 30)

    asyncio.run(main())
