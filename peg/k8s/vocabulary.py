"""The Kubernetes names peg uses, each declared once: resource kinds, API groups and versions,
plurals, labels.

The renderers (`peg.k8s.render`), the cluster backend (`peg.k8s.backend`), the operator
(`peg.operator`) and the chart's RBAC check (tests/test_chart.py, tests/test_operator_rbac.py)
read them from here. A new stage job kind is one more `JobKind` in `JOB_KINDS` (plus its renderer
and its `job_phase` reading in `peg.k8s.render`).
"""

from __future__ import annotations

from dataclasses import dataclass

GROUP = "peg.dev"  # the EmbeddingPipeline's API group, and the prefix of peg's labels

LABEL_RUN = f"{GROUP}/run"  # the run name, on every object of a run
LABEL_STAGE = f"{GROUP}/stage"  # the stage a job (and its pods) runs
LABEL_HASH = f"{GROUP}/stage-hash"  # the stage hash's first 32 hex digits: which config the job runs
LABEL_QUEUE = "kueue.x-k8s.io/queue-name"  # Kueue reads it from the job object itself


@dataclass(frozen=True)
class ResourceKind:
    """A namespaced custom resource kind: where the API serves it and what it is called."""

    group: str
    version: str
    kind: str
    plural: str

    @property
    def api_version(self) -> str:
        """`group/version`, the objects' `apiVersion`."""
        return f"{self.group}/{self.version}"


@dataclass(frozen=True)
class JobKind(ResourceKind):
    """A kind of stage job the renderers make; `primary_pod` is the label selector (with `{name}`,
    the job's name) of the pod whose log is the stage's output."""

    primary_pod: str


RAYJOB = JobKind("ray.io", "v1", "RayJob", "rayjobs",
                 # KubeRay's submitter Job, named after the RayJob, tails the driver
                 primary_pod="job-name={name}")
TRAINJOB = JobKind("trainer.kubeflow.org", "v1alpha1", "TrainJob", "trainjobs",
                   primary_pod="jobset.sigs.k8s.io/jobset-name={name},batch.kubernetes.io/job-completion-index=0")
PYTORCHJOB = JobKind("kubeflow.org", "v1", "PyTorchJob", "pytorchjobs",
                     primary_pod="training.kubeflow.org/job-name={name},training.kubeflow.org/replica-type=master")
JOB_KINDS = (RAYJOB, TRAINJOB, PYTORCHJOB)

PIPELINE = ResourceKind(GROUP, "v1alpha1", "EmbeddingPipeline", "embeddingpipelines")
PIPELINE_SINGULAR = "embeddingpipeline"
PIPELINE_SHORT_NAMES = ("epipe",)


def job_kind(api_version: str, kind: str) -> JobKind:
    """The stage job kind of an object's `apiVersion` and `kind`; ValueError for any other."""
    for k in JOB_KINDS:
        if (k.api_version, k.kind) == (api_version, kind):
            return k
    raise ValueError(f"{kind} ({api_version}) is not a stage job kind peg renders")


def job_kind_of(obj: dict) -> JobKind:
    """The stage job kind of a rendered or fetched job object."""
    return job_kind(obj["apiVersion"], obj["kind"])


def primary_pod_selector(obj: dict) -> str:
    """Label selector of the pod whose log is the stage's output (Ray submitter, master, node 0)."""
    return job_kind_of(obj).primary_pod.format(name=obj["metadata"]["name"])
