"""Table-driven tests of the operator's pure reconcile function: every case the issue names."""

from __future__ import annotations

from datetime import datetime, timedelta, UTC

import pytest
from k8s_validation import as_stored

from peg.config import RunConfig
from peg.k8s.vocabulary import LABEL_HASH, LABEL_RUN, LABEL_STAGE
from peg.operator.reconcile import (
    JOB_VISIBLE_GRACE_SECONDS,
    Apply,
    Child,
    Create,
    Delete,
    Event,
    KeepLog,
    StoreState,
    claim_keys,
    claimed_by,
    reconcile,
    rejected,
)
from peg.pipeline import enabled_stages, stage_hashes

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
RUN = {"name": "demo", "model": {"name_or_path": "m"}, "data": {"beir": "/data/scifact"}, "store": {"uri": "s3://bucket/peg"}}
STAGES = ["prepare", "encode", "mine", "train", "eval", "export", "report"]


def spec(retries: int = 2, **sections) -> dict:
    """The spec of an EmbeddingPipeline as the operator reads it: pruned and defaulted by the API server."""
    run = {**RUN, **sections}
    doc = {"apiVersion": "peg.dev/v1alpha1", "kind": "EmbeddingPipeline", "metadata": {"name": "demo", "namespace": "team"},
           "spec": {"run": run, "retries": {"limit": retries, "backoffSeconds": 30, "maxBackoffSeconds": 600}}}
    return as_stored(doc)["spec"]


def config_of(s: dict) -> RunConfig:
    return RunConfig.model_validate(s["run"])


class FakeRenderer:
    """Stand-in for peg.k8s.render: one job per stage, labelled like the real ones; prepare runs locally."""

    @staticmethod
    def cluster_stages(config: RunConfig) -> list[str]:
        return [s.name for s in enabled_stages(config) if s.name != "prepare"]

    @staticmethod
    def render_stage(config: RunConfig, stage: str) -> list[dict]:
        if stage == "prepare":
            raise AssertionError("prepare is never rendered")
        api, kind = ("trainer.kubeflow.org/v1alpha1", "TrainJob") if stage == "train" else ("ray.io/v1", "RayJob")
        labels = {LABEL_RUN: config.name, LABEL_STAGE: stage, LABEL_HASH: stage_hashes(config)[stage][:16]}
        return [{"apiVersion": api, "kind": kind, "metadata": {"name": f"{config.name}-{stage}", "labels": labels}}]

    @staticmethod
    def render_config_map(config: RunConfig) -> dict:
        return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"{config.name}-config"}, "data": {}}


render = FakeRenderer.render_stage


def job(s: dict, stage: str, phase: str, deleting: bool = False, message: str = "") -> Child:
    obj = render(config_of(s), stage)[0]
    return Child(obj["apiVersion"], obj["kind"], obj["metadata"]["name"], stage, obj["metadata"]["labels"][LABEL_HASH],
                 phase, deleting, message)


def store(*complete: str, **other) -> StoreState:
    return StoreState(stages={s: "complete" for s in complete}, **other)


def run(s, children=(), st=None, status=None, now=NOW, **kw):
    return reconcile(s, 1, list(children), st or store(), status, now, renderer=FakeRenderer, **kw)


def stage_of(status: dict, name: str) -> dict:
    return next(x for x in status["stages"] if x["name"] == name)


def phases(status: dict) -> dict[str, str]:
    return {x["name"]: x["phase"] for x in status["stages"]}


def conditions(status: dict) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def kinds(actions) -> list[str]:
    out = []
    for a in actions:
        if isinstance(a, Event):
            out.append(f"event {a.type} {a.reason}")
        elif isinstance(a, (Create, Apply)):
            out.append(f"{type(a).__name__.lower()} {a.obj['kind']} {a.obj['metadata']['name']}")
        elif isinstance(a, KeepLog):
            out.append(f"keep log of {a.kind} {a.name} at {a.key}")
        else:
            out.append(f"delete {a.kind} {a.name}")
    return out


