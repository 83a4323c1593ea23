"""One-line, actionable descriptions of errors for the CLI and the gRPC status messages."""

from __future__ import annotations

from pydantic import ValidationError

from shardwright.field_errors import describe_validation_error


def one_line(err: Exception) -> str:
    """`field.path: problem; ...` for validation errors, else the first line of the message."""
    if isinstance(err, ValidationError):
        return describe_validation_error(err)
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
