"""kind end to end: the chart, the CPU images and a tiny pipeline on a real (local) cluster.

    python tests/e2e/kind_e2e.py            # or: PEG_E2E=1 pytest -m e2e tests/e2e
Needs docker (with a running daemon), kind and kubectl on PATH, and network access to pull the
base images and the KubeRay / Kubeflow Trainer charts. Steps:
 1. create the kind cluster $PEG_E2E_CLUSTER (default peg-e2e; it must not exist yet);
 2. build the CPU images and `kind load` them (images/build.sh cpu --kind ...);
 3. install KubeRay (kuberay-operator 1.7.0) and Kubeflow Trainer (kubeflow-trainer 2.3.0, with
    its torch-distributed ClusterTrainingRuntime), with the Helm SDK peg's tests use;
 4. install charts/peg with ci/kind-values.yaml (bundled SeaweedFS S3) into a namespace that
    enforces the restricted Pod Security Standard, run `helm test`;
 5. `prepare` the tiny BEIR dataset from this machine into the bundled S3 (kubectl port-forward),
    as `peg pipeline run --backend k8s` does on a laptop;
 6. upgrade the release with the tiny run under `run:`: the chart's launcher Job runs the rest of
    the pipeline in the cluster (RayJobs, a TrainJob);
    or, with PEG_E2E_VIA=operator: the chart is installed with operator.enabled (its CRD and the
    peg operator), and `kubectl apply` of an EmbeddingPipeline (spec.run: the run config the chart
    would give its launcher) makes the operator run the pipeline; `kubectl get embeddingpipelines`
    is printed while it runs, and its status must end Succeeded with a report URI;
 7. wait for the launcher (or the pipeline), then check from here that every stage is complete in
    the bundled S3 (`peg pipeline status`) and the exported model's files are there.
The cluster is deleted at the end unless PEG_E2E_KEEP=1. Exit 0 only when every check passed.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
CLUSTER = os.environ.get("PEG_E2E_CLUSTER", "peg-e2e")
NAMESPACE = "peg"
RELEASE = "peg"
KUBERAY = ("kuberay-operator", "https://ray-project.github.io/kuberay-helm/", "1.7.0")
TRAINER = ("oci://ghcr.io/kubeflow/charts/kubeflow-trainer", None, "2.3.0")
LAUNCH_TIMEOUT_S = 3600
VIA = os.environ.get("PEG_E2E_VIA", "launcher")  # launcher | operator
TOOLS = ("docker", "kind", "kubectl")


def missing_tools() -> list[str]:
    """What this machine lacks to run the e2e ([] when it can)."""
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if "docker" not in missing:
        info = subprocess.run(["docker", "info"], capture_output=True, text=True)
        if info.returncode != 0:
            missing.append("a running docker daemon (`docker info` failed)")
    return missing


def sh(*args: str, **kwargs) -> subprocess.CompletedProcess:
    print("+", " ".join(args), flush=True)
    return subprocess.run(args, check=True, text=True, **kwargs)


def kubectl(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return sh("kubectl", "--context", f"kind-{CLUSTER}", *args, **kwargs)


def tiny_run(beir: Path) -> dict:
    """The e2e's run config: tiny BEIR data, the MiniLM model the CPU images carry, kind-sized pods."""
    return {
        "name": "e2e",
        "data": {"beir": str(beir)},
        "model": {"name_or_path": "sentence-transformers/all-MiniLM-L6-v2", "query_max_length": 32,
                  "passage_max_length": 48},
        "loss": {"kind": "infonce", "progressive": {"enabled": True}},
        "batch": {"queries_per_step": 4, "hard_negatives": 1, "chunk_size": 4},
        "train": {"epochs": 1, "nproc_per_node": 2, "zero_stage": 2, "checkpoint_every": 4},
        "encode": {"batch_size": 16, "num_actors": 1, "actor_cpus": 0.5},
        "mining": {"num_shards": 1, "top_k": 10, "negatives_per_query": 1},
        "cluster": {"nodes": 1, "gpus_per_node": 0, "resources": {"cpu": "2", "memory": "4Gi"},
                    "ray_head_resources": {"cpu": "1", "memory": "2Gi"}, "ray_workers": 1, "shm_size": "1Gi",
                    "active_deadline_seconds": 1800},
    }  # fmt: skip