def running_at(stage: str, s=None) -> tuple[dict, dict]:
    """(spec, status) of a pipeline whose stages before `stage` succeeded and `stage` runs (attempt 1)."""
    s = s or spec()
    order = [x.name for x in enabled_stages(config_of(s))]
    before = order[: order.index(stage)]
    status = None
    for i in range(len(before) + 1):
        previous = [job(s, order[i - 1], "succeeded")] if i > 1 else []  # prepare has no job
        _, status = run(s, previous, store(*before[:i]), status)
    assert phases(status)[stage] == "Running"
    return s, status


def test_fresh_pipeline_waits_for_the_local_prepare_stage():
    actions, status = run(spec())
    assert kinds(actions) == ["event Normal WaitingForLocalStage"]
    assert status["phase"] == "Pending" and status["stage"] == "prepare" and status["observedGeneration"] == 1
    assert phases(status) == {n: "Pending" for n in STAGES}
    assert "run `peg pipeline stage prepare CONFIG` where the data is" in stage_of(status, "prepare")["message"]
    assert conditions(status) == {"Ready": ("False", "WaitingForLocalStage"),
                                  "Progressing": ("True", "WaitingForLocalStage"), "Failed": ("False", "WaitingForLocalStage")}
    assert run(spec(), status=status)[0] == []  # said once


def test_fresh_pipeline_with_prepared_data_creates_the_first_job_and_the_config_map():
    actions, status = run(spec(), st=store("prepare"))
    assert kinds(actions) == [
        "event Normal StageSucceeded",
        "apply ConfigMap demo-config",
        "create RayJob demo-encode",
        "event Normal StageStarted",
        "event Normal PipelineRunning",
    ]
    assert status["phase"] == "Running" and status["stage"] == "encode"
    assert phases(status) == {n: {"prepare": "Succeeded", "encode": "Running"}.get(n, "Pending") for n in STAGES}
    encode = stage_of(status, "encode")
    assert encode["attempts"] == 1 and encode["child"] == {"apiVersion": "ray.io/v1", "kind": "RayJob", "name": "demo-encode"}
    assert encode["hash"] == stage_hashes(config_of(spec()))["encode"]
    assert conditions(status) == {"Ready": ("False", "StageRunning"), "Progressing": ("True", "StageRunning"),
                                  "Failed": ("False", "StageRunning")}
    assert status["artifacts"] == {"storePrefix": "s3://bucket/peg/demo", "report": None, "model": None, "evalSummary": None}


def test_stage_running_changes_nothing():
    s, status = running_at("encode")
    actions, status = run(s, [job(s, "encode", "running")], store("prepare"), status)
    assert actions == [] and stage_of(status, "encode")["message"] == "job demo-encode is running (attempt 1/3)"
    actions, again = run(s, [job(s, "encode", "running")], store("prepare"), status, NOW + timedelta(minutes=5))
    assert actions == [] and again == status


@pytest.mark.parametrize("job_phase", ["pending", "running"])
def test_controller_restarted_after_create_before_status_adopts_the_job(job_phase):
    """The status write after a create was lost (crash): the observed job is adopted, never created twice."""
    s, status = running_at("mine")
    lost = {**status, "stages": [x if x["name"] != "mine" else {"name": "mine", "hash": x["hash"]} for x in status["stages"]]}
    actions, new = run(s, [job(s, "mine", job_phase)], store("prepare", "encode"), lost)
    assert not any(isinstance(a, Create) for a in actions)
    assert stage_of(new, "mine")["phase"] == "Running" and stage_of(new, "mine")["attempts"] == 1


def test_controller_restarted_mid_stage_with_status_continues():
    """A fresh controller sees the same status, job and store: it does nothing new, then moves on."""
    s, status = running_at("train")
    done = ["prepare", "encode", "mine"]
    assert run(s, [job(s, "train", "running")], store(*done), status)[0] == []
    actions, status = run(s, [job(s, "train", "succeeded")], store(*done, "train"), status)
    assert kinds(actions) == ["keep log of TrainJob demo-train at demo/logs/train.log", "event Normal StageSucceeded",
                              "apply ConfigMap demo-config", "create RayJob demo-eval",
                              "event Normal StageStarted"]


