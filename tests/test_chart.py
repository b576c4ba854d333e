"""charts/peg with the real Helm library: lint, render with default / kind (bundled S3) / GPU
values, the platform facts the chart writes into the run config, its clear failures, and the
bundled S3 server's and `helm test` pod's commands run for real against this machine."""

from __future__ import annotations

import asyncio
import base64
import copy
import importlib.util
import json
import os
import re
import subprocess
import time
import tomllib
from pathlib import Path

import helm_python as helm
import kmock
import pytest
import yaml
from chart_render import (
    ALL_APIS,
    CHART,
    KUBE_VERSION,
    PYTORCHJOB,
    RAYJOB,
    TRAINJOB,
    by_kind,
    ci_values,
    objects,
    render,
    render_against,
)
from k8s_validation import CHECKOV, CHECKOV_SKIPS, checkov_failures, validate_object
from minio import Minio
from s3server import free_ports, weed_binary

from peg.config import ClusterConfig, parse_config
from peg.k8s.render import render_run
from peg.k8s.vocabulary import JOB_KINDS

ROOT = Path(__file__).resolve().parents[1]
TINY_RUN = {"name": "tiny", "model": {"name_or_path": "sentence-transformers/all-MiniLM-L6-v2"}}
# checkov checks skipped on the chart beyond k8s_validation's batch-job ones; each exception is
# narrowed to the pods that need it by a test of its own.
CHART_CHECKOV_SKIPS = {
    **CHECKOV_SKIPS,
    "CKV_K8S_38": "service account token: the launcher and helm-test pods call the Kubernetes API "
    "(test_only_the_api_clients_mount_a_token)",
    "CKV_K8S_35": "secrets as environment variables: SeaweedFS reads its admin keys from nowhere else "
    "(test_chart_pods_read_s3_keys_from_files_except_the_s3_server)",
}


def kind_with_run(run: dict | None = None) -> dict:
    return {**ci_values("kind"), "run": run or TINY_RUN}


def value_sets() -> dict[str, dict]:
    """The values every validation renders: defaults, kind with a run, GPU, persistent S3 with the operator."""
    persistent = ci_values("kind")
    persistent["seaweedfs"]["persistence"] = {"enabled": True, "size": "5Gi", "storageClass": "standard"}
    persistent["operator"] = {"enabled": True}
    return {"default": {}, "kind": kind_with_run(), "gpu": ci_values("gpu"), "persistent": persistent}


def run_config(docs: list[dict]) -> dict:
    """The run config the launcher reads (the ConfigMap's run.yaml)."""
    (config_map,) = by_kind(docs, "ConfigMap")
    return yaml.safe_load(config_map["data"]["run.yaml"])


def render_fails(values: dict, api_versions=ALL_APIS) -> str:
    with pytest.raises(helm.HelmRenderError) as err:
        render(values, api_versions=api_versions)
    return str(err.value)


@pytest.mark.parametrize("values_name", ["default", "kind", "gpu", "persistent"])
def test_lint_strict_is_clean(values_name):
    values = value_sets()[values_name] or None
    report = helm.lint(CHART, values, strict=True, kube_version=KUBE_VERSION)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], report


def test_default_values_install_the_platform_only():
    docs = objects(render())
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in docs)
    assert kinds == [
        ("Pod", "demo-peg-test"),
        ("Role", "demo-peg-launcher"),
        ("RoleBinding", "demo-peg-launcher"),
        ("ServiceAccount", "demo-peg-job"),
        ("ServiceAccount", "demo-peg-launcher"),
    ]
    assert all(d["metadata"]["namespace"] == "ml" for d in docs)
    (job_account,) = [d for d in by_kind(docs, "ServiceAccount") if d["metadata"]["name"] == "demo-peg-job"]
    assert job_account["automountServiceAccountToken"] is False


# kubernetes client method prefix -> RBAC verb
CLIENT_VERBS = {"create": "create", "get": "get", "read": "get", "list": "list", "replace": "update",
                "patch": "patch", "delete": "delete"}  # fmt: skip


