"""RunConfig's JSON schema as a structural OpenAPI v3 schema (CRD openAPIV3Schema, chart values).

Kubernetes accepts only structural schemas in a CRD: no `$ref`/`$defs`, every node typed,
`nullable: true` instead of `anyOf: [X, null]`, `items` instead of `prefixItems`, and no
JSON-Schema-only keywords (`const`, `title`...). Helm validates values with plain JSON Schema,
which ignores `nullable`: `run_config_schema(for_helm=True)` writes `type: [X, "null"]` instead
and keeps `additionalProperties: false` (a CRD may not combine it with `properties`).
"""

from __future__ import annotations

import copy
from typing import Any

from peg.config import json_schema

_DROP = {"title", "$schema", "$defs", "definitions", "const", "discriminator", "examples"}


def run_config_schema(for_helm: bool = False) -> dict[str, Any]:
    """RunConfig as a structural OpenAPI v3 schema (`for_helm`: JSON Schema for values.schema.json)."""
    return structural_schema(json_schema(), for_helm)


def structural_schema(model_schema: dict[str, Any], for_helm: bool = False) -> dict[str, Any]:
    """Any pydantic model's JSON schema (`Model.model_json_schema()`) converted the same way."""
    return _convert(model_schema, model_schema.get("$defs", {}), for_helm)


def _convert(node: Any, defs: dict[str, Any], for_helm: bool) -> Any:
    if isinstance(node, list):
        return [_convert(n, defs, for_helm) for n in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "$ref" in node:
        target = copy.deepcopy(defs[node.pop("$ref").rsplit("/", 1)[-1]])
        node = {**target, **node}  # sibling keys (description, default) win over the definition's
    if "allOf" in node and len(node["allOf"]) == 1:
        node = {**node.pop("allOf")[0], **node}
        return _convert(node, defs, for_helm)
    nullable = False
    if "anyOf" in node:
        any_of = node.pop("anyOf")
        options = [o for o in any_of if o.get("type") != "null"]
        nullable = len(options) < len(any_of)
        if len(options) != 1:
            raise ValueError(f"cannot express anyOf with {len(options)} non-null options structurally: {options}")
        node = {**_convert(options[0], defs, for_helm), **{k: v for k, v in node.items()}}
    if "const" in node and "enum" not in node:
        node["enum"] = [node["const"]]
    if "prefixItems" in node:  # a fixed-length tuple: one item type, the length as min/max items
        items = node.pop("prefixItems")
        types = {i.get("type") for i in items}
        if len(types) != 1:
            raise ValueError(f"tuple of mixed types cannot be expressed structurally: {items}")
        node["items"] = items[0]
        node.setdefault("minItems", len(items))
        node.setdefault("maxItems", len(items))
    out = {k: _convert(v, defs, for_helm) for k, v in node.items() if k not in _DROP}
    if "properties" in out:
        out["properties"] = {k: _convert(v, defs, for_helm) for k, v in node["properties"].items()}
        out.setdefault("type", "object")
        if not for_helm:
            out.pop("additionalProperties", None)
    if "enum" in out and "type" not in out:
        out["type"] = _json_type(out["enum"][0])
    if out.get("default", 0) is None:
        del out["default"]
    if not for_helm:  # OpenAPI v3.0: a boolean next to minimum/maximum (JSON Schema 2020: the bound)
        for bound, flag in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
            if not isinstance(out.get(flag, True), bool):
                out[bound] = out[flag]
                out[flag] = True
    if nullable:
        if for_helm:
            out["type"] = [out["type"], "null"]
            if "enum" in out:
                out["enum"] = [*out["enum"], None]
        else:
            out["nullable"] = True
    return out


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    return "string"