def test_stage_succeeded_starts_the_next_one():
    s, status = running_at("encode")
    actions, status = run(s, [job(s, "encode", "succeeded")], store("prepare", "encode"), status)
    assert kinds(actions) == ["keep log of RayJob demo-encode at demo/logs/encode.log", "event Normal StageSucceeded",
                              "apply ConfigMap demo-config", "create RayJob demo-mine",
                              "event Normal StageStarted"]
    assert phases(status)["encode"] == "Succeeded" and status["stage"] == "mine"
    again, _ = run(s, [job(s, "encode", "succeeded"), job(s, "mine", "running")], store("prepare", "encode"), status)
    assert not [a for a in again if isinstance(a, KeepLog)]  # the log is kept once, when the stage ends


def test_failed_stage_with_retries_left_is_retried_after_backoff():
    s, status = running_at("mine")
    done = store("prepare", "encode")
    actions, status = run(s, [job(s, "mine", "failed", message="OOMKilled")], done, status)
    assert kinds(actions) == ["keep log of RayJob demo-mine at demo/logs/mine.log", "event Warning StageFailed",
                              "delete RayJob demo-mine"]  # the log first: deleting the job deletes its pods
    mine = stage_of(status, "mine")
    assert mine["phase"] == "Retrying" and mine["retryAt"] == (NOW + timedelta(seconds=30)).isoformat()
    assert "attempt 1/3 failed: job demo-mine: OOMKilled; retry in 30 s" in mine["message"]
    assert conditions(status)["Progressing"] == ("True", "RetryBackoff") and status["phase"] == "Running"
    # the failed job is still there: delete it again, never create over it
    assert kinds(run(s, [job(s, "mine", "failed")], done, status, NOW + timedelta(seconds=40))[0]) == ["delete RayJob demo-mine"]
    # gone, but the backoff has not passed
    assert run(s, [], done, status, NOW + timedelta(seconds=29))[0] == []
    actions, status = run(s, [], done, status, NOW + timedelta(seconds=30))
    assert kinds(actions) == ["apply ConfigMap demo-config", "create RayJob demo-mine", "event Normal StageRetried"]
    assert stage_of(status, "mine")["attempts"] == 2
    # the second failure waits twice as long
    _, status = run(s, [job(s, "mine", "failed")], done, status, NOW + timedelta(seconds=100))
    assert stage_of(status, "mine")["retryAt"] == (NOW + timedelta(seconds=160)).isoformat()


def test_failed_stage_with_retries_exhausted_fails_the_pipeline_and_keeps_the_job():
    s, status = running_at("encode", spec(retries=0))
    actions, status = run(s, [job(s, "encode", "failed", message="exit code 1")], store("prepare"), status)
    assert kinds(actions) == ["keep log of RayJob demo-encode at demo/logs/encode.log", "event Warning StageFailed",
                              "event Warning PipelineFailed"]
    assert status["phase"] == "Failed" and status["stage"] == "encode"
    assert conditions(status) == {"Ready": ("False", "StageFailed"), "Progressing": ("False", "StageFailed"),
                                  "Failed": ("True", "StageFailed")}
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["message"] == "stage encode: failed after 1 attempt(s): job demo-encode: exit code 1"
    assert run(s, [job(s, "encode", "failed")], store("prepare"), status, NOW + timedelta(hours=1))[0] == []
    # raising the retry limit retries it: the old job is deleted first, then recreated
    more = spec(retries=1)
    assert kinds(run(more, [job(more, "encode", "failed")], store("prepare"), status)[0]) == ["delete RayJob demo-encode"]
    actions, status = run(more, [], store("prepare"), status)
    assert "create RayJob demo-encode" in kinds(actions) and status["phase"] == "Running"


def test_job_succeeded_without_a_complete_store_record_is_a_failed_attempt():
    s, status = running_at("encode")
    actions, status = run(s, [job(s, "encode", "succeeded")], StoreState(stages={"prepare": "complete", "encode": "partial"}), status)
    assert "succeeded but the store has no complete record (partial)" in stage_of(status, "encode")["message"]
    assert kinds(actions) == ["keep log of RayJob demo-encode at demo/logs/encode.log", "event Warning StageFailed",
                              "delete RayJob demo-encode"]


