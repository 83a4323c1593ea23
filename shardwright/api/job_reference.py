"""The job-file reference (examples/job-file-reference.md), generated from the pydantic models of
config.py, so it cannot go stale: `python -m shardwright.api.job_reference` rewrites it, and a
test fails when the committed file differs from what the models say.

Every field of both kinds of job file, nested fields as dotted paths (`engine.pool.peers`), with
its type, default (or "required"), constraints and description.
"""

from __future__ import annotations

import sys
import types
import typing
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from shardwright.config import InferenceDeployment, TrainingJob

REFERENCE = Path(__file__).resolve().parents[2] / "examples" / "job-file-reference.md"
CONSTRAINTS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<=", "min_length": "length >=", "max_length": "length <=",
               "pattern": "matches"}


def _models_in(annotation) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _type_name(annotation) -> str:
    origin = typing.get_origin(annotation)
    if annotation is type(None):
        return "null"
    if origin is typing.Literal:
        return " \\| ".join(repr(a).replace("'", '"') for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is typing.Annotated:
        return _type_name(typing.get_args(annotation)[0])
    if origin in (list, tuple, set):
        return f"list of {_type_name(typing.get_args(annotation)[0])}" if typing.get_args(annotation) else "list"
    if origin is dict:
        return "mapping"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping (below)"
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return " \\| ".join(f'"{m.value}"' for m in annotation)
    if isinstance(annotation, type) and issubclass(annotation, Path):
        return "path"
    names = {int: "integer", float: "number", str: "string", bool: "boolean", Any: "any"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _default(field) -> str:
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        value = field.default_factory()
        return "(below)" if isinstance(value, BaseModel) else f"`{value!r}`"
    value = field.default
    if value is None or value is PydanticUndefined:
        return "none"
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, Path):
        return "the home folder's .shardwright" if value == Path.home() / ".shardwright" else f"`{value}`"
    return f"`{value!r}`".replace("'", '"')


def _constraints(field) -> str:
    out = []
    for meta in field.metadata:
        for attr, word in CONSTRAINTS.items():
            value = getattr(meta, attr, None)
            if value is not None:
                out.append(f"{word} {value}")
    return "; ".join(out)


def rows(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted name, type, default, description with constraints) of every field, depth first."""
    out = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        bounds = _constraints(field)
        text = (field.description or "").replace("|", "\\|") + (f" ({bounds})" if bounds else "")
        out.append((path, _type_name(field.annotation), _default(field), text))
        for nested in _models_in(field.annotation):
            out += rows(nested, f"{path}.")
    return out


def _table(title: str, model: type[BaseModel]) -> str:
    lines = [f"## {title}", "", (model.__doc__ or "").strip().splitlines()[0], "",
             "| field | type | default | meaning |", "|---|---|---|---|"]
    lines += [f"| `{n}` | {t} | {d} | {m} |" for n, t, d, m in rows(model)]
    return "\n".join(lines)


def render() -> str:
    return "\n\n".join([
        "# Job-file reference",
        "Generated from the pydantic models in `shardwright/config.py` by "
        "`python -m shardwright.api.job_reference`; do not edit by hand. Unknown fields are refused. "
        "Examples: `examples/train_tiny.yaml` (training) and `examples/deployment.yaml` (inference).",
        _table("`kind: training`", TrainingJob),
        _table("`kind: inference`", InferenceDeployment),
    ]) + "\n"


def main() -> int:
    REFERENCE.write_text(render())
    print(f"wrote {REFERENCE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
