"""The controller's decisions as one pure function: what it sees -> what to do + the new status.

    reconcile(spec, generation, children, store, status, now) -> (actions, new status)

It reads nothing and writes nothing; the kopf handlers (`peg.operator.handlers`) observe the
cluster and the store, call it, and apply the actions. Rules, in the order they apply:

- Stages run one at a time in the pipeline's order (`peg.pipeline.enabled_stages`), as
  `peg pipeline run` runs them: a stage whose store record is complete under its current hash
  is Succeeded (whether or not its job still exists); the first one that is not is *current*.
  A stage the renderer does not run in the cluster (`prepare`: it uploads the data from where
  the data is) is awaited: the pipeline waits, saying so, until its record is in the store.
- A stage's job has a fixed name (`<run>-<stage>`, from the renderer). It is created only when
  no job of that name is observed, and a create that finds one already there counts as done:
  a stage never runs twice at once, across restarts and even with two controllers.
- Every stage entry in the status carries the stage hash it was computed for. A spec change
  that alters a stage's hash (its config sections or an upstream stage's) resets that entry to
  Pending and deletes its job if one runs: exactly the invalidated stages run again.
- A failed job, a job that succeeded without a complete store record, and a job that vanished
  before its stage completed (deleted by hand; not observed for `JOB_VISIBLE_GRACE_SECONDS`
  after its create) all count as a failed attempt. A RayJob that vanished ended: KubeRay
  deletes a finished RayJob itself when its operator runs with
  `DELETE_RAYJOB_CR_AFTER_JOB_FINISHES=true` (v1.7.0 rayjob_controller.go,
  `handleShutdownAfterJobFinishes`); the store's record decides, as for any stage, and an
  incomplete one is a failed attempt that names the record and the stage's log in the store.
  A failed attempt is retried after `spec.retries` backoff (the failed job is deleted first)
  until the retries are spent; then the stage and the pipeline are Failed and the last job is
  kept for its logs. Raising `spec.retries.limit` on a Failed pipeline retries the stage.
- When a stage's job of the current config is seen ended (the stage succeeds in the store, or
  its job failed or succeeded without a complete record), its main pod log is copied into the
  store at `<run>/logs/<stage>.log` (`KeepLog`, before any Delete of that job), once.
- Two pipelines that would write the same store prefix (same store uri and run name) or the
  same job names (same namespace and run name): the older one runs, the other is Refused with
  a condition naming the older one, and starts when it is gone.
- A pipeline being deleted gets no actions: owner references let Kubernetes delete its jobs.
- A request the API server refuses for good (`rejected`: an admission denial or invalid object,
  400/422; forbidden by RBAC or quota, 403; a missing CRD, runtime or namespace, 404) fails the
  pipeline with reason `ApiRejected`, the refusal's message and an event at once. Nothing is
  asked again until the spec changes (a new generation) or, for 403/404, the cluster may have
  changed: after `spec.retries.max_backoff_seconds`.

Every change of a stage's or the pipeline's phase emits one event.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal, Protocol

from pydantic import ValidationError

from peg.config import RunConfig
from peg.k8s.names import stage_log_key
from peg.k8s.vocabulary import LABEL_HASH
from peg.operator.model import (
    ApiRejection,
    Artifacts,
    ChildRef,
    Condition,
    Metrics,
    PipelineSpec,
    PipelineStatus,
    StageStatus,
)
from peg.pipeline import enabled_stages, stage_hashes
from peg.pipeline.results import EVAL_SUMMARY, EXPORTED_MODEL, REPORT_PAGE, result_key
from peg.pipeline.state import StageState

# A job created less than this long ago and not observed yet is not "missing": the watch that
# feeds the observations may lag behind the create (seen under load in the emulator test).
JOB_VISIBLE_GRACE_SECONDS = 60

JobPhase = Literal["pending", "running", "succeeded", "failed"]


class Renderer(Protocol):
    """What reconcile needs of `peg.k8s.render` (the module itself is the default)."""

    def cluster_stages(self, cfg: RunConfig) -> list[str]: ...

    def render_stage(self, cfg: RunConfig, stage: str) -> list[dict]: ...

    def render_config_map(self, cfg: RunConfig) -> dict: ...


@dataclass(frozen=True)
class Child:
    """An observed stage job (owned by this pipeline)."""

    api_version: str
    kind: str
    name: str
    stage: str
    stage_hash: str  # its peg.dev/stage-hash label
    phase: JobPhase
    deleting: bool = False
    message: str = ""


@dataclass(frozen=True)
class StoreState:
    """What the artifact store says about the run, and who else claims its prefix."""

    stages: Mapping[str, StageState] = field(default_factory=dict)
    eval_summary: Mapping[str, Any] | None = None  # the eval stage's summary.json, when complete
    error: str | None = None  # the store could not be read
    claimed_by: str | None = None  # an older pipeline ("namespace/name (why)") using the same prefix or job names


@dataclass(frozen=True)
class Create:
    """Create the object unless one of its name exists (409 counts as success)."""

    obj: dict


@dataclass(frozen=True)
class Apply:
    """Create the object or replace the existing one (the run config's ConfigMap)."""

    obj: dict


@dataclass(frozen=True)
class Delete:
    """Delete a stage job (404 counts as success)."""

    api_version: str
    kind: str
    name: str


@dataclass(frozen=True)
class KeepLog:
    """Copy a finished stage job's main pod log into the store at `key` (`<run>/logs/<stage>.log`,
    where `peg pipeline run --backend k8s` keeps it too); best effort: its pods may be gone."""

    api_version: str
    kind: str
    name: str
    key: str


@dataclass(frozen=True)
class Event:
    """A Kubernetes event on the pipeline."""

    type: Literal["Normal", "Warning"]
    reason: str
    message: str


Action = Create | Apply | Delete | KeepLog | Event


def store_prefix(config: RunConfig) -> str:
    """`<store uri>/<run name>`: where a run's artifacts live; two pipelines may not share it."""
    return f"{config.store.uri.rstrip('/')}/{config.name}"


def claim_keys(namespace: str, config: RunConfig) -> list[str]:
    """What a pipeline claims exclusively: its store prefix and its job names (namespace + run name)."""
    return [f"store prefix {store_prefix(config)}", f"job names {namespace}/{config.name}-*"]


def claimed_by(me: str, claimants: Mapping[str, Sequence[tuple[str, str]]], keys: Sequence[str]) -> str | None:
    """The oldest other pipeline sharing one of `keys`, if it is older than `me`.

    `claimants` maps a claim key to (creationTimestamp, "namespace/name") of every pipeline
    that claims it; ties go to the name that sorts first. Returns "namespace/name (key)".
    """
    for key in keys:
        holders = sorted(claimants.get(key, ()))
        if holders and holders[0][1] != me:
            return f"{holders[0][1]} ({key})"
    return None


def reconcile(
    spec: Mapping[str, Any],
    generation: int | None,
    children: Sequence[Child],
    store: StoreState,
    status: Mapping[str, Any] | None,
    now: datetime,
    *,
    deleting: bool = False,
    renderer: Renderer | None = None,
) -> tuple[list[Action], dict]:
    """Decide the next actions and the new status (a JSON merge patch) of one pipeline."""
    if renderer is None:
        from peg.k8s import render as renderer
    old = PipelineStatus.model_validate(status or {})
    if deleting:
        return [], old.to_patch()
    new = old.model_copy(deep=True)
    new.observed_generation = generation
    step = _Step(new, generation, now)
    try:
        parsed = PipelineSpec.model_validate(spec)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()[:3])
        step.finish("Failed", None, "InvalidSpec", f"spec: {problems}")
        return step.actions, new.to_patch()
    if old.rejected and old.rejected.generation == generation and (
        old.rejected.retry_at is None or datetime.fromisoformat(old.rejected.retry_at) > now
    ):
        return [], new.to_patch()  # a retry of the same request gets the same answer
    new.rejected = None
    if store.claimed_by:
        step.finish("Refused", None, "PrefixInUse", f"{store.claimed_by} already uses it: change spec.run.name or spec.run.store.uri")
        return step.actions, new.to_patch()
    try:
        _run_stages(step, parsed, children, store, renderer)
    except ValueError as e:  # the renderer refused the config (names the key)
        step.finish("Failed", new.stage, "InvalidSpec", str(e))
    return step.actions, new.to_patch()