@pytest.mark.parametrize(
    "change, invalidated",
    [
        ({"train": {"learning_rate": 1e-4}}, {"train", "eval", "export", "report"}),
        ({"mining": {"top_k": 50}}, {"mine", "train", "eval", "export", "report"}),
        ({"eval": {"k_values": [10, 20]}}, {"eval", "export", "report"}),
    ],
    ids=["train", "mining", "eval"],
)
def test_spec_change_mid_run_invalidates_exactly_the_changed_stages(change, invalidated):
    old, status = running_at("train")
    done = ["prepare", "encode", "mine"]
    new_spec = spec(**change)
    old_hashes, new_hashes = stage_hashes(config_of(old)), stage_hashes(config_of(new_spec))
    assert {n for n in STAGES if old_hashes[n] != new_hashes[n]} == invalidated
    store_now = StoreState(stages={n: "complete" if n in done and n not in invalidated else "stale" for n in STAGES})
    actions, status = run(new_spec, [job(old, "train", "running")], store_now, status)
    first = next(n for n in STAGES if n in invalidated or n not in done)
    assert status["stage"] == first
    events = [a.reason for a in actions if isinstance(a, Event)]
    assert events.count("StageInvalidated") == len(invalidated & {"mine", "train"})  # the stages that had started
    assert ("delete TrainJob demo-train" in kinds(actions)) == ("train" in invalidated)  # its job ran the old config
    created = [a.obj["metadata"]["name"] for a in actions if isinstance(a, Create)]
    assert created == ([f"demo-{first}"] if first not in ("train",) else [])  # train's name is still taken
    for name in STAGES:
        entry = stage_of(status, name)
        assert entry["hash"] == new_hashes[name]
        want = "Succeeded" if name in done and name not in invalidated else "Pending"
        want = "Running" if name == first and (created or "train" not in invalidated) else want
        assert entry["phase"] == want, name
    if first == "train" and "train" in invalidated:
        # the old job is gone: train starts with the new config (new hash label)
        actions, status = run(new_spec, [], store_now, status)
        objs = [a.obj for a in actions if isinstance(a, Create)]
        assert [o["metadata"]["name"] for o in objs] == ["demo-train"]
        assert objs[0]["metadata"]["labels"][LABEL_HASH] == new_hashes["train"][:16]
        assert stage_of(status, "train")["attempts"] == 1


def test_spec_change_that_disables_a_stage_deletes_its_job():
    s, status = running_at("judge", spec(judge={"enabled": True}))
    actions, status = run(spec(), [job(s, "judge", "running")], store("prepare", "encode", "mine"), status)
    assert "delete RayJob demo-judge" in kinds(actions)
    assert "judge" not in phases(status)


def test_job_deleted_by_hand_is_recreated_as_a_retry():
    s, status = running_at("train")
    done = store("prepare", "encode", "mine")
    later = NOW + timedelta(minutes=5)
    actions, status = run(s, [], done, status, later)
    assert kinds(actions) == ["event Warning JobMissing"]
    train = stage_of(status, "train")
    assert train["phase"] == "Retrying" and "job demo-train disappeared before the stage completed" in train["message"]
    actions, status = run(s, [], done, status, later + timedelta(seconds=30))
    assert "create TrainJob demo-train" in kinds(actions) and stage_of(status, "train")["attempts"] == 2


