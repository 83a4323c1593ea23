"""Property-based bad input against a real server: every malformed request gets OK or a clear
INVALID_ARGUMENT (never INTERNAL/UNKNOWN), and the server keeps serving."""

from __future__ import annotations


import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model_helpers import tiny_spec
from shardwright.api.client import Client, ShardwrightError
from shardwright.models.random_init import write_random_checkpoint
from test_server_e2e import start_server, stop_server, wait_state

CONTEXT = 256


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    model = write_random_checkpoint(root / "m", tiny_spec("gpt2", max_position_embeddings=CONTEXT), seed=1)
    tokens = root / "tokens.yaml"
    tokens.write_text("fuzz-token-0001: fuzz\n")
    proc, address = start_server(root / "state", tokens)
    client = Client(address, token="fuzz-token-0001", timeout_s=60)
    job = client.submit(f"kind: inference\nname: fuzz\nmodel: {model}\nengine: {{num_blocks: 128, block_size: 8}}\n")
    wait_state(client, job["job_id"], {"running"})
    yield client
    client.close()
    stop_server(proc)


def _expect_ok_or_invalid(call) -> None:
    try:
        call()
    except ShardwrightError as err:
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT, err
        assert len(str(err)) < 600 and "Traceback" not in str(err)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=st.lists(st.integers(-5, 300), max_size=300) | st.text(max_size=200),
       max_tokens=st.integers(-3, 10**9) | st.integers(0, 24), temperature=st.floats(-1, 3, allow_nan=False),
       top_k=st.integers(-3, 300), top_p=st.floats(-0.5, 1.5, allow_nan=False))
def test_generate_requests(server, prompt, max_tokens, temperature, top_k, top_p):
    _expect_ok_or_invalid(lambda: server.generate("fuzz", prompt, max_tokens=max_tokens, temperature=temperature,
                                                  top_k=top_k, top_p=top_p, seed=1))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=300) | st.builds(
    lambda kind, name, tp, extra: f"kind: {kind}\nname: {name}\nmodel: /nope\nlayout: {{tp: {tp}}}\n{extra}",
    st.sampled_from(["inference", "training", "bogus", ""]), st.text(max_size=20),
    st.integers(-4, 64), st.sampled_from(["", "unknown_field: 1\n", "engine: {num_blocks: -1}\n"])))
def test_job_files(server, text):
    _expect_ok_or_invalid(lambda: server.submit(text))


def test_server_still_serves_after_the_fuzzing(server):
    assert server.health() == "SERVING"
    out = server.generate("fuzz", [1, 2, 3], max_tokens=5, ignore_eos=True)
    assert len(out["token_ids"]) == 5
    with pytest.raises(ShardwrightError) as err:
        server.generate("fuzz", [1] * (CONTEXT + 10), max_tokens=4)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
