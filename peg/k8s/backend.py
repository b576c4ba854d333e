"""The cluster backend: run a stage as its rendered job through the Kubernetes API and follow it.

Jobs are created with the official `kubernetes` client's CustomObjectsApi (TrainJob, PyTorchJob,
RayJob are custom resources; no Kubeflow SDK is needed: both SDKs install a `kubeflow` package
and pin old clients). A job already on the cluster for the same stage hash is followed rather
than created twice; one for another hash, or one that has finished, is replaced.

The main pod's log of each stage is printed as it comes and kept in the store at
`<run>/logs/<stage>.log` when the stage ends: finished Ray clusters are deleted at once
(`cluster.ray_cluster_ttl_seconds`), and the log outlives every pod.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import urllib3
import yaml
from kubernetes.client.exceptions import ApiException

from peg.config import RunConfig
from peg.errors import PegError
from peg.k8s.render import LABEL_HASH, LOCAL_STAGES, job_phase, render_config_map, render_stage
from peg.pipeline import LocalBackend, Stage, StageFailed
from peg.store import ArtifactStore, artifact_key, open_store

API = {  # kind -> (group, version, plural)
    "TrainJob": ("trainer.kubeflow.org", "v1alpha1", "trainjobs"),
    "PyTorchJob": ("kubeflow.org", "v1", "pytorchjobs"),
    "RayJob": ("ray.io", "v1", "rayjobs"),
}


class ClusterError(PegError, RuntimeError):
    """The Kubernetes API refused a request, or is unreachable."""


def primary_pod_selector(obj: dict) -> str:
    """Label selector of the pod whose log is the stage's output (Ray submitter, master, node 0)."""
    name = obj["metadata"]["name"]
    return {
        "RayJob": f"job-name={name}",  # KubeRay's submitter Job, named after the RayJob, tails the driver
        "PyTorchJob": f"training.kubeflow.org/job-name={name},training.kubeflow.org/replica-type=master",
        "TrainJob": f"jobset.sigs.k8s.io/jobset-name={name},batch.kubernetes.io/job-completion-index=0",
    }[obj["kind"]]


def kubernetes_apis() -> tuple[Any, Any]:
    """(CustomObjectsApi, CoreV1Api) from the kubeconfig, or the in-cluster service account."""
    from kubernetes import client, config

    where = os.environ.get("KUBECONFIG") or None  # read now: the client reads it once, at its import
    try:
        config.load_kube_config(config_file=where)
    except yaml.YAMLError as e:
        where = where or "~/.kube/config"
        mark = getattr(e, "problem_mark", None)
        raise ClusterError(f"kubeconfig {where}{f':{mark.line + 1}' if mark else ''}: invalid YAML "
                           f"({getattr(e, 'problem', None) or e})") from None
    except (config.ConfigException, FileNotFoundError, TypeError):
        try:
            config.load_incluster_config()
        except config.ConfigException as e:
            raise ClusterError(f"no Kubernetes access: no usable kubeconfig and not in a cluster ({e})") from None
    return client.CustomObjectsApi(), client.CoreV1Api()