@pytest.mark.parametrize(("record", "phase"), [("complete", "Succeeded"), ("partial", "Retrying"), (None, "Retrying")])
def test_a_rayjob_kuberay_deleted_once_it_finished_is_read_by_the_stores_record(record, phase):
    """KubeRay v1.7.0 with DELETE_RAYJOB_CR_AFTER_JOB_FINISHES=true and ttlSecondsAfterFinished 0
    deletes a RayJob as soon as it reaches Complete/Failed (rayjob_controller.go,
    handleShutdownAfterJobFinishes). Observed: running, then gone. The store's record decides;
    an incomplete one is a failed attempt that says the job ended and where its log is."""
    s, status = running_at("mine")
    actions, status = run(s, [job(s, "mine", "running")], store("prepare", "encode"), status, NOW + timedelta(minutes=1))
    assert actions == []
    records = store("prepare", "encode", "mine") if record == "complete" else StoreState(
        stages={"prepare": "complete", "encode": "complete", **({"mine": record} if record else {})})
    actions, status = run(s, [], records, status, NOW + timedelta(minutes=2))
    mine = stage_of(status, "mine")
    assert mine["phase"] == phase
    if phase == "Retrying":
        assert kinds(actions) == ["event Warning RayJobGone"]
        assert (f"RayJob demo-mine ended and is gone (KubeRay deletes a finished RayJob when its operator runs with "
                f"DELETE_RAYJOB_CR_AFTER_JOB_FINISHES=true), and the store's record of the stage is {record or 'pending'}, "
                "not complete; its log, if kept: s3://bucket/peg/demo/logs/mine.log") in mine["message"]
    else:
        assert status["stage"] == "train" and "create TrainJob demo-train" in kinds(actions)


def test_job_not_yet_observed_after_its_create_is_not_missing():
    """The watch may lag behind the create: within the grace period the stage just waits."""
    s, status = running_at("train")
    done = store("prepare", "encode", "mine")
    actions, new = run(s, [], done, status, NOW + timedelta(seconds=JOB_VISIBLE_GRACE_SECONDS - 1))
    assert actions == [] and stage_of(new, "train")["phase"] == "Running"
    assert stage_of(new, "train")["message"] == "waiting for job demo-train to be observed"


def test_job_deleted_after_the_stage_completed_is_success():
    """A finished job removed by its TTL: the store record decides."""
    s, status = running_at("eval")
    actions, status = run(s, [], store("prepare", "encode", "mine", "train", "eval"), status)
    assert kinds(actions)[:2] == ["event Normal StageSucceeded", "apply ConfigMap demo-config"]
    assert status["stage"] == "export"


def test_pipeline_deleted_gets_no_actions():
    s, status = running_at("mine")
    actions, new = run(s, [job(s, "mine", "running")], store("prepare", "encode"), status, deleting=True)
    assert actions == [] and new == status


def test_pipelines_sharing_a_store_prefix_the_newer_is_refused():
    config = config_of(spec())
    keys = claim_keys("team-a", config)
    claimants = {k: [("2026-11-30T10:00:00Z", "team-a/first"), ("2026-11-30T11:00:00Z", "team-b/second")] for k in keys[:1]}
    claimants[keys[1]] = [("2026-11-30T10:00:00Z", "team-a/first")]
    assert claimed_by("team-a/first", claimants, keys) is None
    holder = claimed_by("team-b/second", claimants, claim_keys("team-b", config))
    assert holder == "team-a/first (store prefix s3://bucket/peg/demo)"
    actions, status = run(spec(), st=StoreState(stages={"prepare": "complete"}, claimed_by=holder))
    assert kinds(actions) == ["event Warning PipelineRefused"]
    assert status["phase"] == "Refused"
    assert conditions(status) == {"Ready": ("False", "PrefixInUse"), "Progressing": ("False", "PrefixInUse"),
                                  "Failed": ("True", "PrefixInUse")}
    message = status["conditions"][0]["message"]
    assert message == ("team-a/first (store prefix s3://bucket/peg/demo) already uses it: "
                       "change spec.run.name or spec.run.store.uri")
    # once the older pipeline is gone, the refused one starts
    actions, status = run(spec(), st=store("prepare"), status=status)
    assert "create RayJob demo-encode" in kinds(actions) and status["phase"] == "Running"


