"""Fixtures for the Helm chart tests: a helm runner (skips when there is no helm) and renders."""

from __future__ import annotations

import pytest

from chart_render import CASES, Helm, Rendered, find_helm


@pytest.fixture(scope="session")
def helm(tmp_path_factory) -> Helm:
    binary, why = find_helm()
    if binary is None:
        pytest.skip(why)
    return Helm(binary, tmp_path_factory.mktemp("helm-values"))


@pytest.fixture(scope="session")
def renders(helm: Helm) -> dict[str, Rendered]:
    """`helm template` of every values case (see chart_render.CASES), rendered once per session."""
    return {case: helm.render(path) for case, path in CASES.items()}
