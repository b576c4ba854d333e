"""The pod runner (peg.k8s.pods): rendered objects become containers with exactly what they say.

The first tests read the translation (no Docker). The tests marked `containers` run real
containers of the CPU images (`images/build.sh cpu --local`); they run only with PEG_CONTAINERS=1
(`.ci/run` sets it after building the images) and a Docker daemon that answers, else they skip
saying which is missing.
"""

from __future__ import annotations

import base64
import copy
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from peg.config import load_config
from peg.k8s import render_config_map, render_stage
from peg.k8s.pods import PodError, containers_of, docker_run_command, run

ROOT = Path(__file__).resolve().parents[1]
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
    assert head.command[:4] == ["ray", "start", "--head", "--block"]
    assert "--dashboard-host=127.0.0.1" in head.command and "--num-cpus=1" in head.command
    gcs = next(a for a in head.command if a.startswith("--port=")).split("=")[1]
    assert worker.command[:3] == ["ray", "start", "--block"] and f"--address=127.0.0.1:{gcs}" in worker.command
    dashboard = next(a for a in head.command if a.startswith("--dashboard-port=")).split("=")[1]
    assert submitter.command[:5] == ["ray", "job", "submit", "--address", f"http://127.0.0.1:{dashboard}"]
    assert submitter.command[-5:] == ["peg", "pipeline", "stage", "encode", "/etc/peg/run.yaml"]
    assert submitter.wait_for_url == f"http://127.0.0.1:{dashboard}/api/gcs_healthz"
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


@pytest.fixture(scope="module")
def images():
    for image in (TRAINER_IMAGE, RAY_IMAGE):
        if subprocess.run(["docker", "image", "inspect", image], capture_output=True).returncode != 0:
            pytest.fail(f"image {image} missing: build it with `images/build.sh cpu --local`")


def probe(shell: str, **pod_changes) -> tuple[int, str]:
    obj = pod(command=["sh", "-c", shell], **pod_changes)
    (result,) = run(containers_of(obj), timeout=120)
    return result.status, result.log


@containers
@pytest.mark.containers
def test_the_container_user_is_the_pods_run_as_user(images):
    status, log = probe("id -u; id -g")
    assert status == 0 and log.split() == ["10001", "0"], log
    status, log = probe("id -u; id -g", securityContext={"runAsUser": 4242, "runAsGroup": 4343})
    assert log.split() == ["4242", "4343"], log


@containers
@pytest.mark.containers
def test_the_read_only_root_refuses_writes_outside_tmp(images):
    status, log = probe("touch /tmp/ok && echo tmp-ok; touch /home/peg/x || echo refused")
    assert status == 0 and log.split()[:1] == ["tmp-ok"] and "Read-only file system" in log and "refused" in log, log
    relaxed = pod()["spec"]["containers"][0]["securityContext"] | {"readOnlyRootFilesystem": False}
    status, log = probe("touch /home/peg/x && echo written", securityContext=relaxed)
    assert "written" in log, log  # the same write, allowed: the flag is what refuses it


@containers
@pytest.mark.containers
def test_capabilities_no_new_privileges_and_seccomp_bite(images):
    status, log = probe("grep -E '^(CapEff|NoNewPrivs|Seccomp):' /proc/self/status")
    fields = dict(line.split(":\t") for line in log.strip().splitlines())
    assert fields == {"CapEff": "0000000000000000", "NoNewPrivs": "1", "Seccomp": "2"}, log


@containers
@pytest.mark.containers
def test_rendered_config_map_and_secret_are_files_the_user_reads_through_fs_group(images):
    cfg = quickstart()
    (job,) = render_stage(cfg, "train")
    (container,) = containers_of(job, objects_for(cfg))
    container.command = ["sh", "-c", "head -c 15 /etc/peg/run.yaml; echo; cat /etc/peg-s3/AWS_ACCESS_KEY_ID; echo;"
                         " df -k /dev/shm | tail -1; cat /sys/fs/cgroup/memory/memory.limit_in_bytes"]
    (result,) = run([container], timeout=120)
    lines = result.log.splitlines()
    assert result.status == 0 and lines[0] == "name: quickstart" and lines[1] == "AKIA", result.log
    assert lines[2].split()[1] == str(2**20) and lines[3] == str(4 * 2**30), result.log  # shm 1Gi, memory 4Gi
    without_fs_group = copy.deepcopy(container)
    without_fs_group.groups = []
    without_fs_group.command = ["cat", "/etc/peg-s3/AWS_ACCESS_KEY_ID"]
    (result,) = run([without_fs_group], timeout=120)
    assert result.status != 0 and "Permission denied" in result.log  # mode 0440: the group is what reads it
