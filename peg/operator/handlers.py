"""kopf handlers: observe the pipelines, their jobs and the store; call `reconcile`; apply its actions.

Run with kopf's CLI (the chart's Deployment does):

    kopf run -m peg.operator.handlers --all-namespaces --standalone --liveness=http://0.0.0.0:8080/healthz

Nothing here decides anything and nothing is kept only in memory: kopf's indexes mirror the
pipelines and their jobs from the API server (rebuilt by a restarted controller before any
handler runs), the stage records live in the artifact store, the rest in `status`. One timer per
pipeline reconciles every `PEG_OPERATOR_INTERVAL` seconds (default 10): stages run for minutes
to hours, so a poll costs little latency and makes a missed watch event harmless.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, UTC
from typing import Any

import kopf
import prometheus_client as prom
from pydantic import ValidationError

from peg.config import RunConfig
from peg.k8s.client import connect
from peg.k8s.render import job_phase
from peg.k8s.vocabulary import JOB_KINDS, LABEL_HASH, LABEL_STAGE, PIPELINE
from peg.operator import api
from peg.operator.reconcile import (
    Child,
    Delete,
    Event,
    KeepLog,
    StoreState,
    claim_keys,
    claimed_by,
    reconcile,
    rejected,
)
from peg.pipeline import pipeline_status
from peg.pipeline.results import read_eval_summary
from peg.store import ArtifactStore, StoreError, open_store

INTERVAL = float(os.environ.get("PEG_OPERATOR_INTERVAL", "10"))

# Prometheus metrics (kopf has none): served on PEG_OPERATOR_METRICS_PORT when it is set.
RECONCILES = prom.Counter("peg_operator_reconciles_total", "Reconcile calls, by outcome.", ["outcome"])
RECONCILE_SECONDS = prom.Histogram("peg_operator_reconcile_seconds", "Time of one reconcile (observe + decide + apply).")
ACTIONS = prom.Counter("peg_operator_actions_total", "API actions applied, by kind (create, apply, delete).", ["action"])
TRANSITIONS = prom.Counter("peg_operator_transitions_total", "Stage and pipeline transitions (the events posted), by reason.",
                           ["reason"])
PIPELINES = prom.Gauge("peg_operator_pipelines", "EmbeddingPipelines in the cluster, by status.phase.", ["phase"])
PHASES = ("Pending", "Running", "Succeeded", "Failed", "Refused")


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.persistence.finalizer = f"{PIPELINE.group}/operator"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PIPELINE.group)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=PIPELINE.group)
    settings.posting.loggers = False  # only the transitions reconcile emits become events
    # A pipeline deleted while its reconcile runs: re-check for the timer's exit every second, not
    # every 60 s (kopf's default), so the finalizer goes right after that reconcile returns.
    settings.background.cancellation_polling = 1
    connect()
    if os.environ.get("PEG_OPERATOR_METRICS_PORT"):
        prom.start_http_server(int(os.environ["PEG_OPERATOR_METRICS_PORT"]))


def job_observation(body: kopf.Body) -> Child:
    """A stage job as reconcile sees it: its stage, stage hash label and phase."""
    labels = body.metadata.labels
    status = body.get("status") or {}
    message = status.get("message") or status.get("reason") or ""
    return Child(
        api_version=body["apiVersion"], kind=body["kind"], name=body.metadata.name, stage=labels[LABEL_STAGE],
        stage_hash=labels.get(LABEL_HASH, ""), phase=job_phase(dict(body)),
        deleting=bool(body.metadata.get("deletionTimestamp")), message=message,
    )


def _index_jobs(body: kopf.Body, namespace: str, **_: Any) -> dict | None:
    owner = next((r for r in body.metadata.get("ownerReferences", []) if r.get("kind") == PIPELINE.kind), None)
    return {(namespace, owner["name"]): job_observation(body)} if owner else None


for _kind in JOB_KINDS:
    kopf.index(_kind.group, _kind.version, _kind.plural, id=_kind.plural, labels={LABEL_STAGE: kopf.PRESENT})(_index_jobs)


@kopf.index(PIPELINE.group, PIPELINE.version, PIPELINE.plural)
def pipeline_claims(namespace: str, name: str, meta: kopf.Meta, spec: kopf.Spec, **_: Any) -> dict | None:
    """Claim key -> (created, "namespace/name") of every pipeline: who owns a store prefix / job names."""
    try:
        config = RunConfig.model_validate(spec.get("run"))
    except ValidationError:
        return None
    return {key: (meta.get("creationTimestamp") or "", f"{namespace}/{name}") for key in claim_keys(namespace, config)}


@kopf.index(PIPELINE.group, PIPELINE.version, PIPELINE.plural)
def pipeline_phases(status: kopf.Status, **_: Any) -> dict:
    """status.phase -> pipelines in it (the peg_operator_pipelines gauge)."""
    return {status.get("phase", "Pending"): True}


def run_store(config: RunConfig) -> ArtifactStore:
    """The run's store, opened with the operator's own keys when it has them (a mounted Secret)."""
    if os.environ.get("PEG_OPERATOR_S3_CREDENTIALS"):
        config = config.model_copy(deep=True)
        config.store.credentials_file = os.environ["PEG_OPERATOR_S3_CREDENTIALS"]
    return open_store(config.store)


def keep_logs(actions: list, spec: dict, namespace: str, logger: kopf.Logger) -> None:
    """Apply the KeepLog actions: copy each finished stage job's main pod log into the store. Best
    effort: a log that cannot be kept (pods gone, the store or the API failing) is logged, and
    the pipeline goes on."""
    wanted = [a for a in actions if isinstance(a, KeepLog)]
    if not wanted:
        return
    try:
        store = run_store(RunConfig.model_validate(spec["run"]))
    except (StoreError, OSError, ValueError) as e:
        logger.warning(f"stage logs not kept: cannot open the store ({e})")
        return
    for action in wanted:
        try:
            kept = api.keep_log(action, namespace, store)
        except Exception as e:  # noqa: BLE001 - a log that cannot be copied must not stop the pipeline
            logger.warning(f"log of {action.kind} {namespace}/{action.name} not kept: {e}")
            continue
        if kept:
            logger.info(f"log of {action.kind} {namespace}/{action.name} kept at {store.describe()}/{action.key}")
        else:
            logger.warning(f"log of {action.kind} {namespace}/{action.name} not kept: no pod of it is left")


def observe_store(spec: dict, namespace: str, name: str, claims: kopf.Index) -> StoreState:
    """The store's view of the run (stage records, eval summary), or why it cannot be read."""
    try:
        config = RunConfig.model_validate(spec.get("run"))
    except ValidationError:
        return StoreState()  # reconcile reports the invalid spec
    holder = claimed_by(f"{namespace}/{name}", {k: list(v) for k, v in claims.items()}, claim_keys(namespace, config))
    if holder:
        return StoreState(claimed_by=holder)
    try:
        store = run_store(config)
        stages = {row.name: row.state for row in pipeline_status(config, store)}
        summary = None
        if stages.get("eval") == "complete":
            summary = read_eval_summary(store, config.name).to_json()
    except (StoreError, OSError, ValueError) as e:
        return StoreState(error=str(e))
    return StoreState(stages=stages, eval_summary=summary)


