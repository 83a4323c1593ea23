"""Property-based bad input against a real server: every request gets OK or a clear
INVALID_ARGUMENT (never INTERNAL/UNKNOWN), the one the rules say where they say it (over-context
prompts, max_tokens up to 10^9, negative sizes, unknown fields), and the server keeps serving."""

from __future__ import annotations

import os
import struct

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model_helpers import tiny_spec
from shardwright.api.client import Client, ShardwrightError
from shardwright.models.random_init import write_random_checkpoint
from shardwright.api.servicers.inference import DEFAULT_MAX_TOKENS
from test_server_e2e import start_server, stop_server, wait_state

CONTEXT = 256
VOCAB = tiny_spec("gpt2").vocab_size


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


def _expect_ok_or_invalid(call, *, invalid: bool | None = None) -> None:
    """OK or a clear INVALID_ARGUMENT; with `invalid` known, exactly the one it should be."""
    try:
        call()
    except ShardwrightError as err:
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT, err
        assert len(str(err)) < 600 and "Traceback" not in str(err)
        assert invalid is not False, f"a valid request was refused: {err}"
    else:
        assert invalid is not True, "an invalid request was accepted"


def _f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]  # what the proto's float field carries


def _invalid_params(max_tokens: int, temperature: float, top_k: int, top_p: float) -> bool:
    """The sampling rules (proto zero values mean the default: max_tokens 16, top_p 1)."""
    top_p = _f32(top_p) or 1.0
    return (max_tokens < 0 or (max_tokens or DEFAULT_MAX_TOKENS) > CONTEXT or _f32(temperature) < 0
            or top_k < 0 or not 0 < top_p <= 1)


def _invalid_ids(ids: list[int], max_tokens: int) -> bool:
    """The engine's admission rules: non-empty, inside the vocabulary, prompt + max_tokens <= context."""
    return not ids or not all(0 <= i < VOCAB for i in ids) or len(ids) + (max_tokens or DEFAULT_MAX_TOKENS) > CONTEXT


# 40 generation requests in the suite; the 10,000 with SHARDWRIGHT_FUZZ_EXAMPLES=10000.
REQUEST_EXAMPLES = int(os.environ.get("SHARDWRIGHT_FUZZ_EXAMPLES", "40"))


@settings(max_examples=REQUEST_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=st.lists(st.integers(-5, 300), max_size=300) | st.text(max_size=200),
       max_tokens=st.integers(-3, 10**9) | st.integers(0, 24), temperature=st.floats(-1, 3, allow_nan=False),
       top_k=st.integers(-3, 300), top_p=st.floats(-0.5, 1.5, allow_nan=False))
def test_generate_requests(server, prompt, max_tokens, temperature, top_k, top_p):
    # Over-context prompts, ids outside the vocabulary and max_tokens up to 10^9 are all drawn.
    invalid = _invalid_params(max_tokens, temperature, top_k, top_p)
    if isinstance(prompt, list):
        invalid = invalid or _invalid_ids(prompt, max_tokens)
    elif not invalid:
        invalid = None  # how many tokens a text makes is the tokenizer's business: either answer is fine
    _expect_ok_or_invalid(lambda: server.generate("fuzz", prompt, max_tokens=max_tokens, temperature=temperature,
                                                  top_k=top_k, top_p=top_p, seed=1), invalid=invalid)


def _job_file(kind: str, name: str, tp: int, extra: str) -> tuple[str, bool | None]:
    """A job file and whether it is certainly invalid (None: it depends, e.g. on the name)."""
    text = f"kind: {kind}\nname: {name}\nmodel: /nope\nlayout: {{tp: {tp}}}\n{extra}"
    return text, (kind not in ("inference", "training") or tp < 1 or bool(extra)) or None


ONE_LINE = st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), max_size=20)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=st.tuples(st.text(max_size=300), st.none()) | st.builds(
    _job_file, st.sampled_from(["inference", "training", "bogus", ""]), ONE_LINE,  # a name cannot add keys
    st.integers(-4, 64), st.sampled_from(["", "unknown_field: 1\n", "engine: {num_blocks: -1}\n"])))
def test_job_files(server, case):
    # Malformed YAML, unknown kinds and fields, and negative sizes (tp, num_blocks) are all drawn.
    text, invalid = case
    _expect_ok_or_invalid(lambda: server.submit(text), invalid=invalid)


def test_server_still_serves_after_the_fuzzing(server):
    assert server.health() == "SERVING"
    out = server.generate("fuzz", [1, 2, 3], max_tokens=5, ignore_eos=True)
    assert len(out["token_ids"]) == 5
    with pytest.raises(ShardwrightError) as err:
        server.generate("fuzz", [1] * (CONTEXT + 10), max_tokens=4)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
