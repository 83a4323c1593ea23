"""One-line, actionable descriptions of errors for the CLI and the gRPC status messages."""

from __future__ import annotations

from pydantic import ValidationError


def one_line(err: Exception) -> str:
    """`field.path: problem; ...` for validation errors, else the first line of the message."""
    if isinstance(err, ValidationError):
        return "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in err.errors())
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