def backend_api_calls() -> set[tuple[str, str, str]]:
    """(API group, resource, verb) of every Kubernetes call in peg's cluster backend."""
    source = (ROOT / "peg" / "k8s" / "backend.py").read_text()
    calls = set()
    for client, method in re.findall(r"self\.(core|custom)\.(\w+_namespaced_\w+)", source):
        verb, _, resource = method.partition("_namespaced_")
        if client == "custom":
            assert resource == "custom_object", method
            calls |= {(k.group, k.plural, CLIENT_VERBS[verb]) for k in JOB_KINDS}
        else:
            plural = {"config_map": "configmaps", "pod": "pods", "pod_log": "pods/log"}[resource]
            calls.add(("", plural, CLIENT_VERBS[verb]))
    return calls


def test_rbac_grants_exactly_the_backends_calls_in_this_namespace():
    docs = objects(render())
    assert not by_kind(docs, "ClusterRole") and not by_kind(docs, "ClusterRoleBinding")
    (role,) = by_kind(docs, "Role")
    granted = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    assert granted == backend_api_calls()
    assert ("", "pods/log", "get") in granted and not any(r == "secrets" for _, r, _ in granted)
    (binding,) = by_kind(docs, "RoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "demo-peg-launcher", "namespace": "ml"}]


def test_bundled_s3_server_and_its_generated_keys():
    docs = objects(render(ci_values("kind")))
    (secret,) = by_kind(docs, "Secret")
    assert secret["metadata"]["name"] == "demo-peg-s3-credentials"
    keys = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert set(keys) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert len(keys["AWS_SECRET_ACCESS_KEY"]) == 40 and keys["AWS_ACCESS_KEY_ID"].startswith("PEG")
    (deployment,) = by_kind(docs, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "chrislusf/seaweedfs:4.48"
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}
    assert refs == {k: {"name": "demo-peg-s3-credentials", "key": k} for k in keys}
    (service,) = by_kind(docs, "Service")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["port"] == 8333
    # off by default: no server, no generated Secret
    assert not {"Secret", "Deployment", "Service"} & {d["kind"] for d in objects(render())}


def test_bundled_s3_image_is_the_server_version_the_tests_run():
    version = subprocess.run([weed_binary(), "version"], capture_output=True, text=True).stdout.split()
    assert yaml.safe_load((CHART / "values.yaml").read_text())["seaweedfs"]["image"]["tag"] in version


def test_an_upgrade_keeps_the_generated_s3_keys():
    """The chart `lookup`s its Secret: against a live API (kmock's in-process Kubernetes emulator
    on 127.0.0.1) a second render reuses the keys the first one generated, so an upgrade never
    locks the run out of the data the bundled server holds."""

    async def scenario() -> tuple[dict, dict, dict]:
        async with kmock.KubernetesEmulator() as k8s, kmock.Server(k8s) as server:
            for path, kind in [("v1/secrets", "Secret"), ("v1/namespaces", "Namespace")]:
                resource = k8s.resources[path]
                resource.kind, resource.namespaced = kind, kind == "Secret"
                resource.verbs = {"get", "list", "watch", "create", "patch", "update", "delete"}
            kubeconfig = yaml.safe_dump({
                "apiVersion": "v1", "kind": "Config", "current-context": "c",
                "clusters": [{"name": "k", "cluster": {"server": str(server.url)}}],
                "users": [{"name": "u", "user": {"token": "x"}}],
                "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
            })  # fmt: skip

            def secret() -> dict:
                return yaml.safe_load(render_against(kubeconfig, ci_values("kind"))["peg/templates/s3-secret.yaml"])

            first, other = await asyncio.to_thread(secret), await asyncio.to_thread(secret)
            from kubernetes import client

            api = client.CoreV1Api(client.ApiClient(client.Configuration(host=str(server.url))))
            await asyncio.to_thread(api.create_namespaced_secret, "ml", first)  # what the install created
            return first, other, await asyncio.to_thread(secret)

    first, other, upgrade = asyncio.run(scenario())
    assert other["data"] != first["data"]  # no Secret yet: fresh random keys each time
    assert upgrade["data"] == first["data"]


def test_persistence_keeps_the_s3_data_in_a_claim():
    values = ci_values("kind")
    values["seaweedfs"]["persistence"] = {"enabled": True, "size": "5Gi", "storageClass": "standard"}
    docs = objects(render(values))
    (claim,) = by_kind(docs, "PersistentVolumeClaim")
    assert claim["spec"]["resources"]["requests"]["storage"] == "5Gi"
    assert claim["spec"]["storageClassName"] == "standard"
    volumes = by_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]["volumes"]
    assert {"name": "data", "persistentVolumeClaim": {"claimName": claim["metadata"]["name"]}} in volumes


