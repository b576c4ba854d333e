"""The EmbeddingPipeline custom resource as pydantic models: its spec and its status.

`spec.run` is a whole `RunConfig` (cluster settings included: `run.cluster` names the images,
the trainer API, resources and the S3 secret); `spec.retries` bounds how often a failed stage
is started again. The status is what the controller knows and all it needs after a restart:
each stage's phase, attempts and child job, the conditions, and what the run produced.
The CRD's schema is generated from these models (`peg.operator.crd`), never written by hand.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from peg.config import RunConfig

StagePhase = Literal["Pending", "Running", "Retrying", "Succeeded", "Failed"]
PipelinePhase = Literal["Pending", "Running", "Succeeded", "Failed", "Refused"]


class Resource(BaseModel):
    """camelCase on the wire (Kubernetes convention), snake_case in Python; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True)


class StatusPart(Resource):
    """Status models ignore keys they do not know: a status written by another operator version
    must not stop this one (the API server prunes unknown keys; the emulator does not)."""

    model_config = ConfigDict(extra="ignore", alias_generator=to_camel, populate_by_name=True)


class RetryPolicy(Resource):
    """How a failed stage is started again: `limit` retries, the n-th after backoff * 2^(n-1) seconds."""

    limit: int = Field(2, ge=0, description="Retries of a failed stage after its first attempt (0: none).")
    backoff_seconds: int = Field(30, ge=0, description="Wait before the first retry; doubles with each retry.")
    max_backoff_seconds: int = Field(900, ge=0, description="Upper bound of the wait between retries.")

    def delay(self, failed_attempts: int) -> int:
        """Seconds to wait before the attempt that follows `failed_attempts` failures (>= 1)."""
        return min(self.backoff_seconds * 2 ** (failed_attempts - 1), self.max_backoff_seconds)


class PipelineSpec(Resource):
    """What to run: one peg run config, and the retry policy of its stages."""

    run: RunConfig = Field(..., description="The peg run config (`peg config show` prints one), cluster settings in run.cluster.")
    retries: RetryPolicy = Field(RetryPolicy(), description="Retries of a failed stage.")


class ChildRef(StatusPart):
    """The Kubernetes object that runs a stage (a RayJob, TrainJob or PyTorchJob)."""

    api_version: str
    kind: str
    name: str


class StageStatus(StatusPart):
    """One stage: its phase for the stage hash it was computed for, attempts made and its job."""

    name: str
    phase: StagePhase = "Pending"
    hash: str = Field("", description="Stage hash (config sections + upstream hashes) this entry refers to.")
    attempts: int = Field(0, ge=0, description="Jobs started for this stage hash.")
    child: ChildRef | None = None
    message: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    retry_at: str | None = Field(None, description="When the next attempt may start (phase Retrying).")


class Condition(StatusPart):
    """A Kubernetes-style condition: Ready, Progressing or Failed."""

    type: Literal["Ready", "Progressing", "Failed"]
    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str = ""
    last_transition_time: str
    observed_generation: int | None = None


class Metrics(StatusPart):
    """Evaluation of the fine-tuned and the base model (the eval stage's summary.json)."""

    ndcg_at10: float | None = Field(None, alias="ndcgAt10", description="nDCG@10 of the fine-tuned model.")
    base_ndcg_at10: float | None = Field(None, alias="baseNdcgAt10", description="nDCG@10 of the base model.")
    split: str | None = None
    fine_tuned: dict[str, float] = Field(default_factory=dict, description="Every metric of the fine-tuned model.")
    base: dict[str, float] = Field(default_factory=dict, description="Every metric of the base model.")


class Artifacts(StatusPart):
    """Where the run's outputs are (URIs in the artifact store)."""

    store_prefix: str = Field(..., description="<store uri>/<run name>: everything the run wrote.")
    report: str | None = Field(None, description="The HTML report (report stage).")
    model: str | None = Field(None, description="The exported sentence-transformers folder (export stage).")
    eval_summary: str | None = Field(None, description="Base vs fine-tuned metrics, JSON (eval stage).")


class ApiRejection(StatusPart):
    """A request the API server refused in a way a retry of the same request cannot change."""

    request: str = Field(..., description="What was asked: 'create RayJob ns/name'.")
    code: int = Field(..., description="The HTTP status: 400/422 invalid or denied by admission, 403 forbidden "
                      "(RBAC, quota), 404 no such resource (a CRD or runtime missing).")
    message: str = ""
    generation: int | None = Field(None, description="The spec generation it was refused for; a new one tries again.")
    retry_at: str | None = Field(None, description="When the same spec is tried again (403/404: the cluster may change); "
                                 "null: only a spec change retries (400/422).")


class PipelineStatus(StatusPart):
    """Everything the controller decided, so a restarted controller continues from here."""

    observed_generation: int | None = None
    phase: PipelinePhase = "Pending"
    stage: str | None = Field(None, description="The stage running, retrying or failed (null when done).")
    stages: list[StageStatus] = Field(default_factory=list)
    conditions: list[Condition] = Field(default_factory=list)
    artifacts: Artifacts | None = None
    metrics: Metrics | None = None
    rejected: ApiRejection | None = Field(None, description="The API server's last lasting refusal, while it holds.")

    def stage_status(self, name: str) -> StageStatus | None:
        return next((s for s in self.stages if s.name == name), None)

    def condition(self, type_: str) -> Condition | None:
        return next((c for c in self.conditions if c.type == type_), None)

    def to_patch(self) -> dict:
        """The status as a JSON merge patch: unset fields are null, so a patch removes them."""
        return self.model_dump(mode="json", by_alias=True)