SPEC_REJECTIONS = (400, 422)  # the object itself is refused: only a spec change can help
CLUSTER_REJECTIONS = (401, 403, 404, 405, 409, 413, 415)  # the cluster refuses (RBAC, quota, a missing CRD,
# a foreign object in the way: `api` raises 409 only for that): it may change


def rejected(spec: Mapping[str, Any], generation: int | None, status: Mapping[str, Any] | None, now: datetime,
             request: str, code: int, message: str) -> tuple[list[Event], dict]:
    """The status and event after the API server refused `request` with `code` (one of
    `SPEC_REJECTIONS` or `CLUSTER_REJECTIONS`): built on the status before the reconcile whose
    action it refused, so nothing that reconcile decided counts as done."""
    new = PipelineStatus.model_validate(status or {})
    new.observed_generation = generation
    retry_at = None
    if code not in SPEC_REJECTIONS:
        delay = PipelineSpec.model_validate(spec).retries.max_backoff_seconds
        retry_at = (now + timedelta(seconds=delay)).isoformat(timespec="seconds")
    new.rejected = ApiRejection(request=request, code=code, message=message, generation=generation, retry_at=retry_at)
    step = _Step(new, generation, now)
    then = "change the spec to try again" if retry_at is None else f"tried again at {retry_at} or when the spec changes"
    why = f"{request}: HTTP {code}: {message} ({then})"
    step.event("Warning", "ApiRejected", why)
    step.finish("Failed", new.stage, "ApiRejected", why)
    return [a for a in step.actions if isinstance(a, Event)], new.to_patch()


