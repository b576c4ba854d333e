"""Offline validation of Kubernetes objects (no API server): reused by the render, manifests and chart tests.

- built-in kinds: `kubernetes_validate` (the API's OpenAPI schemas, strict: unknown fields fail);
- custom resources: the openAPIV3Schema of the vendored CRDs in ../shared/crds (TrainJob and
  ClusterTrainingRuntime: Kubeflow Trainer v2.3.0; PyTorchJob: v1.9.4; RayJob/RayCluster: KubeRay
  v1.7.0), with unknown fields rejected (the API server would silently prune them);
- security: checkov's Kubernetes checks on every pod a resource creates, custom resources
  included (checkov only knows built-in kinds, so each pod template is scanned as a Pod).

Not done offline: CEL rules (x-kubernetes-validations), admission webhooks, defaulting beyond
"a required field with a default may be omitted", and whether the operators accept the objects.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path

from shared_data import shared_dir

import jsonschema
import yaml

REPO = Path(__file__).resolve().parents[1]
CHECKOV = REPO / ".venv-tools" / "bin" / "checkov"
KUBERNETES_VERSION = "1.33"

CRD_FILES = {
    ("trainer.kubeflow.org/v1alpha1", "TrainJob"): "trainer.kubeflow.org_trainjobs.yaml",
    ("trainer.kubeflow.org/v1alpha1", "ClusterTrainingRuntime"): "trainer.kubeflow.org_clustertrainingruntimes.yaml",
    ("trainer.kubeflow.org/v1alpha1", "TrainingRuntime"): "trainer.kubeflow.org_trainingruntimes.yaml",
    ("kubeflow.org/v1", "PyTorchJob"): "pytorchjobs.kubeflow.org.yaml",
    ("ray.io/v1", "RayJob"): "rayjobs.ray.io.yaml",
    ("ray.io/v1", "RayCluster"): "rayclusters.ray.io.yaml",
    ("peg.dev/v1alpha1", "EmbeddingPipeline"): REPO / "charts" / "peg" / "crds" / "embeddingpipelines.peg.dev.yaml",
}

# Checks skipped for batch jobs, each with its reason (documented in manifests/README.md):
CHECKOV_SKIPS = {
    "CKV_K8S_8": "liveness probe: a batch job's process exits when done; a probe would only restart it",
    "CKV_K8S_9": "readiness probe: job pods serve no traffic",
    "CKV_K8S_15": "imagePullPolicy Always: kind loads images locally (IfNotPresent/Never); the policy is a config key",
    "CKV2_K8S_6": "NetworkPolicy: pods must reach the S3 endpoint and each other (NCCL, Ray); the namespace policy is the cluster admin's",
    "CKV_K8S_43": "image digest: images are built per release; pin a digest in cluster.image where required",
}


def _strict(schema: dict) -> dict:
    """Required fields with a default may be omitted (the API server defaults first); unknown
    fields fail (the API server would prune them, silently dropping a misspelt setting)."""
    if isinstance(schema, dict):
        props = schema.get("properties")
        if "required" in schema and props:
            schema["required"] = [r for r in schema["required"] if "default" not in props.get(r, {})]
        if props is not None and "additionalProperties" not in schema and not schema.get(
            "x-kubernetes-preserve-unknown-fields"
        ):
            schema["additionalProperties"] = False
        if schema.get("nullable"):
            schema.pop("nullable")
            if isinstance(schema.get("type"), str):
                schema["type"] = [schema["type"], "null"]
        for value in schema.values():
            _strict(value)
    elif isinstance(schema, list):
        for value in schema:
            _strict(value)
    return schema


@functools.cache
def _crd_openapi_schema(api_version: str, kind: str) -> dict:
    text = (shared_dir() / "crds" / CRD_FILES[(api_version, kind)]).read_text()  # an absolute path stays
    crd = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # libyaml: ~8x faster on MB-sized CRDs
    version = api_version.rsplit("/", 1)[1]
    entry = next(v for v in crd["spec"]["versions"] if v["name"] == version)
    return entry["schema"]["openAPIV3Schema"]


@functools.cache
def crd_schema(api_version: str, kind: str) -> dict:
    """The CRD's openAPIV3Schema for `api_version` / `kind` (vendored in ../shared/crds, or peg's own
    under charts/peg/crds), made strict."""
    schema = _strict(copy.deepcopy(_crd_openapi_schema(api_version, kind)))
    schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta: see metadata_errors
    return schema


def as_stored(doc: dict) -> dict:
    """`doc` as the API server stores a custom resource it accepts: unknown fields pruned, then the
    schema's defaults filled in (k8s.io/apiextensions-apiserver pkg/apiserver/schema/pruning/
    algorithm.go, Prune; .../schema/defaulting/algorithm.go, Default): a missing property, or a null
    one not declared nullable, gets its `default`, and defaulting recurses into what it filled in.
    The root's apiVersion, kind and metadata are the API server's own and stay as they are."""
    schema = _crd_openapi_schema(doc["apiVersion"], doc["kind"])
    own = ("apiVersion", "kind", "metadata")
    body = {**schema, "properties": {k: v for k, v in schema.get("properties", {}).items() if k not in own}}
    pruned = _prune({k: v for k, v in copy.deepcopy(doc).items() if k not in own}, body)
    return _default({**{k: copy.deepcopy(doc[k]) for k in own if k in doc}, **pruned}, body)


def _prune(value, schema: dict):
    if isinstance(value, dict) and not schema.get("x-kubernetes-preserve-unknown-fields"):
        props, extra = schema.get("properties"), schema.get("additionalProperties")
        if props is not None or isinstance(extra, dict):
            return {k: _prune(v, props[k] if props and k in props else extra) for k, v in value.items()
                    if (props and k in props) or isinstance(extra, dict)}
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [_prune(v, schema["items"]) for v in value]
    return value


def _default(value, schema: dict):
    if isinstance(value, dict):
        for key, prop in (schema.get("properties") or {}).items():
            if "default" in prop and (key not in value or (value[key] is None and not prop.get("nullable"))):
                value[key] = copy.deepcopy(prop["default"])
        for key, v in value.items():
            prop = (schema.get("properties") or {}).get(key, schema.get("additionalProperties"))
            if isinstance(prop, dict):
                _default(v, prop)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for v in value:
            _default(v, schema["items"])
    return value


DNS_1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
NAME_RULES = {  # kind: (pattern, max length) beyond ObjectMeta's DNS-1123 subdomain
    "RayJob": (DNS_1035, 47),  # KubeRay derives the cluster and submitter names from it
    "TrainJob": (DNS_1035, 63),  # the CRD's CEL rule
    "PyTorchJob": (DNS_1035, 63),  # pod and service names derive from it
}


def metadata_errors(doc: dict) -> list[str]:
    """Name and label rules the API server enforces outside the OpenAPI schema."""
    meta = doc.get("metadata") or {}
    name = meta.get("name") or ""
    errors = []
    pattern, max_len = NAME_RULES.get(doc.get("kind"), (DNS_1123_SUBDOMAIN, 253))
    if not pattern.match(name) or len(name) > max_len:
        errors.append(f"metadata.name: {name!r} is not a valid {doc.get('kind')} name (max {max_len})")
    for key, value in (meta.get("labels") or {}).items():
        if not isinstance(value, str) or len(value) > 63 or not LABEL_VALUE.match(value):
            errors.append(f"metadata.labels.{key}: invalid label value {value!r}")
    return errors


def validate_custom(doc: dict) -> list[str]:
    """Errors of a custom resource against its CRD schema ([] when valid)."""
    schema = crd_schema(doc["apiVersion"], doc["kind"])
    errors = [
        f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in jsonschema.Draft4Validator(schema).iter_errors(doc)
    ]
    return errors + metadata_errors(doc)


def validate_builtin(doc: dict) -> list[str]:
    """Errors of a built-in kind from kubernetes-validate, strict ([] when valid)."""
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = ".".join(map(str, getattr(e, "path", []) or []))
        return [f"{path or '<root>'}: {e.message}", *metadata_errors(doc)]
    except kubernetes_validate.utils.SchemaNotFoundError as e:
        return [f"no schema: {e}"]
    return metadata_errors(doc)


def validate_object(doc: dict) -> list[str]:
    """Errors of any object: CRD schema for the custom kinds peg renders, else the built-in schema."""
    if (doc.get("apiVersion"), doc.get("kind")) in CRD_FILES:
        return validate_custom(doc)
    return validate_builtin(doc)


def pod_templates(doc: dict) -> list[tuple[str, dict]]:
    """(where, PodSpec) of every pod the object makes; a TrainJob's pod is its trainer merged
    into the runtime patch, as the Trainer controller builds it."""
    spec = doc.get("spec") or {}
    kind = doc.get("kind")
    if kind == "Pod":
        return [("pod", spec)]
    if kind in ("Job",):
        return [("job", spec["template"]["spec"])]
    if kind in ("Deployment", "StatefulSet", "DaemonSet"):
        return [(kind.lower(), spec["template"]["spec"])]
    if kind == "PyTorchJob":
        return [(role.lower(), r["template"]["spec"]) for role, r in spec["pytorchReplicaSpecs"].items()]
    if kind == "RayJob":
        cluster = spec["rayClusterSpec"]
        out = [("head", cluster["headGroupSpec"]["template"]["spec"])]
        out += [(g["groupName"], g["template"]["spec"]) for g in cluster.get("workerGroupSpecs", [])]
        if "submitterPodTemplate" in spec:
            out.append(("submitter", spec["submitterPodTemplate"]["spec"]))
        return out
    if kind == "TrainJob":
        trainer = spec.get("trainer", {})
        out = []
        for patch in spec.get("runtimePatches", []):
            for job in patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]:
                pod = copy.deepcopy(job["template"]["spec"]["template"]["spec"])
                for container in pod.get("containers", []):
                    if container["name"] == "node":
                        container.update(
                            image=trainer.get("image"),
                            command=trainer.get("command"),
                            resources=trainer.get("resourcesPerNode", {}),
                            env=[*container.get("env", []), *trainer.get("env", [])],
                        )
                pod["automountServiceAccountToken"] = False  # the runtime's pod template sets it
                out.append((job["name"], pod))
        return out
    return []


def as_pods(doc: dict) -> list[dict]:
    """Each pod an object makes, as a Pod manifest (what checkov can scan)."""
    name = doc.get("metadata", {}).get("name", "object")
    namespace = doc.get("metadata", {}).get("namespace")
    return [
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"{name}-{where}", "namespace": namespace}, "spec": spec}
        for where, spec in pod_templates(doc)
    ]


def checkov_failures(docs: Iterable[dict], skip: Iterable[str] = CHECKOV_SKIPS) -> list[str]:
    """checkov's failed checks over the pods of `docs` (and the built-in objects themselves)."""
    scanned = []
    for doc in docs:
        pods = as_pods(doc)
        scanned += pods if doc.get("kind") != "Pod" and pods else [doc]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "objects.yaml"
        path.write_text(yaml.safe_dump_all(scanned, sort_keys=False))
        cmd = [str(CHECKOV), "-f", str(path), "--framework", "kubernetes", "--compact", "--quiet", "-o", "json"]
        if skip:
            cmd += ["--skip-check", ",".join(skip)]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if result.returncode not in (0, 1) or not result.stdout.strip():
        raise RuntimeError(f"checkov failed to run (exit {result.returncode}): {result.stderr[-2000:]}")
    report = json.loads(result.stdout)
    reports = report if isinstance(report, list) else [report]
    failures = []
    for r in reports:
        for check in r.get("results", {}).get("failed_checks", []):
            failures.append(f"{check['check_id']} {check['check_name']}: {check.get('resource')}")
    return failures