def test_same_run_name_in_one_namespace_is_refused_even_with_other_stores():
    a, b = config_of(spec()), config_of(spec(store={"uri": "s3://other/x"}))
    claimants = {}
    for when, who, cfg in (("1", "ns/a", a), ("2", "ns/b", b)):
        for key in claim_keys("ns", cfg):
            claimants.setdefault(key, []).append((when, who))
    assert claimed_by("ns/b", claimants, claim_keys("ns", b)) == "ns/a (job names ns/demo-*)"


def test_invalid_spec_fails_with_the_key():
    bad = spec(train={"learning_rate": -1})
    actions, status = run(bad)
    assert status["phase"] == "Failed" and conditions(status)["Failed"] == ("True", "InvalidSpec")
    assert "run.train.learning_rate" in status["conditions"][0]["message"]
    assert kinds(actions) == ["event Warning PipelineFailed"]


def test_renderer_refusal_fails_with_its_message():
    def refuse(config, stage):
        raise ValueError("store.uri: a local path cannot be shared by pods; use s3://")

    renderer = type("Refusing", (FakeRenderer,), {"render_stage": staticmethod(refuse)})
    _, status = reconcile(spec(), 1, [], store("prepare"), None, NOW, renderer=renderer)
    assert status["phase"] == "Failed"
    assert status["conditions"][0]["message"] == "store.uri: a local path cannot be shared by pods; use s3://"


def test_unreadable_store_starts_nothing():
    s, status = running_at("mine")
    actions, status = run(s, [], StoreState(error="connection refused"), status)
    assert actions == [] or all(isinstance(a, Event) for a in actions)
    assert conditions(status)["Ready"] == ("False", "StoreUnavailable")
    assert phases(status)["mine"] == "Running"


def test_whole_run_creates_each_stage_once_and_reports_metrics():
    """Reconcile repeatedly (twice per observation, as a resync would): each job is created once."""
    s = spec()
    status, children, complete, created = None, {}, ["prepare"], []
    summary = {"split": "test", "metrics": {"base": {"ndcg@10": 0.6}, "fine-tuned": {"ndcg@10": 0.7, "recall@100": 0.9}}}
    for _ in range(40):
        st = StoreState(stages={n: "complete" for n in complete}, eval_summary=summary if "eval" in complete else None)
        for _ in range(2):
            actions, status = run(s, list(children.values()), st, status)
            for a in actions:
                if isinstance(a, Create):
                    name = a.obj["metadata"]["labels"]["peg.dev/stage"]
                    assert name not in children
                    created.append(name)
                    children[name] = job(s, name, "running")
        if status["phase"] == "Succeeded":
            break
        name = status["stage"]
        children[name] = job(s, name, "succeeded")
        complete.append(name)
    assert created == FakeRenderer.cluster_stages(config_of(s)) == STAGES[1:]
    assert status["phase"] == "Succeeded" and status["stage"] is None
    assert conditions(status) == {"Ready": ("True", "Completed"), "Progressing": ("False", "Completed"),
                                  "Failed": ("False", "Completed")}
    assert status["metrics"]["ndcgAt10"] == 0.7 and status["metrics"]["baseNdcgAt10"] == 0.6
    assert status["artifacts"]["report"] == "s3://bucket/peg/demo/report/report.html"
    assert status["artifacts"]["model"] == "s3://bucket/peg/demo/export/model/"
    assert status["conditions"][0]["message"] == "all 7 stages complete; nDCG@10 0.7000"


def test_status_keys_of_another_version_are_ignored():
    s, status = running_at("encode")
    old = {**status, "kopf": {"progress": {}}, "stages": [{**x, "legacy": 1} for x in status["stages"]]}
    actions, new = run(s, [job(s, "encode", "running")], store("prepare"), old)
    assert actions == [] and "kopf" not in new and "legacy" not in new["stages"][0]


DENIAL = 'admission webhook "validate.trainjob" denied the request: must not have envs for the node containers'