class _Step:
    """The status being built and the actions collected in one reconcile call."""

    def __init__(self, status: PipelineStatus, generation: int | None, now: datetime):
        self.status = status
        self.generation = generation
        self.now = now
        self.stamp = now.isoformat(timespec="seconds")
        self.actions: list[Action] = []

    def event(self, type_: Literal["Normal", "Warning"], reason: str, message: str) -> None:
        self.actions.append(Event(type_, reason, message))

    def set_stage(self, entry: StageStatus, phase: str, reason: str, message: str, warn: bool = False) -> None:
        if entry.phase != phase:
            self.event("Warning" if warn else "Normal", reason, f"stage {entry.name}: {message}")
        entry.phase = phase
        entry.message = message

    def condition(self, type_: str, value: bool, reason: str, message: str) -> None:
        status = "True" if value else "False"
        old = self.status.condition(type_)
        changed = old is None or old.status != status
        cond = Condition(
            type=type_, status=status, reason=reason, message=message, observed_generation=self.generation,
            last_transition_time=self.stamp if changed else old.last_transition_time,
        )
        self.status.conditions = [c for c in self.status.conditions if c.type != type_] + [cond]
        self.status.conditions.sort(key=lambda c: ("Ready", "Progressing", "Failed").index(c.type))

    def finish(self, phase: str, stage: str | None, reason: str, message: str) -> None:
        """Set the pipeline's phase, current stage and conditions; an event if the phase changed."""
        if self.status.phase != phase:
            warn = phase in ("Failed", "Refused")
            self.event("Warning" if warn else "Normal", f"Pipeline{phase}", message)
        self.status.phase = phase
        self.status.stage = stage
        self.condition("Ready", phase == "Succeeded", reason, message)
        self.condition("Progressing", phase in ("Pending", "Running"), reason, message)
        self.condition("Failed", phase in ("Failed", "Refused"), reason, message)