@contextlib.contextmanager
def port_forward(service: str, port: int):
    """kubectl port-forward svc/<service> to a free local port; yields 127.0.0.1:<port>."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        local = s.getsockname()[1]
    cmd = ["kubectl", "--context", f"kind-{CLUSTER}", "-n", NAMESPACE, "port-forward", f"svc/{service}", f"{local}:{port}"]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", local)) == 0:
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"port-forward to {service} failed: {process.stdout.read()}")
            time.sleep(0.5)
        yield f"127.0.0.1:{local}"
    finally:
        process.terminate()
        process.wait(10)


def wait_for_job(name: str, timeout_s: float) -> None:
    """Wait until Job `name` succeeds; raise with its logs when it fails or times out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = json.loads(kubectl("-n", NAMESPACE, "get", "job", name, "-o", "json", capture_output=True).stdout)["status"]
        if status.get("succeeded"):
            return
        if any(c["type"] == "Failed" and c["status"] == "True" for c in status.get("conditions", [])):
            break
        time.sleep(15)
    logs = subprocess.run(["kubectl", "--context", f"kind-{CLUSTER}", "-n", NAMESPACE, "logs", f"job/{name}", "--tail", "200"],
                          capture_output=True, text=True).stdout  # fmt: skip
    raise RuntimeError(f"job {name} did not succeed; its last log lines:\n{logs}")


def operator_run_config(values: dict, run: dict) -> dict:
    """The run config the chart would give its launcher (platform facts filled in): the pipeline's spec.run."""
    from chart_render import by_kind, objects, render

    docs = objects(render({**values, "run": run}, name=RELEASE, namespace=NAMESPACE))
    (config_map,) = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-run")]
    return yaml.safe_load(config_map["data"]["run.yaml"])