def test_denied_create_fails_the_pipeline_at_once_and_waits_for_a_spec_change():
    """Issue 35 finding 4: a create the API server refuses for good (422 here) is a Failed
    condition with its message and an event in the same reconcile, and is not asked again for
    the same spec generation."""
    s = spec()
    actions, status = run(s, st=store("prepare"))
    assert "create RayJob demo-encode" in kinds(actions)
    events, status = rejected(s, 1, None, NOW, "create RayJob team/demo-encode", 422, DENIAL)
    assert status["phase"] == "Failed" and conditions(status)["Failed"] == ("True", "ApiRejected")
    assert conditions(status)["Ready"][0] == "False"
    assert DENIAL in status["conditions"][0]["message"] and "change the spec" in status["conditions"][0]["message"]
    assert [(e.type, e.reason) for e in events] == [("Warning", "ApiRejected"), ("Warning", "PipelineFailed")]
    assert all(DENIAL in e.message for e in events)
    assert status["rejected"] == {"request": "create RayJob team/demo-encode", "code": 422, "message": DENIAL,
                                  "generation": 1, "retryAt": None}
    assert run(s, st=store("prepare"), status=status, now=NOW + timedelta(days=1)) == ([], status)
    actions, again = reconcile(s, 2, [], store("prepare"), status, NOW, renderer=FakeRenderer)  # the spec changed
    assert "create RayJob demo-encode" in kinds(actions) and again["rejected"] is None and again["phase"] == "Running"


def test_forbidden_create_is_tried_again_after_the_longest_backoff():
    s = spec()
    _, status = rejected(s, 1, None, NOW, "create TrainJob team/demo-train", 403, "exceeded quota: gpu")
    assert status["rejected"]["retryAt"] == (NOW + timedelta(seconds=600)).isoformat(timespec="seconds")
    assert run(s, st=store("prepare"), status=status, now=NOW + timedelta(seconds=599))[0] == []
    actions, status = run(s, st=store("prepare"), status=status, now=NOW + timedelta(seconds=600))
    assert "create RayJob demo-encode" in kinds(actions) and status["rejected"] is None


@pytest.mark.parametrize(
    ("stage", "kind", "job_status"),
    [  # the pinned controllers' own words (tests/test_controller_rules.py lists their vocabularies)
        ("encode", "RayJob", {"jobDeploymentStatus": "Retrying", "jobStatus": "FAILED"}),  # KubeRay retries
        ("encode", "RayJob", {"jobDeploymentStatus": "Running", "jobStatus": "FAILED"}),  # submitter not finished
        ("encode", "RayJob", {"jobDeploymentStatus": "Suspended"}),  # Kueue holds it
        ("encode", "RayJob", {"jobDeploymentStatus": "Initializing", "jobStatus": "FAILED"}),  # the retry starting
        ("train", "TrainJob", {"conditions": [{"type": "Suspended", "status": "True"}]}),
        ("train", "PyTorchJob", {"conditions": [{"type": "Created", "status": "True"}, {"type": "Restarting", "status": "True"}]}),
        ("train", "PyTorchJob", {"conditions": [{"type": "Suspended", "status": "True"}]}),
    ],
)
def test_a_job_its_controller_still_works_on_is_left_alone(stage, kind, job_status):
    """Issue 35 finding 3: Retrying / Suspended / Restarting are no failed attempt: no delete, no retry."""
    from peg.k8s.render import job_phase

    s, status = running_at(stage)
    child = job(s, stage, job_phase({"kind": kind, "status": job_status}))
    actions, after = run(s, [child], store(*[x for x in STAGES[: STAGES.index(stage)]]), status)
    assert [a for a in actions if isinstance(a, (Delete, Create))] == []
    assert stage_of(after, stage)["phase"] == "Running" and after["phase"] == "Running"


def test_ready_condition_carries_the_generation_it_was_computed_for():
    """`kubectl wait --for=condition=Ready` and Helm 4's readiness (kstatus) read the Ready condition
    and its observedGeneration: both follow every generation."""
    s = spec()
    _, status = reconcile(s, 4, [], store(*STAGES), None, NOW, renderer=FakeRenderer)
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"], ready["observedGeneration"]) == ("True", "Completed", 4)
    assert status["observedGeneration"] == 4
    _, status = reconcile(s, 5, [], store("prepare"), status, NOW, renderer=FakeRenderer)
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["observedGeneration"]) == ("False", 5)