def _run_stages(step: _Step, spec: PipelineSpec, children: Sequence[Child], store: StoreState, renderer: Renderer) -> None:
    config = spec.run
    in_cluster = set(renderer.cluster_stages(config))
    status = step.status
    hashes = stage_hashes(config)
    names = [s.name for s in enabled_stages(config)]
    entries = []
    for name in names:
        entry = status.stage_status(name)
        if entry is None or entry.hash != hashes[name]:
            if entry is not None and entry.phase != "Pending":
                step.event("Normal", "StageInvalidated", f"stage {name}: its config changed; it runs again")
            entry = StageStatus(name=name, hash=hashes[name])
        entries.append(entry)
    status.stages = entries
    status.artifacts = _artifacts(config, status)
    if store.error:  # nothing can be decided; a Succeeded pipeline stays as it is
        if status.phase != "Succeeded":
            step.finish(status.phase, status.stage, "StoreUnavailable", f"cannot read the artifact store: {store.error}")
        return

    by_stage: dict[str, list[Child]] = {}
    for child in children:
        by_stage.setdefault(child.stage, []).append(child)
    for stage, jobs in by_stage.items():  # jobs of disabled stages or of an old stage hash
        wanted = _hash_label(renderer.render_stage(config, stage)) if stage in in_cluster else None
        for job in jobs:
            if job.stage_hash != wanted and not job.deleting:
                step.actions.append(Delete(job.api_version, job.kind, job.name))
                step.event("Normal", "StaleJobDeleted", f"stage {stage}: job {job.name} ran an old config")

    current = None
    for entry in entries:
        if store.stages.get(entry.name) == "complete":
            if entry.phase != "Succeeded":
                _keep_logs(step, config, entry.name, by_stage.get(entry.name, []), renderer)
                step.set_stage(entry, "Succeeded", "StageSucceeded", "complete in the store")
                entry.finished_at = step.stamp
                entry.retry_at = None
            continue
        if current is None:
            current = entry
            if entry.name in in_cluster:
                _advance(step, spec, entry, by_stage.get(entry.name, []), store, renderer)
            else:
                _await_local_stage(step, entry)
        elif entry.phase == "Succeeded":  # its outputs left the store
            step.set_stage(entry, "Pending", "StagePending", "outputs no longer complete in the store")

    status.artifacts = _artifacts(config, status)  # again: stages may have succeeded above
    status.metrics = _metrics(store.eval_summary) if store.stages.get("eval") == "complete" else None
    if current is None:
        ndcg = f"; nDCG@10 {status.metrics.ndcg_at10:.4f}" if status.metrics and status.metrics.ndcg_at10 is not None else ""
        step.finish("Succeeded", None, "Completed", f"all {len(entries)} stages complete{ndcg}")
    elif current.phase == "Failed":
        step.finish("Failed", current.name, "StageFailed", f"stage {current.name}: {current.message}")
    elif current.phase == "Pending":  # a local stage, or its job name is still taken by an old job
        phase = "Running" if any(e.attempts for e in entries) else "Pending"
        reason = "Waiting" if current.name in in_cluster else "WaitingForLocalStage"
        step.finish(phase, current.name, reason, f"stage {current.name}: {current.message}")
    else:
        reason = "RetryBackoff" if current.phase == "Retrying" else "StageRunning"
        step.finish("Running", current.name, reason, f"stage {current.name}: {current.message}")


def _await_local_stage(step: _Step, entry: StageStatus) -> None:
    """A stage that runs where the data is (`prepare` uploads it to the store): wait for its record."""
    message = (f"waiting for its record in the store: run `peg pipeline stage {entry.name} CONFIG` where the data is "
               "(it uploads the data)")
    if entry.message != message:
        step.event("Normal", "WaitingForLocalStage", f"stage {entry.name}: {message}")
    entry.phase = "Pending"
    entry.message = message


