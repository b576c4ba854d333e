"""Pod contract: the rendered jobs' entrypoints run as the cluster runs them, without a cluster.

Each "pod" is a local process with exactly the environment its operator gives it (derived from the
rendered object and what Kubeflow Trainer v2 / the v1 training-operator / KubeRay add), its own
empty work directory, the rendered ConfigMap as its config and the S3 keys only as mounted Secret
files. Inputs flow only through a real S3 server on 127.0.0.1: the laptop's data folder is deleted
once `prepare` has uploaded it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from peg.config import load_config
from peg.k8s import render_config_map, render_stage
from peg.k8s.render import CONFIG_PATH, S3_DIR
from peg.pipeline import pipeline_status, run_stage_entrypoint
from peg.store import open_store
from s3server import ADMIN
from tiny import make_tiny_beir, make_tiny_model

pytestmark = pytest.mark.slow  # a Ray cluster and torchrun from the rendered pods

PASS_THROUGH = ("PATH", "PYTHONPATH", "HOME", "DS_ACCELERATOR", "TMPDIR", "LANG", "RAY_USAGE_STATS_ENABLED")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3_server):
    """A run prepared from a laptop folder into S3; the folder is gone afterwards."""
    root = tmp_path_factory.mktemp("pods")
    bucket = f"pods-{uuid.uuid4().hex[:8]}"
    s3_server.client().make_bucket(bucket)
    secret = root / "secret"  # the Secret's volume: one file per key
    secret.mkdir()
    (secret / "AWS_ACCESS_KEY_ID").write_text(ADMIN[0])
    (secret / "AWS_SECRET_ACCESS_KEY").write_text(ADMIN[1])
    laptop = root / "laptop"
    config = {
        "name": "pods",
        "data": {"beir": str(make_tiny_beir(laptop / "beir"))},
        "model": {"name_or_path": str(make_tiny_model(root / "image-model")), "query_max_length": 32, "passage_max_length": 48},
        "loss": {"kind": "infonce", "progressive": {"enabled": True}},
        "batch": {"queries_per_step": 4, "hard_negatives": 1, "chunk_size": 3},
        "train": {"max_steps": 3, "learning_rate": 1e-3, "nproc_per_node": 1, "zero_stage": 2, "checkpoint_every": 2},
        "encode": {"batch_size": 16, "num_actors": 1, "actor_cpus": 0.5, "in_process_below": 0},
        "mining": {"num_shards": 1, "top_k": 20, "negatives_per_query": 1, "selection": "rank_window", "rank_window": [0, 20]},
        "store": {"uri": f"s3://{bucket}/runs", "endpoint": s3_server.endpoint, "secure": False},
        "cluster": {"namespace": "peg", "nodes": 2, "s3_secret": "peg-s3",
                    "image": "peg-trainer:test-cpu", "ray_image": "peg-ray:test-cpu"},
    }
    laptop_config = laptop / "run.yaml"
    laptop_config.write_text(yaml.safe_dump(config))
    cfg = load_config(laptop_config)
    os.environ.update({"AWS_ACCESS_KEY_ID": ADMIN[0], "AWS_SECRET_ACCESS_KEY": ADMIN[1]})  # the laptop's keys
    try:
        run_stage_entrypoint(cfg, laptop_config, "prepare")
    finally:
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            os.environ.pop(key)
    shutil.rmtree(laptop / "beir")
    # What every pod mounts at /etc/peg/run.yaml: the rendered ConfigMap (its Secret path mapped here).
    pod_config = root / "configmap" / "run.yaml"
    pod_config.parent.mkdir()
    pod_config.write_text(render_config_map(cfg)["data"]["run.yaml"].replace(S3_DIR, str(secret)))
    return {"root": root, "cfg": cfg, "pod_config": pod_config}


def pod_env(cluster, pod: str, container_env: list[dict], operator_env: dict[str, str]) -> dict[str, str]:
    """The pod's environment: the rendered container env (its scratch paths made per pod) plus
    what the operator injects; from this machine only PATH-like basics, never S3 keys."""
    scratch = cluster["root"] / "scratch" / pod
    scratch.mkdir(parents=True)
    env = {k: os.environ[k] for k in PASS_THROUGH if k in os.environ}
    for item in container_env:
        value = item["value"]
        env[item["name"]] = str(scratch / Path(value).name) if value.startswith("/tmp/") else value
    env["HOME"] = os.environ["HOME"]  # DeepSpeed's compiled ops are cached there (baked into an image)
    env.update(operator_env)
    assert not any(k.startswith("AWS_") for k in env)
    return env


def pod_command(cluster, command: list[str]) -> list[str]:
    assert command[0] == "peg" and command[-1] == CONFIG_PATH
    return [sys.executable, "-m", "peg", *command[1:-1], str(cluster["pod_config"])]


def run_pods(pods: list[tuple[list[str], dict[str, str]]], timeout: int = 600) -> None:
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for cmd, env in pods]
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-6000:]


def complete(cluster, stage: str) -> bool:
    store = open_store(load_config(cluster["pod_config"]).store)
    return {s.name: s.state for s in pipeline_status(cluster["cfg"], store)}[stage] == "complete"


def test_ray_stage_runs_as_a_rayjob_driver_against_a_ray_cluster(cluster, monkeypatch):
    """KubeRay runs the entrypoint on the head with RAY_ADDRESS naming the cluster (encode here;
    mine, which training needs, runs in this process on the same cluster)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    try:
        address = ray.get_runtime_context().gcs_address
        (job,) = render_stage(cluster["cfg"], "encode")
        head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
        # The job supervisor starts the entrypoint with the head's Ray settings (RAY_AUTH_MODE...).
        ray_env = {k: v for k, v in os.environ.items() if k.startswith("RAY_")}
        env = pod_env(cluster, "encode-head", head["env"], {**ray_env, "RAY_ADDRESS": address})
        run_pods([(pod_command(cluster, job["spec"]["entrypoint"].split()), env)])
        assert complete(cluster, "encode")
        pod_config = cluster["pod_config"]
        monkeypatch.setenv("PEG_WORK_DIR", str(cluster["root"] / "scratch" / "mine"))
        run_stage_entrypoint(load_config(pod_config), pod_config, "mine")
        assert complete(cluster, "mine")
    finally:
        ray.shutdown()


