"""Validate Kubernetes objects against a CRD's openAPIV3Schema with the `jsonschema` package.

A CRD schema is OpenAPI v3.0 (close to JSON Schema draft 4) plus Kubernetes extensions that plain
JSON Schema does not know. `strict_validator` converts them so that validation rejects what
`kubectl apply --validate=strict` against the real API server would reject:

- `x-kubernetes-int-or-string: true` (and `format: int-or-string`) becomes `anyOf [integer, string]`;
- an object with `properties` rejects unknown fields (`additionalProperties: false`) unless it says
  `x-kubernetes-preserve-unknown-fields: true` (the API server would prune or refuse them);
- `nullable: true` admits null;
- `x-kubernetes-list-type: set` becomes `uniqueItems`; `map` lists are checked for duplicate keys
  (`x-kubernetes-list-map-keys`, using each key's schema default when an item leaves it out);
- `format: int32` / `int64` are range-checked.

CEL rules (`x-kubernetes-validations`) are not evaluated: that needs a CEL interpreter.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import yaml

_INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}
_CHILD_SCHEMA_KEYS = ("items", "additionalProperties", "not")
_CHILD_LIST_KEYS = ("anyOf", "allOf", "oneOf")


def load_crd_schema(crd_file: Path, version: str) -> dict[str, Any]:
    """The openAPIV3Schema of `version` (e.g. "v1") in a CustomResourceDefinition YAML file."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load(crd_file.read_text(), Loader=loader)
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version:
            return entry["schema"]["openAPIV3Schema"]
    names = [entry["name"] for entry in crd["spec"]["versions"]]
    raise KeyError(f"{crd_file.name} has no version {version!r}; it has {names}")


def to_json_schema(openapi: dict[str, Any]) -> dict[str, Any]:
    """A converted deep copy of a structural OpenAPI v3 schema (see the module docstring)."""
    schema = copy.deepcopy(openapi)
    _convert(schema)
    return schema


def _convert(node: dict[str, Any]) -> None:
    if node.get("x-kubernetes-int-or-string") or node.get("format") == "int-or-string":
        node.pop("type", None)
        node.pop("format", None)
        node.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.get("nullable") and isinstance(node.get("type"), str):
        node["type"] = [node["type"], "null"]
    if node.get("x-kubernetes-list-type") == "set":
        node["uniqueItems"] = True
    if ("properties" in node and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        node["additionalProperties"] = False
    for child in _children(node):
        _convert(child)


def _children(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    # Only schema positions: the keys of `properties` are field names, not schemas.
    yield from (s for s in node.get("properties", {}).values() if isinstance(s, dict))
    yield from (node[k] for k in _CHILD_SCHEMA_KEYS if isinstance(node.get(k), dict))
    for key in _CHILD_LIST_KEYS:
        yield from (s for s in node.get(key, []) if isinstance(s, dict))


def _list_map_keys(validator, keys, instance, schema) -> Iterator[jsonschema.ValidationError]:
    if schema.get("x-kubernetes-list-type") != "map" or not validator.is_type(instance, "array"):
        return
    item_props = schema.get("items", {}).get("properties", {})
    seen: dict[tuple, int] = {}
    for index, item in enumerate(instance):
        if not isinstance(item, dict):
            continue
        key = tuple(item.get(k, item_props.get(k, {}).get("default")) for k in keys)
        if key in seen:
            yield jsonschema.ValidationError(
                f"items {seen[key]} and {index} have the same map keys {dict(zip(keys, key))}")
        seen[key] = index


def _format_checker() -> jsonschema.FormatChecker:
    checker = jsonschema.FormatChecker()
    for name, (low, high) in _INT_RANGES.items():
        def check(value: object, low: int = low, high: int = high) -> bool:
            return not isinstance(value, int) or isinstance(value, bool) or low <= value <= high
        checker.checks(name)(check)
    return checker


_KubeValidator = jsonschema.validators.extend(
    jsonschema.Draft4Validator, {"x-kubernetes-list-map-keys": _list_map_keys})


def strict_validator(openapi: dict[str, Any], api_version: str, kind: str) -> jsonschema.protocols.Validator:
    """A validator for whole objects of this kind: apiVersion and kind must match, metadata and
    spec must be present, and the spec is checked as described in the module docstring."""
    schema = to_json_schema(openapi)
    schema.setdefault("required", [])
    schema["required"] = sorted(set(schema["required"]) | {"apiVersion", "kind", "metadata", "spec"})
    schema["properties"]["apiVersion"] = {"enum": [api_version]}  # draft 4 has no const
    schema["properties"]["kind"] = {"enum": [kind]}
    return _KubeValidator(schema, format_checker=_format_checker())


def error_messages(validator: jsonschema.protocols.Validator, instance: dict[str, Any]) -> list[str]:
    """Every validation error as "path: message", sorted, for assertion messages."""
    return sorted(f"{'/'.join(str(p) for p in e.absolute_path) or '(root)'}: {e.message}"
                  for e in validator.iter_errors(instance))
