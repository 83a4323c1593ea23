"""The committed gRPC code equals what grpcio-tools generates from the protos now."""

from __future__ import annotations

import pytest

pytest.importorskip("grpc_tools", reason="grpcio-tools (test extra) regenerates the code")


def test_generated_code_matches_the_protos():
    from shardwright.api.codegen import differences

    stale = differences()
    assert not stale, f"regenerate with `python -m shardwright.api.codegen`; stale: {stale}"