def test_run_values_start_a_launcher_with_the_run_config():
    docs = objects(render(kind_with_run(), revision=3))
    (job,) = by_kind(docs, "Job")
    assert job["metadata"]["name"] == "demo-peg-launch-r3"
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["peg", "pipeline", "run", "/etc/peg/run.yaml", "--backend", "k8s", "--wait", "600"]
    assert job["spec"]["podReplacementPolicy"] == "Failed"
    assert container["image"] == "ghcr.io/peg-dev/peg-trainer:0.1.0-cpu"
    assert pod["serviceAccountName"] == "demo-peg-launcher"
    s3_volume = {"name": "s3-credentials", "secret": {"secretName": "demo-peg-s3-credentials", "defaultMode": 0o440}}
    assert s3_volume in pod["volumes"]
    assert {"name": "s3-credentials", "mountPath": "/etc/peg-s3", "readOnly": True} in container["volumeMounts"]
    (config_map,) = by_kind(docs, "ConfigMap")
    assert {"name": "run-config", "configMap": {"name": config_map["metadata"]["name"]}} in pod["volumes"]
    assert job["spec"]["activeDeadlineSeconds"] == 3600


def test_chart_fills_the_platform_facts_into_the_run_config():
    config = run_config(objects(render(kind_with_run())))
    assert config["name"] == "tiny"
    assert config["model"] == TINY_RUN["model"]
    assert config["cluster"] == {
        "namespace": "ml",
        "image": "ghcr.io/peg-dev/peg-trainer:0.1.0-cpu",
        "ray_image": "ghcr.io/peg-dev/peg-ray:0.1.0-cpu",
        "image_pull_policy": "IfNotPresent",
        "service_account": "demo-peg-job",
        "s3_secret": "demo-peg-s3-credentials",
        "run_as_user": 10001,
    }
    assert config["store"] == {
        "endpoint": "demo-peg-s3.ml.svc:8333",
        "secure": False,
        "uri": "s3://peg/tiny",
        "credentials_file": "/etc/peg-s3",  # the launcher's mounted Secret
    }
    # without a name the run is named after the release
    assert run_config(objects(render(kind_with_run({"model": TINY_RUN["model"]}))))["name"] == "demo"


def test_keys_the_run_sets_win_over_the_chart_defaults():
    run = {
        **TINY_RUN,
        "cluster": {"service_account": "mine", "image": "registry.example/peg:1", "s3_secret": "other"},
        "store": {"uri": "s3://elsewhere/x", "endpoint": "s3.example:443", "secure": True},
    }
    config = run_config(objects(render(kind_with_run(run))))
    assert {k: config["cluster"][k] for k in run["cluster"]} == run["cluster"]
    assert config["store"] == {**run["store"], "credentials_file": "/etc/peg-s3"}


