"""The HTTP API's share of the server's limits, on a real `serve --http-port 0` with one stream
slot per tenant and a 2 s generation deadline: a second concurrent generation of the tenant gets
429 naming the flag (HTTP and gRPC share the count), a generation past the deadline gets 504 and is
cancelled, and every slot comes back."""

from __future__ import annotations

import json
import time

import grpc
import httpx
import pytest

from shardwright.api.client import ShardwrightError
from test_server_e2e import serving_chat

ALICE = "alice-token-123"
HEADERS = {"Authorization": f"Bearer {ALICE}"}
DEADLINE_S = 2.0


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    flags = ("--http-port", "0", "--max-streams-per-tenant", "1", "--generate-default-deadline-s", str(DEADLINE_S))
    with serving_chat(tmp_path_factory.mktemp("http-limits"), *flags, max_positions=4096, num_blocks=600) as \
            (alice, info, _, _):
        yield alice, f"http://{info['http_address']}/v1"


def _long(stream: bool) -> dict:
    return {"model": "chat", "prompt": [1, 2, 3], "max_tokens": 4000, "temperature": 0, "ignore_eos": True,
            "stream": stream}


def test_a_second_generation_of_the_tenant_is_429_naming_the_flag(served):
    alice, url = served
    with httpx.stream("POST", f"{url}/completions", json=_long(True), headers=HEADERS, timeout=60) as first:
        assert first.status_code == 200
        lines = first.iter_lines()  # kept: a dropped iterator closes the response
        assert next(lines).startswith("data: ")  # it is generating: it holds the tenant's one slot
        second = httpx.post(f"{url}/completions", json={"model": "chat", "prompt": [1], "max_tokens": 2},
                            headers=HEADERS, timeout=60)
        assert second.status_code == 429
        error = second.json()["error"]
        assert error["code"] == "rate_limit_exceeded" and "--max-streams-per-tenant" in error["message"]
        with pytest.raises(ShardwrightError) as err:  # gRPC counts the same slot
            list(alice.generate_stream("chat", [1], max_tokens=2))
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    # the stream is closed: its slot is back (a short request fits in the deadline)
    ok = httpx.post(f"{url}/completions", json={"model": "chat", "prompt": [1], "max_tokens": 2, "temperature": 0},
                    headers=HEADERS, timeout=60)
    assert ok.status_code == 200, ok.text


def test_a_generation_past_the_deadline_is_504_and_cancelled(served):
    _, url = served
    started = time.monotonic()
    late = httpx.post(f"{url}/completions", json=_long(False), headers=HEADERS, timeout=60)
    assert late.status_code == 504 and late.json()["error"]["code"] == "timeout"
    assert "--generate-default-deadline-s" in late.json()["error"]["message"]
    assert time.monotonic() - started < DEADLINE_S + 10  # it did not run its 4000 tokens
    with httpx.stream("POST", f"{url}/completions", json=_long(True), headers=HEADERS, timeout=60) as streamed:
        events = [line for line in streamed.iter_lines() if line.startswith("data: ")]
    assert json.loads(events[-1][len("data: "):])["error"]["code"] == "timeout"  # streamed: an error event
    ok = httpx.post(f"{url}/completions", json={"model": "chat", "prompt": [1], "max_tokens": 2, "temperature": 0},
                    headers=HEADERS, timeout=60)
    assert ok.status_code == 200, ok.text  # both slots were given back