class K8sBackend:
    """Runs `prepare` here (it uploads this machine's data) and every other stage as its job."""

    def __init__(
        self,
        config: RunConfig,
        apis: tuple[Any, Any] | None = None,
        log: Callable[[str], None] = print,
        poll_seconds: float = 10.0,
        follow_logs: bool = True,
        store: ArtifactStore | None = None,
    ):
        self.config = config
        self._store = store
        self.custom, self.core = apis or kubernetes_apis()
        self.log = log
        self.poll_seconds = poll_seconds
        self.follow_logs = follow_logs

    def run_stage(self, stage: Stage, config_path: Path, env: Mapping[str, str]) -> None:
        if stage.name in LOCAL_STAGES:
            LocalBackend().run_stage(stage, config_path, env)
            return
        self.submit(stage.name, wait=True, env=env)

    def submit(self, stage: str, wait: bool = True, env: Mapping[str, str] | None = None) -> str:
        """Create (or find) the stage's job; with `wait`, follow it to the end. Returns the phase.

        `env` (the pipeline's run lease, handed to its stages) goes where the job's API allows
        (`render_stage`). ClusterError naming the API server when it cannot be reached.
        """
        try:
            return self._submit(stage, wait, env)
        except urllib3.exceptions.HTTPError as e:
            host = self.core.api_client.configuration.host
            reason = getattr(e, "reason", None) or e
            raise ClusterError(f"Kubernetes API {host}: cannot connect ({str(reason).splitlines()[0][-200:]})") from None

    def _submit(self, stage: str, wait: bool, env: Mapping[str, str] | None) -> str:
        self.apply_config_map()
        phase = "pending"
        for obj in render_stage(self.config, stage, env):
            self._create_or_reuse(obj)
            if wait:
                phase = self.follow(obj, stage)
                if phase == "failed":
                    raise StageFailed(f"stage {stage}: {obj['kind']} {obj['metadata']['name']} failed; see its log above")
        return phase

    def apply_config_map(self) -> None:
        cm = render_config_map(self.config)
        ns, name = cm["metadata"]["namespace"], cm["metadata"]["name"]
        try:
            self.core.create_namespaced_config_map(ns, cm)
        except ApiException as e:
            if e.status != 409:
                raise ClusterError(f"cannot create ConfigMap {ns}/{name}: {e}") from None
            self.core.replace_namespaced_config_map(name, ns, cm)

    def _create_or_reuse(self, obj: dict) -> None:
        group, version, plural = API[obj["kind"]]
        ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
        try:
            existing = self.custom.get_namespaced_custom_object(group, version, ns, plural, name)
        except ApiException as e:
            if e.status != 404:
                raise ClusterError(f"cannot read {obj['kind']} {ns}/{name}: {e}") from None
            existing = None
        if existing is not None:
            same = existing["metadata"].get("labels", {}).get(LABEL_HASH) == obj["metadata"]["labels"][LABEL_HASH]
            if same and job_phase(existing) in ("pending", "running"):
                self.log(f"[k8s] {obj['kind']} {ns}/{name} is already {job_phase(existing)}: following it")
                return
            self.log(f"[k8s] replacing {obj['kind']} {ns}/{name} ({'finished' if same else 'another config'})")
            self.custom.delete_namespaced_custom_object(group, version, ns, plural, name, propagation_policy="Foreground")
            self._wait_deleted(group, version, ns, plural, name)
        try:
            self.custom.create_namespaced_custom_object(group, version, ns, plural, obj)
        except ApiException as e:
            raise ClusterError(f"cannot create {obj['kind']} {ns}/{name}: {e}") from None
        self.log(f"[k8s] created {obj['kind']} {ns}/{name}")

    def _wait_deleted(self, group: str, version: str, ns: str, plural: str, name: str, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.custom.get_namespaced_custom_object(group, version, ns, plural, name)
            except ApiException as e:
                if e.status == 404:
                    return
                raise
            time.sleep(min(self.poll_seconds, 2.0))
        raise ClusterError(f"{plural} {ns}/{name} was not deleted within {timeout:.0f} s")

    def log_key(self, stage: str) -> str:
        """Where a stage's main pod log is kept in the store."""
        return artifact_key(self.config.name, "logs", f"{stage}.log")

    def follow(self, obj: dict, stage: str | None = None) -> str:
        """Poll the job until it succeeds or fails, printing phase changes and its main pod's log
        (kept in the store at `log_key(stage)` when `stage` is given)."""
        with tempfile.NamedTemporaryFile("w+", prefix="peg-stage-log-", suffix=".log") as kept:
            phase = self._follow(obj, kept)
            if stage is not None and self.follow_logs and kept.tell():
                kept.flush()
                store = self._store or open_store(self.config.store)
                store.put_file(self.log_key(stage), kept.name, "k8s-backend")
                self.log(f"[k8s] log of stage {stage} kept at {store.describe()}/{self.log_key(stage)}")
        return phase

    def _follow(self, obj: dict, kept: IO[str]) -> str:
        group, version, plural = API[obj["kind"]]
        ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
        last, streamer = None, None
        while True:
            current = self.custom.get_namespaced_custom_object(group, version, ns, plural, name)
            phase = job_phase(current)
            if phase != last:
                self.log(f"[k8s] {obj['kind']} {ns}/{name}: {phase}")
                last = phase
            if self.follow_logs and streamer is None and phase in ("running", "succeeded", "failed"):
                streamer = self._stream_logs(ns, primary_pod_selector(obj), kept)
            if phase in ("succeeded", "failed"):
                if streamer is not None:
                    streamer.join(timeout=30)
                return phase
            time.sleep(self.poll_seconds)

    def _stream_logs(self, ns: str, selector: str, kept: IO[str]) -> threading.Thread | None:
        pods = self.core.list_namespaced_pod(ns, label_selector=selector).items
        if not pods:
            return None
        pod = pods[0].metadata.name

        def stream() -> None:
            from kubernetes import watch

            try:
                for line in watch.Watch().stream(self.core.read_namespaced_pod_log, pod, ns):
                    self.log(line)
                    kept.write(line + "\n")
            except Exception as e:  # noqa: BLE001 - a log stream ending early must not fail the stage
                self.log(f"[k8s] log of {ns}/{pod} ended: {e}")

        thread = threading.Thread(target=stream, daemon=True, name=f"log-{pod}")
        thread.start()
        return thread

