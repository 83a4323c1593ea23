"""The Dockerfile builds the image the chart names by default, with the Ray the chart declares.

No docker here (and no registry): these tests read the files. They catch drift between the
Dockerfile, the chart's defaults and the package layout, which would otherwise show only as a
crash-looping pod (a Ray version mismatch between image and RayCluster, a missing package file).
"""

from __future__ import annotations

import fnmatch
import re
import tomllib

import yaml

from chart_render import CHART, REPO

DOCKERFILE = (REPO / "Dockerfile").read_text()
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())
APP_VERSION = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]


def _arg_default(name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)$", DOCKERFILE, re.MULTILINE)
    assert match, f"Dockerfile has no 'ARG {name}=DEFAULT'"
    return match.group(1)


def _copied_sources() -> list[str]:
    sources = []
    for line in DOCKERFILE.splitlines():
        if line.startswith("COPY "):
            words = [w for w in line.split()[1:] if not w.startswith("--")]
            sources += words[:-1]
    return sources


def test_the_image_ray_is_the_ray_the_raycluster_declares():
    assert _arg_default("RAY_VERSION") == VALUES["ray"]["version"]
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-", DOCKERFILE, re.MULTILINE)


def test_the_documented_build_produces_the_chart_default_image():
    default_image = f"{VALUES['image']['repository']}:{VALUES['image']['tag'] or APP_VERSION}"
    assert f"docker build -t {default_image} ." in DOCKERFILE
    assert f"docker build -t {default_image} ." in (CHART / "README.md").read_text()


def test_the_default_build_is_cpu_and_cuda_is_a_build_arg():
    assert _arg_default("RAY_VARIANT") == "cpu"
    assert _arg_default("TORCH_INDEX_URL").endswith("/whl/cpu")
    assert "--build-arg RAY_VARIANT=cu" in DOCKERFILE and "--build-arg TORCH_INDEX_URL=" in DOCKERFILE


def test_everything_pip_install_needs_is_copied_and_not_docker_ignored():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    needed = {"pyproject.toml", pyproject["project"]["readme"], "shardwright", "examples"}  # the example job files
    copied = set(_copied_sources())
    assert needed <= copied, f"the Dockerfile does not copy {needed - copied}"
    ignored = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines()
               if p.strip() and not p.startswith("#")]
    for source in copied:
        assert (REPO / source).exists(), f"the Dockerfile copies {source}, which is not in the repository"
        assert not any(fnmatch.fnmatch(source, pattern) for pattern in ignored), f".dockerignore drops {source}"
    generated = "shardwright/api/gen/shardwright/v1/jobs_pb2.py"  # shipped as files, not generated in the build
    assert (REPO / generated).is_file()
    assert not any(fnmatch.fnmatch(generated, pattern) for pattern in ignored)
