"""peg/k8s: names, the structural schema, rendered objects validated offline, render-time errors."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import yaml

from k8s_validation import CHECKOV, checkov_failures, shared_dir, validate_builtin, validate_custom, validate_object
from peg.config import RunConfig, load_config
from peg.k8s import RenderError, job_phase, render_config_map, render_run, render_stage, resource_name, run_config_schema
from peg.k8s.names import is_dns_1035
from peg.k8s.render import CONFIG_PATH, manifest_files, stage_hash_label
from peg.pipeline import stage_hashes

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not (shared_dir() / "crds").is_dir(), reason="../shared/crds (vendored CRDs) is missing")

S3 = {
    "store.uri": "s3://peg/artifacts",
    "store.endpoint": "peg-s3.peg.svc:8333",
    "cluster.namespace": "peg",
    "cluster.s3_secret": "peg-s3",
    "cluster.service_account": "peg",
}
PAPER = {
    **S3,
    "cluster.trainer_api": "pytorchjob",
    "cluster.priority_class": "training-high",
    "cluster.node_selector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
    "cluster.tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    "cluster.ray_worker_gpus": 1,
}


def k8s_quickstart(**overrides) -> RunConfig:
    return load_config(REPO / "examples" / "k8s-quickstart.yaml", overrides)


def test_resource_name_short_long_and_invalid():
    assert resource_name("quickstart", "train") == "quickstart-train"
    long = resource_name("a-very-long-run-name-for-an-experiment-on-scifact", "encode")
    assert len(long) == 47 and is_dns_1035(long) and re.fullmatch(r".*-[0-9a-f]{8}", long)
    assert long != resource_name("a-very-long-run-name-for-an-experiment-on-scifact", "eval")
    assert resource_name("9lives", "mine").startswith("p-9lives-mine-")  # DNS-1035 starts with a letter
    assert is_dns_1035(resource_name("Run_Name", "train", max_len=20))
    assert len(resource_name("x" * 80, "report", max_len=20)) == 20


def test_schema_is_structural_and_accepts_example_configs():
    schema = run_config_schema()
    text = json.dumps(schema)
    for forbidden in ('"$ref":', '"$defs":', '"anyOf":', '"allOf":', '"const":', '"prefixItems":', '"title":'):
        assert forbidden not in text, forbidden

    def typed(node, path="<root>"):
        if isinstance(node, dict):
            if "properties" in node:
                assert "additionalProperties" not in node, path  # a CRD may not combine both
                for key, child in node["properties"].items():
                    assert "type" in child, f"{path}.{key} has no type"
                    typed(child, f"{path}.{key}")
            if "items" in node:
                typed(node["items"], f"{path}[]")

    typed(schema)
    assert schema["properties"]["data"]["properties"]["beir"]["nullable"] is True
    import jsonschema

    helm = run_config_schema(for_helm=True)
    for name in ("quickstart.yaml", "peg-paper-scale.yaml", "k8s-quickstart.yaml"):
        values = yaml.safe_load((REPO / "examples" / name).read_text())
        jsonschema.validate(values, helm)
    with pytest.raises(jsonschema.ValidationError, match="gpus_per_nod"):
        jsonschema.validate({"model": {"name_or_path": "m"}, "cluster": {"gpus_per_nod": 1}}, helm)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"model": {"name_or_path": "m"}, "cluster": {"trainer_api": "mpijob"}}, helm)


def _render_both(cfg: RunConfig) -> list[dict]:
    objects = render_run(cfg)
    other = cfg.model_copy(deep=True)
    other.cluster.trainer_api = "pytorchjob" if cfg.cluster.trainer_api == "trainjob" else "trainjob"
    other.cluster.priority_class = None
    return objects + render_stage(other, "train")


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    paper = load_config(REPO / "examples" / "peg-paper-scale.yaml", {**PAPER, "data.beir": "/data/beir/msmarco"})
    return {"quickstart": _render_both(k8s_quickstart()), "paper": _render_both(paper)}


def test_rendered_objects_validate(rendered):
    for name, objects in rendered.items():
        kinds = sorted({o["kind"] for o in objects})
        assert kinds == ["ConfigMap", "PyTorchJob", "RayJob", "TrainJob"], (name, kinds)
        for obj in objects:
            assert validate_object(obj) == [], (name, obj["kind"], obj["metadata"]["name"])


@pytest.mark.slow
def test_checkov_passes_rendered_objects_and_rejects_an_unrestricted_pod(rendered):
    if not CHECKOV.exists():
        pytest.skip("checkov is not installed in .venv-tools (scripts/setup.sh installs it)")
    broken = copy.deepcopy(next(o for o in rendered["quickstart"] if o["kind"] == "PyTorchJob"))
    broken["metadata"]["name"] = "broken"
    pod = broken["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    del pod["securityContext"]
    pod["containers"][0]["securityContext"] = {"privileged": True}
    failures = checkov_failures(rendered["quickstart"] + rendered["paper"] + manifest_objects() + [broken])
    assert [f for f in failures if "broken-" not in f] == []
    assert any(f.startswith("CKV_K8S_16 ") for f in failures)  # privileged container
    assert any(f.startswith("CKV_K8S_31 ") for f in failures)  # no seccomp profile


MANIFESTS = REPO / "manifests"


def manifest_objects() -> list[dict]:
    """Every object under manifests/ (the Secret template included), not the kustomization."""
    files = [p for p in sorted(MANIFESTS.rglob("*.yaml")) if p.name not in ("kustomization.yaml", "run.yaml")]
    return [doc for p in files for doc in yaml.safe_load_all(p.read_text()) if doc]


def test_committed_manifests_equal_fresh_render():
    cfg = load_config(MANIFESTS / "run.yaml")
    on_disk = lambda folder: {p.name: p.read_text() for p in sorted((MANIFESTS / folder).glob("*.yaml"))}  # noqa: E731
    assert on_disk("rendered") == manifest_files(render_run(cfg)), "run manifests/render.sh"
    alt = load_config(MANIFESTS / "run.yaml", {"cluster.trainer_api": "pytorchjob"})
    assert on_disk("pytorchjob") == manifest_files([render_config_map(alt), *render_stage(alt, "train")])


def test_manifests_validate_and_kustomization_is_complete():
    kinds = []
    for obj in manifest_objects():
        assert validate_object(obj) == [], (obj["kind"], obj["metadata"]["name"])
        assert obj["metadata"].get("namespace", "peg") == "peg" or obj["kind"] == "Namespace"
        kinds.append(obj["kind"])
    for kind in ("Namespace", "ServiceAccount", "Role", "RoleBinding", "Secret", "ConfigMap", "TrainJob", "PyTorchJob", "RayJob"):
        assert kind in kinds, kind
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    assert all((MANIFESTS / r).is_file() for r in kustomization["resources"])
    rbac = {o["kind"]: o for o in yaml.safe_load_all((MANIFESTS / "rbac.yaml").read_text())}
    assert all("*" not in rule["verbs"] and "*" not in rule["resources"] for rule in rbac["Role"]["rules"])


def test_validators_reject_broken_objects(rendered):
    objects = {o["kind"]: o for o in rendered["paper"]}
    bad = copy.deepcopy(objects["PyTorchJob"])
    bad["spec"]["nprocPerNode"] = 8  # the v1.9 CRD wants a string
    assert any("nprocPerNode" in e for e in validate_custom(bad))
    bad = copy.deepcopy(objects["TrainJob"])
    bad["spec"]["trainer"]["numNodes"] = "4"
    bad["spec"]["trainer"]["nodes"] = 4  # unknown field: the API server would prune it silently
    errors = validate_custom(bad)
    assert any("numNodes" in e for e in errors) and any("nodes" in e and "Additional" in e for e in errors)
    bad = copy.deepcopy(objects["RayJob"])
    del bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["groupName"]
    assert any("groupName" in e for e in validate_custom(bad))
    bad = copy.deepcopy(objects["ConfigMap"])
    bad["data"]["run.yaml"] = 3
    assert validate_builtin(bad)
    bad = copy.deepcopy(objects["ConfigMap"])
    bad["metadata"]["labels"]["peg.dev/run"] = "x" * 70
    assert validate_builtin(bad) == [f"metadata.labels.peg.dev/run: invalid label value {'x' * 70!r}"]
    bad = copy.deepcopy(objects["RayJob"])
    bad["metadata"]["name"] = "r" * 48
    assert validate_object(bad) == [f"metadata.name: {'r' * 48!r} is not a valid RayJob name (max 47)"]


def test_pod_contract_of_rendered_jobs(rendered):
    """The command, config mount, S3 keys from the Secret only, /dev/shm, restricted security."""
    cfg = k8s_quickstart()
    hashes = stage_hashes(cfg)
    configmap, *jobs = rendered["quickstart"]
    text = configmap["data"]["run.yaml"]
    pod_cfg = yaml.safe_load(text)
    assert pod_cfg["store"]["credentials_file"] == "/etc/peg-s3" and pod_cfg["name"] == cfg.name
    assert stage_hashes(RunConfig.model_validate(pod_cfg)) == hashes  # pods compute the same stage hashes
    dumped = yaml.safe_dump_all(rendered["quickstart"])
    assert "secretKeyRef" not in dumped and "AWS_SECRET_ACCESS_KEY:" not in dumped
    for job in jobs:
        stage = job["metadata"]["labels"]["peg.dev/stage"]
        assert job["metadata"]["labels"]["peg.dev/stage-hash"] == stage_hash_label(hashes[stage])
        if job["kind"] == "RayJob":
            spec = job["spec"]
            assert spec["entrypoint"] == f"peg pipeline stage {stage} {CONFIG_PATH}"
            assert spec["shutdownAfterJobFinishes"] and spec["ttlSecondsAfterFinished"] == 0  # the cluster goes at once
            assert spec["preRunningDeadlineSeconds"] == 1800
            assert spec["activeDeadlineSeconds"] == 7200 and spec["backoffLimit"] == 2
            assert len(job["metadata"]["name"]) <= 47
            pods = [spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"],
                    spec["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]]
        elif job["kind"] == "TrainJob":
            trainer = job["spec"]["trainer"]
            assert trainer["command"] == ["peg", "pipeline", "stage", "train", CONFIG_PATH]
            assert (trainer["numNodes"], trainer["numProcPerNode"]) == (1, 2)
            assert job["spec"]["runtimeRef"]["name"] == "torch-distributed"
            patch = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
            pods = [patch["template"]["spec"]["template"]["spec"]]
        else:
            assert job["spec"]["nprocPerNode"] == "2"
            assert job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["name"] == "pytorch"
            pods = [r["template"]["spec"] for r in job["spec"]["pytorchReplicaSpecs"].values()]
        for pod in pods:
            assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
            volumes = {v["name"]: v for v in pod["volumes"]}
            assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
            assert volumes["s3"]["secret"]["secretName"] == "peg-s3"
            assert volumes["config"]["configMap"]["name"] == configmap["metadata"]["name"]
            for container in pod["containers"]:
                sc = container["securityContext"]
                assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
                assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/etc/peg", "/dev/shm", "/etc/peg-s3"}


def test_paper_scale_gpus_and_scheduling(rendered):
    job = next(o for o in rendered["paper"] if o["kind"] == "PyTorchJob")
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 3
    pod = replicas["Worker"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert pod["priorityClassName"] == "training-high" and pod["tolerations"][0]["operator"] == "Exists"
    trainjob = next(o for o in rendered["paper"] if o["kind"] == "TrainJob")
    assert trainjob["spec"]["trainer"]["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == 8
    ray = next(o for o in rendered["paper"] if o["kind"] == "RayJob")
    group = ray["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert group["groupName"] == "gpu" and group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"cluster.gpus_per_node": 2}, "cluster.gpus_per_node: 2 GPUs asked with the CPU image"),
        ({"cluster.ray_worker_gpus": 1}, "cluster.ray_worker_gpus: 1 GPUs asked with the CPU image"),
        ({"name": "9-lives"}, "name: '9-lives' must be a DNS-1035 label"),
        ({"cluster.s3_secret": None}, "cluster.s3_secret: name the Secret"),
        ({"store.uri": "./artifacts"}, "store.uri: '.*artifacts' is a local path, which pods cannot share"),
        ({"batch.queries_per_step": 33}, r"batch.queries_per_step: 33 does not divide across the world size 2"),
        ({"cluster.runtime": " "}, "cluster.runtime: the TrainJob's ClusterTrainingRuntime name is empty"),
        ({"cluster.priority_class": "high"}, "cluster.priority_class: a TrainJob"),
    ],
)
def test_bad_input_fails_at_render_time_naming_the_key(overrides, key):
    cfg = k8s_quickstart(**overrides)
    with pytest.raises(RenderError, match=key):
        render_run(cfg)


# Fake credentials in their published shapes, built from parts so no scanner takes them for real ones.
AWS_KEY_ID = "AKIA" + "IOSFODNN7EXAMPLE"
GITHUB_TOKEN = "ghp" + "_" + "0123456789abcdefghijABCDEFGHIJ012345"
HF_TOKEN = "hf" + "_" + "abcdefghijklmnopqrstuvwxyzABCDEF"
JWT = "eyJ" + "hbGciOiJIUzI1NiJ9." + "eyJ" + "zdWIiOiIxMjM0NTY3ODkwIn0.c2lnbmF0dXJl"


@pytest.mark.parametrize(
    ("overrides", "key", "kind"),
    [
        ({"model.name_or_path": "https://user:hunter2@models.example.com/m"}, "model.name_or_path", "holds a URI with user:password@"),
        ({"data.beir": "beir:fiqa", "data.train_files": ["s3://me:pw@bucket/pairs.jsonl"]}, r"data.train_files\[0\]",
         "holds a URI with user:password@"),
        ({"cluster.env": {"HTTPS_PROXY": "http://proxyuser:proxypass@proxy.corp:3128"}}, "cluster.env.HTTPS_PROXY",
         "holds a URI with user:password@"),
        ({"cluster.env": {"AWS_ACCESS_KEY_ID": AWS_KEY_ID}}, "cluster.env.AWS_ACCESS_KEY_ID", "holds an AWS access key id"),
        ({"cluster.env": {"EXTRA": f"aws_secret_access_key={'x' * 40}"}}, "cluster.env.EXTRA", "holds an AWS secret access key"),
        ({"cluster.env": {"GH": GITHUB_TOKEN}}, "cluster.env.GH", "holds a GitHub token"),
        ({"cluster.env": {"HUB": HF_TOKEN}}, "cluster.env.HUB", "holds a Hugging Face token"),
        ({"cluster.env": {"AUTH": f"Bearer {JWT}"}}, "cluster.env.AUTH", "holds a JSON Web Token"),
        ({"cluster.env": {"HF_TOKEN": "anything"}}, "cluster.env.HF_TOKEN", "is named like a secret and has a literal value"),
        ({"cluster.env": {"DB_PASSWORD": "pw"}}, "cluster.env.DB_PASSWORD", "is named like a secret and has a literal value"),
        ({"model.name_or_path": "https://h.example.com/m.tar?X-Amz-Signature=abc&X-Amz-Credential=k"},
         "model.name_or_path", "holds a signed or token-carrying URL"),
        ({"model.name_or_path": "-----BEGIN RSA PRIVATE KEY-----"}, "model.name_or_path", "holds a private key"),
    ],
)
def test_an_inline_secret_in_any_rendered_field_is_refused_naming_the_key_never_the_value(overrides, key, kind):
    cfg = k8s_quickstart(**overrides)
    with pytest.raises(RenderError, match=f"{key}: {kind}") as refused:
        render_run(cfg)
    assert "cluster.s3_secret" in str(refused.value) and "Kubernetes Secret" in str(refused.value)
    for value in overrides.values():
        for secret in (value.values() if isinstance(value, dict) else [value] if isinstance(value, str) else value):
            assert secret not in str(refused.value)


@pytest.mark.parametrize(
    "overrides",
    [
        {"model.name_or_path": "sentence-transformers/all-MiniLM-L6-v2"},
        {"cluster.image": "ghcr.io/peg-dev/peg-trainer@sha256:" + "ab" * 32},
        {"cluster.env": {"HTTPS_PROXY": "http://proxy.corp:3128", "NCCL_DEBUG": "INFO", "TOKENIZERS_PARALLELISM": "false"}},
        {"cluster.env": {"HF_TOKEN": ""}},  # a name alone carries nothing
        {"data.beir": "beir:fiqa", "data.train_files": ["/data/pairs-0123456789abcdef0123456789abcdef01234567.jsonl"]},
    ],
)
def test_ordinary_values_are_not_taken_for_secrets(overrides):
    render_run(k8s_quickstart(**overrides))


def test_empty_runtime_is_a_config_error():
    from peg.config import ConfigError

    with pytest.raises(ConfigError, match="cluster.runtime"):
        k8s_quickstart(**{"cluster.runtime": ""})


def test_config_map_and_prepare_stage():
    cfg = k8s_quickstart()
    assert render_config_map(cfg)["metadata"] == {"name": "quickstart-config", "namespace": "peg", "labels": {"peg.dev/run": "quickstart"}}
    with pytest.raises(RenderError, match="stage prepare: it reads data.beir"):
        render_stage(cfg, "prepare")
    with pytest.raises(RenderError, match="'judge' is not enabled"):
        render_stage(cfg, "judge")


def test_pretrain_stage_renders_as_a_training_job_like_train():
    cfg = k8s_quickstart(**{"pretrain.enabled": True})
    [job] = render_stage(cfg, "pretrain")
    [train] = render_stage(cfg, "train")
    assert job["kind"] == train["kind"] != "RayJob"
    assert job["metadata"]["name"] != train["metadata"]["name"]
    assert job["spec"]["trainer"]["command"] == ["peg", "pipeline", "stage", "pretrain", CONFIG_PATH]


@pytest.mark.parametrize(
    ("obj", "phase"),
    [
        ({"kind": "RayJob"}, "pending"),
        ({"kind": "RayJob", "status": {"jobDeploymentStatus": "Initializing"}}, "pending"),
        ({"kind": "RayJob", "status": {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}}, "running"),
        ({"kind": "RayJob", "status": {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}}, "succeeded"),
        ({"kind": "RayJob", "status": {"jobDeploymentStatus": "Complete", "jobStatus": "FAILED"}}, "failed"),
        ({"kind": "RayJob", "status": {"jobDeploymentStatus": "Failed"}}, "failed"),
        ({"kind": "PyTorchJob", "status": {"conditions": [{"type": "Created", "status": "True"}]}}, "pending"),
        ({"kind": "PyTorchJob", "status": {"conditions": [{"type": "Running", "status": "True"}]}}, "running"),
        ({"kind": "PyTorchJob", "status": {"conditions": [{"type": "Running", "status": "False"},
                                                          {"type": "Succeeded", "status": "True"}]}}, "succeeded"),
        ({"kind": "PyTorchJob", "status": {"conditions": [{"type": "Failed", "status": "True"}]}}, "failed"),
        ({"kind": "TrainJob", "status": {"jobsStatus": [{"name": "node", "active": 0, "ready": 0}]}}, "pending"),
        ({"kind": "TrainJob", "status": {"jobsStatus": [{"name": "node", "active": 2, "ready": 2}]}}, "running"),
        ({"kind": "TrainJob", "status": {"conditions": [{"type": "Complete", "status": "True"}]}}, "succeeded"),
        ({"kind": "TrainJob", "status": {"conditions": [{"type": "Failed", "status": "True"}]}}, "failed"),
    ],
)
def test_job_phase(obj, phase):
    assert job_phase(obj) == phase


def test_cli_render_writes_files_and_bad_input_is_one_line_exit_2(tmp_path):
    from typer.testing import CliRunner

    from peg.cli import app

    runner = CliRunner()
    out = tmp_path / "out"
    result = runner.invoke(app, ["render", str(REPO / "manifests" / "run.yaml"), "-o", str(out), "--stage", "train",
                                 "--set", "cluster.trainer_api=pytorchjob"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["00-config-configmap.yaml", "01-train-pytorchjob.yaml"]
    assert (out / "01-train-pytorchjob.yaml").read_text().startswith(
        "# PyTorchJob quickstart-train: runs `peg pipeline stage train /etc/peg/run.yaml`"
    )
    result = runner.invoke(app, ["render", str(REPO / "manifests" / "run.yaml"), "--set", "cluster.gpus_per_node=2"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "cluster.gpus_per_node: 2 GPUs asked with the CPU image" in lines[0]