@kopf.timer(PIPELINE.group, PIPELINE.version, PIPELINE.plural, interval=INTERVAL, id="reconcile")
def reconcile_pipeline(
    body: kopf.Body, spec: kopf.Spec, meta: kopf.Meta, status: kopf.Status, namespace: str, name: str,
    patch: kopf.Patch, logger: kopf.Logger, pipeline_claims: kopf.Index, **indexes: Any,
) -> None:
    with RECONCILE_SECONDS.time():
        try:
            _reconcile(body, spec, meta, status, namespace, name, patch, logger, pipeline_claims, indexes)
        except Exception:
            RECONCILES.labels("error").inc()
            raise
    RECONCILES.labels("ok").inc()


def _reconcile(body, spec, meta, status, namespace, name, patch, logger, pipeline_claims, indexes) -> None:
    pipeline_phases = indexes.pop("pipeline_phases")
    children = [job for k in JOB_KINDS for job in indexes[k.plural].get((namespace, name), [])]
    spec_dict = json.loads(json.dumps(dict(spec)))
    store = observe_store(spec_dict, namespace, name, pipeline_claims)
    now = datetime.now(UTC)
    actions, new_status = reconcile(
        spec_dict, meta.get("generation"), children, store, dict(status), now,
        deleting=bool(meta.get("deletionTimestamp")),
    )
    keep_logs(actions, spec_dict, namespace, logger)  # before any Delete takes the finished job's pods
    try:  # API calls first: if one fails, nothing is reported as done
        for action in actions:
            if not isinstance(action, (Event, KeepLog)):
                if not isinstance(action, Delete):
                    action.obj["metadata"]["namespace"] = namespace  # owner references work within a namespace
                    kopf.adopt(action.obj, owner=body)
                api.apply_action(action, namespace)
                ACTIONS.labels(type(action).__name__.lower()).inc()
    except api.Rejected as e:  # a lasting refusal: say so now, ask again only when it may help
        actions, new_status = rejected(spec_dict, meta.get("generation"), dict(status), now, e.request, e.code, e.message)
    for action in actions:
        if isinstance(action, Event):
            kopf.event(body, type=action.type, reason=action.reason, message=action.message)
            logger.info(f"{action.reason}: {action.message}")
            TRANSITIONS.labels(action.reason).inc()
    if new_status != {k: status.get(k) for k in new_status}:
        patch.status.update(new_status)
    for phase in PHASES:
        PIPELINES.labels(phase).set(len(pipeline_phases.get(phase, ())))
