"""Run the real `helm` on the Shardwright chart and give tests the rendered objects.

helm is found in $SHARDWRIGHT_HELM, then <repo>/.tools/bin/helm (put there by
`python scripts/install_helm.py`), then PATH.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "shardwright"
RELEASE = "sw"
NAMESPACE = "shardwright-test"
# The values cases: no file (the chart's defaults), then every example in the chart's ci/ folder.
CASES: dict[str, Path | None] = {"default": None} | {
    p.name.removesuffix("-values.yaml"): p for p in sorted((CHART / "ci").glob("*-values.yaml"))}


def find_helm() -> tuple[Path | None, str]:
    """(path, "") for a helm that runs, or (None, why none was found)."""
    from_env = os.environ.get("SHARDWRIGHT_HELM")
    if from_env:
        if not os.access(from_env, os.X_OK):
            raise FileNotFoundError(f"SHARDWRIGHT_HELM={from_env} is not an executable file; "
                                    "fix it or unset it")
        return Path(from_env), ""
    candidates = [REPO / ".tools" / "bin" / "helm", shutil.which("helm")]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return Path(candidate), ""
    return None, ("no helm binary: run `python scripts/install_helm.py` (installs .tools/bin/helm), "
                  "or set SHARDWRIGHT_HELM, or put helm on PATH")


@dataclass
class Rendered:
    """The objects of one `helm template` run, with the template each came from."""

    docs: list[dict[str, Any]]
    sources: list[str]
    values: dict[str, Any] = field(default_factory=dict)

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict[str, Any]:
        found = [d for d in self.all(kind) if name is None or d["metadata"]["name"] == name]
        if len(found) != 1:
            names = [d["metadata"]["name"] for d in self.all(kind)]
            raise AssertionError(f"expected one {kind} named {name or '(any)'}, rendered: {names}")
        return found[0]

    def names(self, kind: str) -> set[str]:
        return {d["metadata"]["name"] for d in self.all(kind)}


@dataclass
class Helm:
    binary: Path
    scratch: Path

    def run(self, *args: str, values: Path | dict | None = None) -> subprocess.CompletedProcess:
        """helm ARGS [-f VALUES]; a dict of values is written to a file first."""
        cmd = [str(self.binary), *args]
        if isinstance(values, dict):
            with tempfile.NamedTemporaryFile("w", suffix=".yaml", dir=self.scratch, delete=False) as fh:
                yaml.safe_dump(values, fh)
            values = Path(fh.name)
        if values is not None:
            cmd += ["-f", str(values)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)

    def template(self, values: Path | dict | None = None, *extra: str) -> subprocess.CompletedProcess:
        return self.run("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *extra, values=values)

    def render(self, values: Path | dict | None = None) -> Rendered:
        done = self.template(values)
        if done.returncode != 0:
            raise AssertionError(f"helm template failed:\n{done.stderr}")
        return parse_manifest(done.stdout, _load_values(values))


def parse_manifest(text: str, values: dict[str, Any]) -> Rendered:
    docs, sources = [], []
    for chunk in text.split("\n---\n"):
        source = next((line.removeprefix("# Source: ") for line in chunk.splitlines()
                       if line.startswith("# Source: ")), "")
        doc = yaml.safe_load(chunk + "\n")  # the split took the newline that ends a block scalar
        if doc:
            docs.append(doc)
            sources.append(source)
    return Rendered(docs, sources, values)


def _load_values(values: Path | dict | None) -> dict[str, Any]:
    if isinstance(values, Path):
        return yaml.safe_load(values.read_text()) or {}
    return values or {}
