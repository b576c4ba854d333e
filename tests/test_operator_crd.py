"""The EmbeddingPipeline CRD: generated, never drifting, structural, and accepting what the code writes."""

from __future__ import annotations

import copy
import functools
import json
from datetime import datetime, UTC
from pathlib import Path

import jsonschema
import pytest
import yaml
from chart_render import repo_run_texts
from k8s_validation import _strict, as_stored, validate_builtin, validate_custom
from typer.testing import CliRunner

from peg.cli import app
from peg.config import RunConfig, parse_config
from peg.k8s import render
from peg.k8s.schema import run_config_schema
from peg.operator.crd import PRINTER_COLUMNS, crd, crd_yaml, pipeline_manifest, as_written
from peg.operator.model import PipelineSpec
from peg.operator.reconcile import StoreState, reconcile

REPO = Path(__file__).resolve().parents[1]
CRD_FILE = REPO / "charts" / "peg" / "crds" / "embeddingpipelines.peg.dev.yaml"
EXAMPLE = REPO / "manifests" / "embeddingpipeline.yaml"


@functools.cache
def generated() -> dict:
    return crd()


def schema() -> dict:
    return copy.deepcopy(generated()["spec"]["versions"][0]["schema"]["openAPIV3Schema"])


def errors(doc: dict) -> list[str]:
    """The committed CRD's schema, strict (unknown fields fail: the API server would prune them)."""
    return validate_custom(doc)


def test_committed_crd_equals_a_fresh_generation():
    """Fails when RunConfig or the operator's models change without `peg operator crd -o` (drift)."""
    assert CRD_FILE.read_text() == crd_yaml(), f"regenerate: peg operator crd -o {CRD_FILE.relative_to(REPO)}"
    run = schema()["properties"]["spec"]["properties"]["run"]
    assert run["properties"] == as_written(run_config_schema())["properties"]