def test_gpu_values_schedule_the_run_on_gpu_nodes_with_the_existing_secret():
    values = ci_values("gpu")
    docs = objects(render(values))
    assert not by_kind(docs, "Secret") and not by_kind(docs, "Deployment")
    cluster = run_config(docs)["cluster"]
    assert cluster["node_selector"] == {"nvidia.com/gpu.present": "true"}
    assert cluster["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert cluster["s3_secret"] == "peg-s3" and cluster["gpus_per_node"] == 8
    assert "priority_class" not in cluster  # "" in values: unset
    store = run_config(docs)["store"]
    assert store == {
        "endpoint": "s3.us-east-1.amazonaws.com",
        "secure": True,
        "uri": "s3://my-team-peg/fiqa-peg",
        "credentials_file": "/etc/peg-s3",
    }
    (job,) = by_kind(docs, "Job")
    pod = job["spec"]["template"]["spec"]
    assert "nodeSelector" not in pod and "tolerations" not in pod  # the launcher needs no GPU node
    assert {"name": "s3-credentials", "secret": {"secretName": "peg-s3", "defaultMode": 0o440}} in pod["volumes"]


def test_toleration_seconds_become_the_run_configs_snake_case():
    values = kind_with_run()
    values["scheduling"] = {
        "tolerations": [{"key": "gpu", "operator": "Equal", "value": "a100", "effect": "NoExecute", "tolerationSeconds": 60}]
    }
    (toleration,) = run_config(objects(render(values)))["cluster"]["tolerations"]
    assert toleration == {"key": "gpu", "operator": "Equal", "value": "a100", "effect": "NoExecute", "toleration_seconds": 60}


def test_missing_crds_fail_with_what_to_install():
    message = render_fails({}, api_versions=())
    assert "RayJob (ray.io/v1): install KubeRay" in message
    assert "TrainJob (trainer.kubeflow.org/v1alpha1) or PyTorchJob (kubeflow.org/v1)" in message
    # the platform alone needs one of the two training APIs
    render({}, api_versions=(PYTORCHJOB, RAYJOB))
    render({}, api_versions=(TRAINJOB, RAYJOB))
    assert "TrainJob" not in render_fails({}, api_versions=(TRAINJOB,))


def test_missing_crd_of_the_runs_trainer_api_fails():
    assert ClusterConfig.model_fields["trainer_api"].default == "trainjob"  # what "peg.trainerApi" assumes
    message = render_fails(kind_with_run(), api_versions=(PYTORCHJOB, RAYJOB))
    assert "TrainJob (trainer.kubeflow.org/v1alpha1), which run.cluster.trainer_api=trainjob uses" in message
    assert "RayJob" not in message
    run = {**TINY_RUN, "cluster": {"trainer_api": "pytorchjob"}}
    message = render_fails(kind_with_run(run), api_versions=(TRAINJOB, RAYJOB))
    assert "PyTorchJob (kubeflow.org/v1), which run.cluster.trainer_api=pytorchjob uses" in message
    render(kind_with_run(run), api_versions=(PYTORCHJOB, RAYJOB))


def test_crd_check_can_be_turned_off_for_offline_templating():
    docs = objects(render({**kind_with_run(), "checkCRDs": False}, api_versions=()))
    assert by_kind(docs, "Job")


def test_a_run_without_s3_keys_fails_naming_existing_secret():
    message = render_fails({"run": TINY_RUN})
    assert "s3.existingSecret is required" in message
    docs = objects(render({"run": TINY_RUN, "s3": {"existingSecret": "team-s3", "endpoint": "s3.example:443"}}))
    assert run_config(docs)["cluster"]["s3_secret"] == "team-s3"


def test_run_namespace_other_than_the_release_fails():
    message = render_fails(kind_with_run({**TINY_RUN, "cluster": {"namespace": "other"}}))
    assert 'run.cluster.namespace is "other" but the release is in "ml"' in message


def test_every_chart_pod_is_pss_restricted():
    docs = objects(render(kind_with_run()))
    pods = [d["spec"] for d in by_kind(docs, "Pod")]
    pods += [d["spec"]["template"]["spec"] for d in docs if d["kind"] in ("Job", "Deployment")]
    assert len(pods) == 3
    for pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"] == {"drop": ["ALL"]}
            assert context["readOnlyRootFilesystem"] is True
            assert "limits" in container["resources"]


def test_notes_name_the_launch_and_the_s3_server():
    notes = render(kind_with_run(), revision=2)["peg/templates/NOTES.txt"]
    assert "kubectl -n ml logs -f job/demo-peg-launch-r2" in notes
    assert "port-forward svc/demo-peg-s3 8333:8333" in notes
    assert "store s3://peg/tiny" in notes


# --- the rendered commands, run for real -------------------------------------------------------


@pytest.fixture(scope="module")
def bundled_s3(tmp_path_factory):
    """The bundled server's rendered container command and Secret, run with this machine's
    `weed` (the image's version): only the data dir, the bind address and ports are remapped."""
    root = tmp_path_factory.mktemp("bundled-s3")
    docs = objects(render(ci_values("kind")))
    (container,) = by_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"]
    keys = {k: base64.b64decode(v).decode() for k, v in by_kind(docs, "Secret")[0]["data"].items()}
    master, volume, filer, s3, admin = free_ports(5)
    remap = {"-dir": str(root), "-ip.bind": "127.0.0.1", "-s3.port": str(s3)}
    args = [re.sub(r"^(-[\w.]+)=.*$", lambda m: f"{m[1]}={remap[m[1]]}" if m[1] in remap else m[0], a) for a in container["args"]]
    args += [f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}", f"-admin.port={admin}",
             f"-filer.localSocket={root / 'filer.sock'}"]  # fmt: skip
    env = {**os.environ, "TMPDIR": str(root)}
    env.update({e["name"]: keys[e["valueFrom"]["secretKeyRef"]["key"]] for e in container["env"]})
    log = open(root / "weed.log", "wb")
    process = subprocess.Popen([weed_binary(), *args], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root)
    endpoint = f"127.0.0.1:{s3}"
    client = Minio(endpoint, access_key=keys["AWS_ACCESS_KEY_ID"], secret_key=keys["AWS_SECRET_ACCESS_KEY"], secure=False)
    deadline = time.monotonic() + 60
    while True:
        assert process.poll() is None, (root / "weed.log").read_text()[-2000:]
        try:
            if client.bucket_exists("peg"):
                break
        except Exception:
            pass
        assert time.monotonic() < deadline, "bundled S3 not ready in 60 s"
        time.sleep(0.2)
    yield endpoint, keys, client
    process.kill()
    process.wait()
    log.close()