def _advance(step: _Step, spec: PipelineSpec, entry: StageStatus, jobs: list[Child], store: StoreState,
             renderer: Renderer) -> None:
    """Move the current stage on by what its job and the store say."""
    config = spec.run
    objects = renderer.render_stage(config, entry.name)
    wanted = _hash_label(objects)
    max_attempts = spec.retries.limit + 1
    job = next((j for j in jobs if j.stage_hash == wanted and not j.deleting), None)
    if job is not None:
        entry.attempts = max(entry.attempts, 1)  # 0 if a restart lost the status written after the create
        if job.phase in ("pending", "running"):
            entry.child = ChildRef(api_version=job.api_version, kind=job.kind, name=job.name)
            entry.started_at = entry.started_at or step.stamp
            entry.retry_at = None
            step.set_stage(entry, "Running", "StageRunning", f"job {job.name} is {job.phase} (attempt {entry.attempts}/{max_attempts})")
            return
        if entry.phase in ("Pending", "Running"):  # it finished, but the store has no complete record
            _keep_logs(step, config, entry.name, [job], renderer)
            why = job.message or "failed"
            if job.phase == "succeeded":
                why = f"succeeded but the store has no complete record ({store.stages.get(entry.name, 'pending')})"
            _fail_attempt(step, spec, entry, f"job {job.name}: {why}")
        if entry.phase == "Retrying" or entry.attempts < max_attempts:  # the retry needs its name
            step.actions.append(Delete(job.api_version, job.kind, job.name))
        return
    if jobs:  # a job of an old config, or one being deleted: its name is not free yet
        entry.message = f"waiting for job {jobs[0].name} to be deleted"
        return
    if entry.phase == "Running":
        name = entry.child.name if entry.child else f"of stage {entry.name}"
        started = datetime.fromisoformat(entry.started_at) if entry.started_at else step.now
        if step.now - started < timedelta(seconds=JOB_VISIBLE_GRACE_SECONDS):
            entry.message = f"waiting for job {name} to be observed"  # the watch lags behind our create
            return
        if entry.child and entry.child.kind == "RayJob":  # KubeRay may delete a RayJob itself once it ended
            record = store.stages.get(entry.name, "pending")
            log = f"{config.store.uri.rstrip('/')}/{stage_log_key(config.name, entry.name)}"
            _fail_attempt(step, spec, entry, f"RayJob {name} ended and is gone (KubeRay deletes a finished RayJob when "
                          f"its operator runs with DELETE_RAYJOB_CR_AFTER_JOB_FINISHES=true), and the store's record of "
                          f"the stage is {record}, not complete; its log, if kept: {log}", "RayJobGone")
            return
        _fail_attempt(step, spec, entry, f"job {name} disappeared before the stage completed (deleted by hand?)", "JobMissing")
        return
    if entry.phase == "Failed" and entry.attempts >= max_attempts:
        return
    if entry.phase == "Retrying" and entry.retry_at and datetime.fromisoformat(entry.retry_at) > step.now:
        return
    step.actions.append(Apply(renderer.render_config_map(config)))
    step.actions.extend(Create(obj) for obj in objects)
    entry.attempts += 1
    main = objects[-1]
    entry.child = ChildRef(api_version=main["apiVersion"], kind=main["kind"], name=main["metadata"]["name"])
    entry.started_at = step.stamp
    entry.finished_at = entry.retry_at = None
    reason = "StageStarted" if entry.attempts == 1 else "StageRetried"
    step.set_stage(entry, "Running", reason, f"created {main['kind']} {main['metadata']['name']} (attempt {entry.attempts}/{max_attempts})")


def _keep_logs(step: _Step, config: RunConfig, stage: str, jobs: Sequence[Child], renderer: Renderer) -> None:
    """The stage ends: keep the log of its finished job of the current config (once, at the transition)."""
    if stage not in renderer.cluster_stages(config):
        return
    wanted = _hash_label(renderer.render_stage(config, stage))
    for job in jobs:
        if job.stage_hash == wanted and job.phase in ("succeeded", "failed") and not job.deleting:
            step.actions.append(KeepLog(job.api_version, job.kind, job.name, stage_log_key(config.name, stage)))


def _fail_attempt(step: _Step, spec: PipelineSpec, entry: StageStatus, why: str, reason: str = "StageFailed") -> None:
    """Count a failed attempt: Retrying after the backoff, or Failed when the retries are spent."""
    max_attempts = spec.retries.limit + 1
    if entry.attempts < max_attempts:
        delay = spec.retries.delay(entry.attempts)
        entry.retry_at = (step.now + timedelta(seconds=delay)).isoformat(timespec="seconds")
        step.set_stage(entry, "Retrying", reason, f"attempt {entry.attempts}/{max_attempts} failed: {why}; retry in {delay} s",
                       warn=True)
    else:
        step.set_stage(entry, "Failed", reason, f"failed after {entry.attempts} attempt(s): {why}", warn=True)
        entry.finished_at = step.stamp


def _hash_label(objects: list[dict]) -> str:
    return objects[-1]["metadata"]["labels"][LABEL_HASH]


def _artifacts(config: RunConfig, status: PipelineStatus) -> Artifacts:
    done = {s.name for s in status.stages if s.phase == "Succeeded"}

    def where(result: tuple[str, str], folder: bool = False) -> str | None:
        stage, _ = result
        return f"{config.store.uri.rstrip('/')}/{result_key(config.name, result)}" + "/" * folder if stage in done else None

    return Artifacts(
        store_prefix=store_prefix(config),
        report=where(REPORT_PAGE),
        model=where(EXPORTED_MODEL, folder=True),
        eval_summary=where(EVAL_SUMMARY),
    )


def _metrics(summary: Mapping[str, Any] | None) -> Metrics | None:
    if not summary:
        return None
    tuned = summary["metrics"].get("fine-tuned", {})
    base = summary["metrics"].get("base", {})
    return Metrics(ndcg_at10=tuned.get("ndcg@10"), base_ndcg_at10=base.get("ndcg@10"), split=summary.get("split"),
                   fine_tuned=tuned, base=base)