def test_cli_writes_the_crd(tmp_path):
    result = CliRunner().invoke(app, ["operator", "crd", "-o", str(tmp_path / "crd.yaml")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "crd.yaml").read_text() == crd_yaml()


def structural_problems(node: dict, path: str = "<root>") -> list[str]:
    """apiextensions.k8s.io/v1 structural-schema rules (what the API server checks on create)."""
    problems = []
    allowed_untyped = node.get("x-kubernetes-int-or-string") or node.get("x-kubernetes-preserve-unknown-fields")
    if "type" not in node and not allowed_untyped:
        problems.append(f"{path}: no type")
    for key in ("$ref", "$defs", "definitions", "anyOf", "oneOf", "allOf", "not", "const", "prefixItems", "title"):
        if key in node:
            problems.append(f"{path}: {key} is not allowed here")
    if "properties" in node and "additionalProperties" in node:
        problems.append(f"{path}: properties and additionalProperties together")
    if node.get("nullable") and "type" not in node:
        problems.append(f"{path}: nullable without a type")
    if node.get("type") == "array" and not isinstance(node.get("items"), dict):
        problems.append(f"{path}: an array needs one items schema")
    if "default" in node:
        try:
            jsonschema.Draft4Validator(_strict(copy.deepcopy({k: v for k, v in node.items() if k != "default"}))).validate(node["default"])
        except jsonschema.ValidationError as e:
            problems.append(f"{path}: default does not validate: {e.message}")
    for key, child in (node.get("properties") or {}).items():
        problems += structural_problems(child, f"{path}.{key}")
    if isinstance(node.get("items"), dict):
        problems += structural_problems(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        problems += structural_problems(node["additionalProperties"], f"{path}{{}}")
    return problems


def test_crd_is_structural_and_a_valid_crd_object():
    assert structural_problems(schema()) == []
    assert schema()["properties"]["metadata"] == {"type": "object"}  # the API server owns ObjectMeta
    assert validate_builtin(generated()) == []  # the CRD object itself, by the apiextensions OpenAPI (strict)
    broken = copy.deepcopy(schema())
    broken["properties"]["spec"]["properties"]["retries"]["anyOf"] = [{"type": "object"}]
    del broken["properties"]["status"]["properties"]["phase"]["type"]
    assert structural_problems(broken) == ["<root>.spec.retries: anyOf is not allowed here", "<root>.status.phase: no type"]


def test_printer_columns_name_fields_of_the_status():
    status = schema()["properties"]["status"]["properties"]
    assert [c["name"] for c in PRINTER_COLUMNS] == ["Stage", "Phase", "nDCG@10", "Age"]
    assert status["stage"]["type"] == status["phase"]["type"] == "string"
    assert status["metrics"]["properties"]["ndcgAt10"]["type"] == "number"


def test_example_pipeline_validates_and_renders():
    doc = yaml.safe_load(EXAMPLE.read_text())
    assert errors(doc) == []
    config = RunConfig.model_validate(doc["spec"]["run"])
    assert render.render_run(config)  # the renderers accept it: the operator can run it
    assert (doc["metadata"]["name"], doc["metadata"]["namespace"]) == (config.name, config.cluster.namespace)


def test_example_pipeline_is_the_generated_manifest_of_the_manifests_run(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO / "manifests")
    out = tmp_path / "pipeline.yaml"
    result = CliRunner().invoke(app, ["operator", "manifest", "run.yaml", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_text() == EXAMPLE.read_text(), "regenerate: manifests/render.sh"


def test_broken_pipelines_are_rejected_with_the_key():
    doc = yaml.safe_load(EXAMPLE.read_text())
    misspelt = copy.deepcopy(doc)
    misspelt["spec"]["retryz"] = 2
    assert any("retryz" in e for e in errors(misspelt))
    wrong_type = copy.deepcopy(doc)
    wrong_type["spec"]["retries"]["limit"] = "three"
    assert errors(wrong_type) == ["spec.retries.limit: 'three' is not of type 'integer'"]
    negative = copy.deepcopy(doc)
    negative["spec"]["retries"]["backoffSeconds"] = -1
    assert errors(negative) == ["spec.retries.backoffSeconds: -1 is less than the minimum of 0"]
    no_run = copy.deepcopy(doc)
    del no_run["spec"]["run"]
    assert errors(no_run) == ["spec: 'run' is a required property"]


@pytest.mark.parametrize("store", [StoreState(), StoreState(stages={"prepare": "complete"}), StoreState(error="down")])
def test_statuses_reconcile_writes_validate(store):
    doc = yaml.safe_load(EXAMPLE.read_text())
    _, status = reconcile(doc["spec"], 1, [], store, None, datetime.now(UTC))
    doc["status"] = json.loads(json.dumps(status))
    assert errors(doc) == []
    bad = copy.deepcopy(doc)
    bad["status"]["phase"] = "Exploded"
    assert len(errors(bad)) == 1


RUN_TEXTS = repo_run_texts()


@pytest.mark.parametrize("name", sorted(RUN_TEXTS))
def test_operator_runs_the_clis_config_after_api_server_defaulting(name):
    """Issue 35 finding 2: the CRD's defaults, filled in by the API server, made derived lengths
    explicit and conflicting (gpu-values: InvalidSpec; hard_negatives 2 mined 5 negatives). The
    operator's RunConfig for the stored EmbeddingPipeline equals the CLI's, byte for byte."""
    text = RUN_TEXTS[name]
    cli = parse_config(text, name)
    doc = pipeline_manifest(yaml.safe_load(text), cli.cluster.namespace, cli.name)
    stored = as_stored(doc)
    assert errors(stored) == []
    spec = json.loads(json.dumps(stored["spec"]))  # as the handler hands it to reconcile
    assert PipelineSpec.model_validate(spec).run.model_dump_json() == cli.model_dump_json()
    _, status = reconcile(spec, 1, [], StoreState(), None, datetime.now(UTC))
    assert status["phase"] != "Failed", status["conditions"]


def test_derived_list_lengths_survive_the_api_server():
    run = {"name": "demo", "model": {"name_or_path": "m"}, "data": {"beir": "/data/scifact"}, "batch": {"hard_negatives": 2}}
    stored = as_stored(pipeline_manifest(run, "team", "demo"))
    config = PipelineSpec.model_validate(stored["spec"]).run
    assert config.mining.negatives_per_query == 2 == parse_config(yaml.safe_dump(run)).mining.negatives_per_query


def test_as_stored_prunes_unknown_fields_and_fills_defaults():
    doc = yaml.safe_load(EXAMPLE.read_text())
    del doc["spec"]["retries"]
    doc["spec"]["colour"] = "blue"
    stored = as_stored(doc)
    assert "colour" not in stored["spec"]
    assert stored["spec"]["retries"] == {"limit": 2, "backoffSeconds": 30, "maxBackoffSeconds": 900}
    assert stored["metadata"] == doc["metadata"]


def test_a_misspelt_run_key_reaches_the_operator_and_fails_as_in_the_cli():
    """spec.run keeps unknown fields (the API server would prune them silently and the operator
    would run the defaults): the operator refuses the key by name, as `peg pipeline run` does."""
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["spec"]["run"]["train"]["epochz"] = 2
    stored = as_stored(doc)
    assert stored["spec"]["run"]["train"]["epochz"] == 2 and errors(stored) == []
    _, status = reconcile(stored["spec"], 1, [], StoreState(), None, datetime.now(UTC))
    assert status["phase"] == "Failed" and "run.train.epochz" in status["conditions"][0]["message"]
    with pytest.raises(ValueError, match="train.epochz"):
        parse_config(yaml.safe_dump(doc["spec"]["run"]), "run.yaml")
