"""One-line descriptions of pydantic validation errors: `field.path: problem (got VALUE)`.

Used for job files (the first location of a job spec's error is its `kind` tag, dropped here),
the tenants file and the API's status messages. An unknown field close to a known one gets
"did you mean 'x'?" with the fields allowed there.
"""

from __future__ import annotations

import difflib
import typing
from typing import Any

from pydantic import BaseModel

from shardwright.config import InferenceDeployment, TrainingJob

_KINDS: dict[str, type[BaseModel]] = {"training": TrainingJob, "inference": InferenceDeployment}


def describe_validation_error(err: Any, root: type[BaseModel] | None = None, max_errors: int = 3) -> str:
    """One line for a pydantic ValidationError: `field.path: problem (got VALUE)`, per field, with
    "did you mean 'x'?" for an unknown field close to a known one. `root` is the validated model
    (default: a job spec, whose first location is the `kind` tag; for other models without `root`
    the location is shown as pydantic gives it, without suggestions)."""
    by_field: dict[str, list[str]] = {}
    for e in err.errors():
        path, problem = _describe_one(e, root)
        by_field.setdefault(path, [])
        if problem not in by_field[path]:
            by_field[path].append(problem)
    parts = [f"{path}: {' or '.join(problems)}" if path else " or ".join(problems)
             for path, problems in by_field.items()]
    more = f" (and {len(parts) - max_errors} more)" if len(parts) > max_errors else ""
    return " ".join(("; ".join(parts[:max_errors]) + more).split())


def _describe_one(e: dict, root: type[BaseModel] | None) -> tuple[str, str]:
    loc, kind = list(e["loc"]), e["type"]
    if kind in ("union_tag_not_found", "union_tag_invalid"):
        given = e["input"].get("kind") if isinstance(e.get("input"), dict) else None
        return "kind", "must be 'training' or 'inference'" + (f" (got {_short(given)})" if given is not None else "")
    model = root
    if model is None and loc and loc[0] in _KINDS:
        model = _KINDS[loc.pop(0)]
    names: list[str] = []
    if model is None:  # not a job spec and no root given: the location as pydantic gives it
        names = [f"[{part}]" if isinstance(part, int) else str(part) for part in loc]
        loc = []
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(part, int):
            names.append(f"[{part}]")
            continue
        fields = model.model_fields if isinstance(model, type) and issubclass(model, BaseModel) else None
        if fields is not None and part in fields:
            names.append(part)
            model = _model_in(fields[part].annotation)
        elif last and kind == "extra_forbidden":
            names.append(str(part))
            return _field_path(names), _unknown_field(str(part), fields, names[:-1])
        # else a union member's tag such as 'constrained-int': not a field
    path = _field_path(names)
    message = e["msg"].removeprefix("Value error, ").removeprefix(f"{path}: ")
    if kind not in ("missing", "extra_forbidden") and "input" in e and not isinstance(e["input"], (dict, list)):
        message += f" (got {_short(e['input'])})"
    return path, message


def _field_path(names: list[str]) -> str:
    return ".".join(names).replace(".[", "[")


def _unknown_field(name: str, fields: dict | None, parent: list[str]) -> str:
    if not fields:
        return "unknown field"
    close = difflib.get_close_matches(name, list(fields), n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    where = _field_path(parent) or "the top level"
    return f"unknown field ({hint}the fields of {where} are {', '.join(fields)})"


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside a field's annotation (X, X | None, list[X], Annotated[X, ...])."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