def wait_for_pipeline(name: str, timeout_s: float) -> dict:
    """Wait until EmbeddingPipeline `name` is Succeeded (printing `kubectl get`); its status."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        kubectl("-n", NAMESPACE, "get", "embeddingpipelines")
        status = json.loads(kubectl("-n", NAMESPACE, "get", "embeddingpipeline", name, "-o", "json",
                                    capture_output=True).stdout).get("status", {})  # fmt: skip
        if status.get("phase") == "Succeeded":
            return status
        if status.get("phase") in ("Failed", "Refused"):
            break
        time.sleep(15)
    kubectl("-n", NAMESPACE, "describe", "embeddingpipeline", name)
    raise RuntimeError(f"pipeline {name} did not succeed: {json.dumps(status.get('conditions'), indent=1)}")


def main() -> int:
    missing = missing_tools()
    if missing:
        print(f"kind e2e cannot run: missing {', '.join(missing)}", file=sys.stderr)
        return 2
    import helm_python as helm

    from tiny import make_tiny_beir

    work = Path(tempfile.mkdtemp(prefix="peg-e2e-"))
    kubeconfig = work / "kubeconfig"
    created = False
    try:
        if CLUSTER in sh("kind", "get", "clusters", capture_output=True).stdout.split():
            print(f"kind cluster {CLUSTER} exists (kept by PEG_E2E_KEEP=1?): kind delete cluster --name {CLUSTER}",
                  file=sys.stderr)  # fmt: skip
            return 1
        sh("kind", "create", "cluster", "--name", CLUSTER, "--wait", "180s")
        created = True
        kubeconfig.write_text(sh("kind", "get", "kubeconfig", "--name", CLUSTER, capture_output=True).stdout)
        sh("bash", str(ROOT / "images" / "build.sh"), "cpu", "--kind", CLUSTER)

        with helm.Config(kubeconfig_path=kubeconfig) as cfg:
            chart, repo, version = KUBERAY
            print(f"+ helm install kuberay-operator {version}", flush=True)
            cfg.install(chart, "kuberay-operator", namespace="kuberay-system", create_namespace=True,
                        chart_repo_url=repo, chart_version=version, wait="watcher", timeout=600)  # fmt: skip
            chart, _, version = TRAINER
            print(f"+ helm install kubeflow-trainer {version}", flush=True)
            cfg.install(chart, "kubeflow-trainer", {"runtimes": {"torchDistributed": {"enabled": True}}},
                        namespace="kubeflow-system", create_namespace=True, chart_version=version,
                        wait="watcher", timeout=900)  # fmt: skip

            # The namespace enforces the restricted Pod Security Standard: the API server rejects
            # any pod of the chart or of the run's jobs that breaks it.
            kubectl("create", "namespace", NAMESPACE)
            kubectl("label", "namespace", NAMESPACE, "pod-security.kubernetes.io/enforce=restricted")
            values = yaml.safe_load((ROOT / "charts/peg/ci/kind-values.yaml").read_text())
            if VIA == "operator":
                values["operator"] = {"enabled": True, "interval": 5}
            print(f"+ helm install peg charts/peg (platform, bundled S3{', operator' if VIA == 'operator' else ''})", flush=True)
            cfg.install(str(ROOT / "charts/peg"), RELEASE, values, namespace=NAMESPACE, wait="watcher", timeout=600)
            print("+ helm test peg", flush=True)
            print(cfg.test(RELEASE, timeout=300, logs=True).get("logs", ""))

            beir = make_tiny_beir(work / "beir")
            run = tiny_run(beir)
            secret = json.loads(kubectl("-n", NAMESPACE, "get", "secret", f"{RELEASE}-s3-credentials", "-o", "json",
                                        capture_output=True).stdout)["data"]  # fmt: skip
            env = {**os.environ, **{k: base64.b64decode(v).decode() for k, v in secret.items()}}
            with port_forward(f"{RELEASE}-s3", 8333) as endpoint:
                local = work / "run-local.yaml"
                store = {"uri": "s3://peg/e2e", "endpoint": endpoint, "secure": False}
                local.write_text(yaml.safe_dump({**run, "store": store}))
                sh(sys.executable, "-m", "peg", "pipeline", "stage", "prepare", str(local), env=env)

            if VIA == "operator":
                pipeline = {"apiVersion": "peg.dev/v1alpha1", "kind": "EmbeddingPipeline",
                            "metadata": {"name": run["name"], "namespace": NAMESPACE},
                            "spec": {"run": operator_run_config(values, run)}}  # fmt: skip
                (work / "pipeline.yaml").write_text(yaml.safe_dump(pipeline))
                kubectl("apply", "-f", str(work / "pipeline.yaml"))
                status = wait_for_pipeline(run["name"], LAUNCH_TIMEOUT_S)
                print(f"report: {status['artifacts']['report']}; nDCG@10 {status['metrics']['ndcgAt10']}")
            else:
                print("+ helm upgrade peg (run: e2e)", flush=True)
                cfg.upgrade(str(ROOT / "charts/peg"), RELEASE, {**values, "run": run}, namespace=NAMESPACE,
                            wait="watcher", timeout=600)  # fmt: skip
                wait_for_job(f"{RELEASE}-launch-r2", LAUNCH_TIMEOUT_S)

        with port_forward(f"{RELEASE}-s3", 8333) as endpoint:
            local.write_text(yaml.safe_dump({**run, "store": {**store, "endpoint": endpoint}}))
            status = sh(sys.executable, "-m", "peg", "pipeline", "status", str(local), env=env, capture_output=True).stdout
            print(status)
            from minio import Minio

            client = Minio(endpoint, access_key=env["AWS_ACCESS_KEY_ID"], secret_key=env["AWS_SECRET_ACCESS_KEY"], secure=False)
            keys = [o.object_name for o in client.list_objects("peg", prefix="e2e/", recursive=True)]
        not_done = [line for line in status.splitlines() if any(s in line for s in ("pending", "partial", "stale"))]
        if not_done:
            raise RuntimeError("stages not complete in the store:\n" + "\n".join(not_done))
        if not any(k.endswith("model.safetensors") for k in keys):
            raise RuntimeError(f"no exported model.safetensors among the {len(keys)} objects under s3://peg/e2e/")
        print(f"kind e2e passed: every stage complete, {len(keys)} objects under s3://peg/e2e/")
        return 0
    finally:
        if created and os.environ.get("PEG_E2E_KEEP") != "1":
            subprocess.run(["kind", "delete", "cluster", "--name", CLUSTER])
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