def _model_bytes(cluster) -> dict[str, bytes]:
    store = open_store(load_config(cluster["pod_config"]).store)
    prefix = f"{cluster['cfg'].name}/train/model/"
    return {k[len(prefix):]: store.get_bytes(k) for k in store.list(prefix.rstrip("/")) if k.endswith(".safetensors")}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_training_as_trainjob_pods_and_as_pytorchjob_pods_gives_the_same_model(cluster):
    if not complete(cluster, "mine"):
        pytest.skip("needs the mine stage of test_ray_stage_runs_as_a_rayjob_driver_against_a_ray_cluster")
    cfg = cluster["cfg"]

    # Kubeflow Trainer v2, torch-distributed runtime: the torch plugin sets PET_* on every node.
    (trainjob,) = render_stage(cfg, "train")
    trainer = trainjob["spec"]["trainer"]
    port = _free_port()
    pods = []
    for node in range(trainer["numNodes"]):
        operator_env = {
            "PET_NNODES": str(trainer["numNodes"]),
            "PET_NPROC_PER_NODE": str(trainer["numProcPerNode"]),
            "PET_NODE_RANK": str(node),
            "PET_MASTER_ADDR": "127.0.0.1",  # <trainjob>-node-0-0.<trainjob> in a cluster
            "PET_MASTER_PORT": str(port),
        }
        pods.append((pod_command(cluster, trainer["command"]), pod_env(cluster, f"trainjob-{node}", trainer["env"], operator_env)))
    run_pods(pods)
    assert complete(cluster, "train")
    trainjob_model = _model_bytes(cluster)
    assert trainjob_model

    # Training-operator v1 PyTorchJob (v1.9 setPodEnv): master + workers, WORLD_SIZE = replicas x nprocPerNode.
    alt = cfg.model_copy(deep=True)
    alt.cluster.trainer_api = "pytorchjob"
    (pytorchjob,) = render_stage(alt, "train")
    replicas = pytorchjob["spec"]["pytorchReplicaSpecs"]
    total = sum(r["replicas"] for r in replicas.values())
    nproc = pytorchjob["spec"]["nprocPerNode"]
    port = _free_port()
    pods = []
    for role, spec in replicas.items():
        container = spec["template"]["spec"]["containers"][0]
        assert container["name"] == "pytorch"
        for index in range(spec["replicas"]):
            rank = index if role == "Master" else index + 1
            operator_env = {
                "PYTHONUNBUFFERED": "1",
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),  # <job>-master-0 in a cluster
                "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(port),
                "WORLD_SIZE": str(total * int(nproc)), "RANK": str(rank), "PET_NODE_RANK": str(rank),
                "PET_NPROC_PER_NODE": nproc, "PET_NNODES": str(total),
            }
            env = pod_env(cluster, f"pytorchjob-{role}-{index}", container["env"], operator_env)
            pods.append((pod_command(cluster, container["command"]), env))
    run_pods(pods)
    assert complete(cluster, "train")
    assert _model_bytes(cluster) == trainjob_model  # same ranks, data and seed: byte-identical