def test_bundled_s3_command_serves_the_bucket_with_the_secrets_keys_only(bundled_s3):
    endpoint, keys, client = bundled_s3
    assert [b.name for b in client.list_buckets()] == ["peg"]
    wrong = Minio(endpoint, access_key=keys["AWS_ACCESS_KEY_ID"], secret_key="x" * 40, secure=False)
    with pytest.raises(Exception, match="SignatureDoesNotMatch"):
        wrong.bucket_exists("peg")
    anonymous = subprocess.run(["curl", "-s", f"http://{endpoint}/peg"], capture_output=True, text=True)
    assert "AccessDenied" in anonymous.stdout


def smoke_test(monkeypatch, capsys, tmp_path, endpoint: str, secret: dict[str, str], **store) -> tuple[int, str, str]:
    """The `helm test` pod's command (its `python -c` script, run in this process) with its
    rendered environment; the Secret is written as files, as its volume mounts it; `endpoint`
    and `store` replace what the pod would reach in the cluster: (exit code, stdout, stderr)."""
    (pod,) = by_kind(objects(render(ci_values("kind"))), "Pod")
    (container,) = pod["spec"]["containers"]
    assert container["command"][:2] == ["python", "-c"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert "envFrom" not in container and "valueFrom" not in str(container["env"])
    checked = env["PEG_CHECK_RESOURCES"].split(",")
    assert sorted(checked) == sorted([f"{k.group}/{k.plural}" for k in JOB_KINDS] + ["/configmaps"])
    keys_dir = tmp_path / "peg-s3"
    keys_dir.mkdir(exist_ok=True)
    for name, value in secret.items():
        (keys_dir / name).write_text(value)
    probe = json.loads(env["PEG_STORE"])
    assert probe["credentials_file"] == "/etc/peg-s3" and probe["uri"] == "s3://peg/.peg-helm-test"
    probe.update(endpoint=endpoint, credentials_file=str(keys_dir), **store)
    env.update(PEG_STORE=json.dumps(probe), PEG_CHECK_RESOURCES="")  # no API server here: RBAC needs a cluster
    with monkeypatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        for name in secret:
            patch.delenv(name, raising=False)
        script = {"__name__": "helm_smoke_test"}
        exec(compile(container["command"][2], "files/smoke_test.py", "exec"), script)
        code = script["main"]()
    out = capsys.readouterr()
    return code, out.out, out.err


def test_helm_test_pod_checks_the_store_with_the_secret(bundled_s3, monkeypatch, capsys, tmp_path):
    endpoint, keys, client = bundled_s3
    code, out, err = smoke_test(monkeypatch, capsys, tmp_path, endpoint, keys)
    assert code == 0, err
    assert f"store: S3 store http://{endpoint} bucket 'peg' prefix '.peg-helm-test': write, read and delete ok" in out
    assert not list(client.list_objects("peg", prefix=".peg-helm-test", recursive=True))
    wrong = {**keys, "AWS_SECRET_ACCESS_KEY": "x" * 40}
    code, out, err = smoke_test(monkeypatch, capsys, tmp_path, endpoint, wrong)
    assert code == 1 and "FAILED store:" in err and "SignatureDoesNotMatch" in err, err
    code, out, err = smoke_test(monkeypatch, capsys, tmp_path, endpoint, keys, uri="s3://nope/x")
    assert code == 1 and "FAILED store:" in err and "nope" in err, err


def test_chart_pods_read_s3_keys_from_files_except_the_s3_server():
    """Only SeaweedFS gets the keys as environment variables: it reads its admin keys nowhere
    else (besides an identities file the chart cannot build from an existing Secret)."""
    docs = objects(render(kind_with_run()))
    for doc in docs:
        if doc["kind"] in ("Pod", "Job", "Deployment"):
            spec = doc["spec"] if doc["kind"] == "Pod" else doc["spec"]["template"]["spec"]
            uses_env = "secretKeyRef" in json.dumps(spec) or "envFrom" in json.dumps(spec)
            assert uses_env == (doc["kind"] == "Deployment"), doc["metadata"]["name"]


def test_values_schema_rejects_a_misspelt_platform_value():
    with pytest.raises(helm.HelmValuesError, match="additional properties 'enabld' not allowed"):
        render({"seaweedfs": {"enabld": True}})
    with pytest.raises(helm.HelmValuesError, match="/image/pullPolicy"):
        render({"image": {"repository": "x", "pullPolicy": "Sometimes"}})


# --- every object validates; the scanners pass; the schema is RunConfig's -----------------------


@pytest.mark.parametrize("values_name", ["default", "kind", "gpu", "persistent"])
def test_every_rendered_object_validates(values_name):
    docs = objects(render(value_sets()[values_name]))
    errors = {f"{d['kind']}/{d['metadata']['name']}": validate_object(d) for d in docs}
    assert {k: e for k, e in errors.items() if e} == {}


def test_validation_rejects_broken_chart_objects():
    docs = objects(render(kind_with_run()))
    job = copy.deepcopy(by_kind(docs, "Job")[0])
    job["spec"]["template"]["spec"]["containers"][0]["comand"] = ["peg"]  # misspelt: the API would drop it
    assert any("comand" in e for e in validate_object(job))
    deployment = copy.deepcopy(by_kind(docs, "Deployment")[0])
    deployment["spec"]["replicas"] = "one"
    assert validate_object(deployment)


@pytest.mark.parametrize("values_name", ["kind", "gpu"])
def test_the_chart_run_config_renders_valid_jobs(values_name):
    """What the launcher does first, offline: the chart's run.yaml is a RunConfig that peg's
    renderers turn into jobs, each valid against its CRD schema."""
    config = parse_config(yaml.safe_dump(run_config(objects(render(value_sets()[values_name])))), "run.yaml")
    jobs = render_run(config)
    assert {"TrainJob", "RayJob"} <= {j["kind"] for j in jobs}
    assert all(j["metadata"]["namespace"] == "ml" for j in jobs)
    assert {j["kind"]: validate_object(j) for j in jobs if validate_object(j)} == {}


@pytest.mark.slow
def test_checkov_passes_the_chart_and_rejects_an_unrestricted_pod():
    if not CHECKOV.exists():
        pytest.skip("checkov is not installed in .venv-tools (scripts/setup.sh installs it)")
    docs = []
    for name, values in value_sets().items():
        docs += objects(render(values, name=name))
    broken = copy.deepcopy(next(d for d in docs if d["kind"] == "Job"))
    broken["metadata"]["name"] = "broken"
    pod = broken["spec"]["template"]["spec"]
    del pod["securityContext"]
    pod["containers"][0]["securityContext"] = {"privileged": True, "allowPrivilegeEscalation": True}
    failures = checkov_failures(docs + [broken], skip=CHART_CHECKOV_SKIPS)
    assert [f for f in failures if "broken-" not in f] == []
    assert any(f.startswith("CKV_K8S_16 ") for f in failures)  # privileged container
    assert any(f.startswith("CKV_K8S_20 ") for f in failures)  # privilege escalation


def test_only_the_api_clients_mount_a_token():
    docs = objects(render({**kind_with_run(), "operator": {"enabled": True}}))
    pods = {d["metadata"]["name"]: d["spec"] for d in by_kind(docs, "Pod")}
    pods.update({d["metadata"]["name"]: d["spec"]["template"]["spec"] for d in docs if d["kind"] in ("Job", "Deployment")})
    mounts_token = {name for name, spec in pods.items() if spec.get("automountServiceAccountToken", True)}
    assert mounts_token == {"demo-peg-launch-r1", "demo-peg-test", "demo-peg-operator"}


def load_schema_generator():
    spec = importlib.util.spec_from_file_location("chart_schema", ROOT / "scripts" / "chart_schema.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_values_schema_run_part_is_generated_from_runconfig(tmp_path, monkeypatch):
    generator = load_schema_generator()
    committed = (CHART / "values.schema.json").read_text()
    assert generator.generate(json.loads(committed)) == committed, "run: python scripts/chart_schema.py"
    assert generator.main(["--check"]) == 0
    stale = json.loads(committed)
    del stale["properties"]["run"]["then"]["properties"]["cluster"]["properties"]["trainer_api"]
    monkeypatch.setattr(generator, "SCHEMA_FILE", tmp_path / "values.schema.json")
    generator.SCHEMA_FILE.write_text(json.dumps(stale, indent=2) + "\n")
    assert generator.main(["--check"]) == 1
    assert generator.main([]) == 0 and generator.SCHEMA_FILE.read_text() == committed


def test_values_schema_accepts_every_example_run_config():
    examples = sorted((ROOT / "examples").glob("*.yaml"))
    assert len(examples) >= 4
    with helm.Chart.load(CHART) as chart:
        for example in examples:
            chart.validate_schema({"run": yaml.safe_load(example.read_text())})


@pytest.mark.parametrize(
    ("run", "error"),
    [
        ({**TINY_RUN, "trian": {}}, "at '/run': additional properties 'trian' not allowed"),
        ({"name": "x"}, "at '/run': missing property 'model'"),
        ({**TINY_RUN, "batch": {"queries_per_step": "many"}}, "at '/run/batch/queries_per_step': got string, want integer"),
        ({**TINY_RUN, "cluster": {"trainer_api": "mpijob"}}, "/run/cluster/trainer_api"),
    ],
)
def test_values_schema_rejects_what_peg_rejects(run, error):
    with pytest.raises(helm.HelmValuesError, match=re.escape(error)):
        render(kind_with_run(run))
    with pytest.raises(ValueError):
        parse_config(yaml.safe_dump(run))


def test_chart_app_version_is_peg_version_the_images_are_tagged_with():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert chart["appVersion"] == version  # image tags default to appVersion; images/build.sh tags this
    docs = objects(render(kind_with_run({**TINY_RUN, "cluster": {}})))
    config = run_config(docs)
    assert config["cluster"]["image"] == f"ghcr.io/peg-dev/peg-trainer:{version}-cpu"
    assert ClusterConfig.model_fields["image"].default.rsplit(":", 1) == ["ghcr.io/peg-dev/peg-trainer", version]


@pytest.mark.parametrize("beir", ["s3://my-team-peg/datasets/msmarco", "https://example.org/beir/fiqa.zip"])
def test_a_url_as_data_beir_fails_the_install_with_what_to_do(beir):
    """Issue 35 finding 7: the launcher's prepare reads data.beir as a folder in its pod; a URL
    there failed at run time, after the install; now the install says what to use instead."""
    message = render_fails(kind_with_run({**TINY_RUN, "data": {"beir": beir}}))
    assert f"run.data.beir: {beir} is a URL" in message and "beir:NAME" in message
    render(kind_with_run({**TINY_RUN, "data": {"beir": "beir:fiqa"}}))


def test_a_rescheduled_or_upgraded_launcher_takes_over_the_gone_holders_lease(tmp_path):
    """Issue 35 finding 9: a launcher whose predecessor is gone (pod deleted by `helm upgrade` or
    lost with its node; its lease no longer renewed) waits `launcher.leaseWaitSeconds`, longer than
    the lease lives, and takes the run over; before, it gave up at once (LeaseHeld) while the lease
    of the gone pod had not expired yet."""
    from peg.config import StoreConfig
    from peg.store import open_store
    from peg.store.lease import Lease, LeaseHeld, read_lease

    store = open_store(StoreConfig(uri=str(tmp_path)))
    gone = json.dumps({"owner": "r1", "host": "demo-peg-launch-r1-x7k2p", "pid": 7, "command": "peg pipeline run",
                       "acquired": "2026-12-06T20:00:00+00:00", "expires": time.time() + 2}).encode()
    assert store.create_object("tiny/_lease.json", gone) is not None
    with pytest.raises(LeaseHeld, match="demo-peg-launch-r1"):
        Lease(store, "tiny", ttl=60).acquire(wait=0)  # what the launcher did without --wait
    wait = int(yaml.safe_load((CHART / "values.yaml").read_text())["launcher"]["leaseWaitSeconds"])
    assert wait > 2 * StoreConfig.model_fields["lease_seconds"].default  # outlives a gone holder's lease
    successor = Lease(store, "tiny", ttl=60)
    successor.acquire(wait=10)
    try:
        assert read_lease(store, "tiny").owner == successor.owner
    finally:
        successor.release()
