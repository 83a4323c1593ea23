"""Generate the Python gRPC code from the protos: `python -m shardwright.api.codegen`.

The protos live in shardwright/api/protos/shardwright/v1/ (package shardwright.v1); protoc would
emit imports of a top-level `shardwright.v1`, which is not where the code lives, so imports are
rewritten to `shardwright.api.gen.shardwright.v1`. The generated files are committed; a test
regenerates them into a temporary directory and fails when they differ.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

API = Path(__file__).resolve().parent
PROTO_ROOT = API / "protos"
GEN = API / "gen"
PACKAGE = "shardwright.api.gen"


def generate(out: Path) -> list[Path]:
    """Run protoc (grpcio-tools) for every proto into `out`; returns the files written."""
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    out.mkdir(parents=True, exist_ok=True)
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out}", f"--pyi_out={out}",
            f"--grpc_python_out={out}", *protos]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed for {protos}")
    files = sorted(p for p in out.rglob("*") if p.suffix in (".py", ".pyi"))
    for path in files:
        path.write_text(_rewrite_imports(path.read_text()))
    for folder in {out, *(d for p in files for d in p.relative_to(out).parents)}:
        init = out / folder / "__init__.py"
        if not init.exists():
            init.write_text("")
    return sorted(p for p in out.rglob("*") if p.is_file())


def _rewrite_imports(text: str) -> str:
    text = re.sub(r"^from shardwright\.v1 import", f"from {PACKAGE}.shardwright.v1 import", text, flags=re.M)
    return re.sub(r"^import shardwright\.v1\.", f"import {PACKAGE}.shardwright.v1.", text, flags=re.M)


def differences() -> list[str]:
    """Generated files that are missing or differ from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {p.relative_to(tmp): p.read_text() for p in generate(Path(tmp))}
    current = {p.relative_to(GEN): p.read_text() for p in GEN.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    return sorted(str(k) for k in set(fresh) | set(current) if fresh.get(k) != current.get(k))


if __name__ == "__main__":
    written = generate(GEN)
    print(f"wrote {len(written)} files under {GEN}")
    sys.exit(0)
