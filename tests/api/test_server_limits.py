"""Deadlines, request size limits and graceful shutdown, against a real server in this process.

Real parts: the session's local Ray cluster, the live scheduler with embedded Redis, an inference
deployment on it and ShardwrightServer on localhost. The scheduler (and the deployment) outlives
the gRPC servers, so each test builds and stops its own server; running in this process lets the
tests read the engine's KV-block count, which the API does not expose.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import grpc
import httpx
import pytest

from model_helpers import tiny_spec
from waiting import eventually
from shardwright.api.auth import OPEN_TENANT, Authenticator
from shardwright.api.client import Client, ShardwrightError
from shardwright.api.gen.shardwright.v1 import inference_pb2, inference_pb2_grpc
from shardwright.api.http import HttpServer
from shardwright.api.limits import MIB, core_limit_bytes
from shardwright.api.server import ServerOptions, ShardwrightServer
from shardwright.config import Settings
from shardwright.models.random_init import write_random_checkpoint
from shardwright.scheduler.service import SchedulerConfig, SchedulerService

pytestmark = pytest.mark.slow
CONTEXT = 2048
LONG = 1500  # tokens: far more than the deadlines below allow (a step takes milliseconds, not microseconds)
DEADLINE_S = 1.0


@pytest.fixture(scope="module")
def control(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("limits")
    model = write_random_checkpoint(root / "model", tiny_spec("llama", max_position_embeddings=CONTEXT),
                                    seed=3, std=0.2)
    service = SchedulerService(Settings(state_dir=root / "state"), SchedulerConfig(reconcile_interval_s=0.2)).start()
    job = service.submit_text(f"kind: inference\nname: slow\nmodel: {model}\n"
                              "engine: {num_blocks: 400, block_size: 8}\n", OPEN_TENANT)
    eventually(lambda: service.get(job["job_id"])["state"] == "running", lambda: service.get(job["job_id"]), 120)
    service.job_id = job["job_id"]
    yield service
    service.close()


@pytest.fixture
def engine(control):
    return control.engine(OPEN_TENANT, "slow")


@pytest.fixture
def serve(control, tmp_path):
    """serve(**ServerOptions) -> a started ShardwrightServer on a free port (open, loopback only)."""
    started = []

    def make(**options) -> ShardwrightServer:
        server = ShardwrightServer(control, ServerOptions(port=0, settings=Settings(state_dir=tmp_path), **options))
        server.start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.server.stop(0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def address(server: ShardwrightServer) -> str:
    return f"127.0.0.1:{server.port}"


def assert_cancelled_early(engine, steps_before: int) -> None:
    """The request stopped long before LONG steps: its KV blocks are back and the engine holds no
    request (running or waiting), so it takes no further step for it."""
    eventually(lambda: engine.blocks_in_use == 0, lambda: f"{engine.blocks_in_use} KV blocks still in use")

    def idle() -> bool:
        health = engine.health(probe=False)
        return health["running"] == health["waiting"] == 0
    eventually(idle, lambda: f"the engine still holds a request: {engine.health(probe=False)}")
    assert engine.steps - steps_before < LONG // 2


def test_generate_past_its_deadline_is_cancelled_and_the_server_keeps_serving(serve, engine):
    with Client(address(serve())) as client:
        steps_before, started = engine.steps, time.monotonic()
        with pytest.raises(ShardwrightError) as err:
            client.generate("slow", [1, 2, 3], timeout_s=DEADLINE_S, max_tokens=LONG, ignore_eos=True)
        assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < DEADLINE_S + 1.0
        assert_cancelled_early(engine, steps_before)
        assert len(client.generate("slow", [1, 2, 3], max_tokens=4, ignore_eos=True)["token_ids"]) == 4


def test_stream_past_its_deadline_is_cancelled_after_streaming_tokens(serve, engine):
    with Client(address(serve())) as client:
        steps_before, received = engine.steps, []
        with pytest.raises(ShardwrightError) as err:
            for message in client.generate_stream("slow", [1, 2, 3], timeout_s=DEADLINE_S, max_tokens=LONG,
                                                  ignore_eos=True):
                received.append(message)
        assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert 0 < len(received) < LONG  # it was streaming when the deadline passed
        assert_cancelled_early(engine, steps_before)
        assert len(list(client.generate_stream("slow", [1], max_tokens=3, ignore_eos=True))) == 4  # 3 + final


def test_batched_stream_messages_carry_the_tokens_text_and_logprobs_of_one_token_messages(serve, engine):
    """GenerateStream with max_tokens_per_message > 1 (what the client asks by default) against the
    one-token messages old clients read: the same token ids, text deltas and logprobs, in order
    (greedy decoding of the same prompt on the same deployment: exact equality), and unary Generate agrees."""
    params = inference_pb2.SamplingParams(max_tokens=24, ignore_eos=True, logprobs=2)
    with grpc.insecure_channel(address(serve())) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)

        def stream(per_message: int) -> list:
            return list(stub.GenerateStream(inference_pb2.GenerateRequest(
                deployment="slow", text="hello there", params=params, max_tokens_per_message=per_message), timeout=60))

        def flat(messages) -> list[tuple]:  # (token id, text, top ids) exact; logprobs in `logprobs`
            return [(t.token_id, t.text, tuple(top.token_id for top in t.logprob.top)) for m in messages
                    for t in (m.tokens or ([m] if m.token_id >= 0 or m.text else []))]

        def logprobs(messages) -> list[float]:
            return [lp for m in messages for t in (m.tokens or [m]) if t.token_id >= 0
                    for lp in (t.logprob.logprob, *(top.logprob for top in t.logprob.top))]

        one, batched = stream(0), stream(4)
        assert all(not m.tokens for m in one) and all(len(m.tokens) <= 4 for m in batched)
        assert all(m.token_id == -1 and not m.text for m in batched[:-1])
        assert flat(batched) == flat(one) and len([t for t in flat(one) if t[0] >= 0]) == 24
        # the second request's prompt comes from the prefix cache: its fp32 logits may differ in the last bits
        assert logprobs(batched) == pytest.approx(logprobs(one), abs=1e-5)
        assert batched[-1].finish_reason == one[-1].finish_reason == "length"
        assert batched[-1].prompt_tokens == one[-1].prompt_tokens > 0
        unary = stub.Generate(inference_pb2.GenerateRequest(deployment="slow", text="hello there", params=params),
                              timeout=60)
        assert [t[0] for t in flat(one) if t[0] >= 0] == list(unary.token_ids)
        assert "".join(t[1] for t in flat(batched)) == unary.text
        with pytest.raises(grpc.RpcError) as err:
            stream(-1)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with Client(address(serve())) as client:  # the client yields one dict per token either way
        as_one = list(client.generate_stream("slow", "hello there", tokens_per_message=1, max_tokens=24,
                                             ignore_eos=True, logprobs=2))
        as_batched = list(client.generate_stream("slow", "hello there", max_tokens=24, ignore_eos=True, logprobs=2))
        assert [m.keys() for m in as_batched] == [m.keys() for m in as_one]
        no_logprob = [{k: v for k, v in m.items() if k != "logprob"} for m in as_one]
        assert [{k: v for k, v in m.items() if k != "logprob"} for m in as_batched] == no_logprob
        assert [m["logprob"]["logprob"] for m in as_batched[:-1]] == pytest.approx(
            [m["logprob"]["logprob"] for m in as_one[:-1]], abs=1e-5)  # prefix-cached prompt: last fp32 bits
        assert [m["token_id"] for m in as_one if m["token_id"] >= 0] == list(unary.token_ids)
    eventually(lambda: engine.blocks_in_use == 0, lambda: f"{engine.blocks_in_use} KV blocks still in use")


def test_a_call_without_deadline_is_served(serve):
    """gRPC reports 'no deadline' as ~1e19 s left; waiting on that used to fail with OverflowError."""
    with grpc.insecure_channel(address(serve())) as channel:
        stub = inference_pb2.GenerateRequest
        request = stub(deployment="slow", text="hello", params=inference_pb2.SamplingParams(max_tokens=5,
                                                                                           ignore_eos=True))
        call = channel.unary_unary("/shardwright.v1.InferenceService/Generate",
                                   request_serializer=inference_pb2.GenerateRequest.SerializeToString,
                                   response_deserializer=inference_pb2.GenerateResponse.FromString)
        assert len(call(request, timeout=None).token_ids) == 5


def test_oversized_requests_get_resource_exhausted_naming_the_limit(serve):
    limit = 64 * 1024
    with Client(address(serve(max_message_bytes=limit))) as client:
        calls = {"generate": lambda n: client.generate("slow", "x" * n, max_tokens=1),
                 "stream": lambda n: list(client.generate_stream("slow", "x" * n, max_tokens=1)),
                 "submit": lambda n: client.submit("kind: inference\nname: big\nmodel: /m\n#" + "x" * n)}
        for name, call in calls.items():
            with pytest.raises(ShardwrightError) as err:
                call(limit + 10)
            assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED, name
            assert "64.0 KiB" in str(err.value) and "--max-request-mib" in str(err.value), err.value
        with pytest.raises(ShardwrightError) as err:  # beyond gRPC's own backstop: refused unread
            client.generate("slow", "x" * (core_limit_bytes(limit) + 10), max_tokens=1)
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert client.health() == "SERVING"
        assert len(client.generate("slow", "x" * 100, max_tokens=2, ignore_eos=True)["token_ids"]) == 2
        assert client.list()[0][0]["name"] == "slow"  # a unary call under the limit still works


def test_stop_reports_not_serving_refuses_new_calls_and_drains_streams(serve, control):
    grace_s, health_port = 20.0, free_port()
    server = serve(grace_s=grace_s, health_port=health_port)
    with Client(address(server)) as client, Client(f"127.0.0.1:{health_port}") as probe:
        stream = client.generate_stream("slow", [1, 2, 3], max_tokens=LONG // 3, ignore_eos=True, timeout_s=60)
        received = [next(stream)]
        watch = _collect_in_thread(client.watch(control.job_id))
        eventually(lambda: watch.items, "the watch is open")  # before the stop begins
        stopper = threading.Thread(target=server.stop)
        started = time.monotonic()
        stopper.start()
        eventually(lambda: probe.health() == "NOT_SERVING", "health NOT_SERVING")  # first, on the health port
        with Client(address(server)) as newcomer:
            for caller in (client, newcomer):  # on the open connection and on a new one
                with pytest.raises(ShardwrightError) as err:
                    caller.generate("slow", [1], max_tokens=1)
                assert err.value.code == grpc.StatusCode.UNAVAILABLE
        assert stopper.is_alive(), "the stream should still be draining; make it longer"
        received += list(stream)
        watch.join(5)  # WatchJob streams do not wait for the grace period: they end at once
        stopper.join(grace_s + 5)
        assert not stopper.is_alive() and time.monotonic() - started < grace_s
    assert len([m for m in received if m["token_id"] >= 0]) == LONG // 3
    assert received[-1]["finish_reason"] == "length"  # drained to the end, not cut off
    assert isinstance(watch.error, ShardwrightError) and watch.error.code == grpc.StatusCode.UNAVAILABLE
    assert "again from sequence" in str(watch.error)


class _collect_in_thread(threading.Thread):
    """Collects what an iterator yields, and the error that ends it, in a thread."""

    def __init__(self, iterator) -> None:
        super().__init__(daemon=True)
        self.iterator, self.items, self.error = iterator, [], None
        self.start()

    def run(self) -> None:
        try:
            for item in self.iterator:
                self.items.append(item)
        except Exception as err:  # what the test inspects
            self.error = err


def test_http_client_that_disconnects_cancels_its_request(control, engine, tmp_path):
    """The OpenAI-compatible API (api/http.py): a client gone mid-stream, or one that stops waiting
    for a whole completion, frees its KV blocks long before the LONG tokens are done."""
    http = HttpServer(control, Authenticator(None), "127.0.0.1", 0, 4 * MIB, Settings(state_dir=tmp_path), grace_s=1)
    url = f"http://127.0.0.1:{http.start()}/v1/completions"
    body = {"model": "slow", "prompt": [1, 2, 3], "max_tokens": LONG, "ignore_eos": True, "temperature": 0}
    try:
        steps_before = engine.steps
        with httpx.stream("POST", url, json={**body, "stream": True}, timeout=60) as response:
            first = next(line for line in response.iter_lines() if line.startswith("data: "))
            assert json.loads(first[len("data: "):])["object"] == "text_completion"
            assert engine.blocks_in_use > 0  # the request is running when the client goes away
        assert_cancelled_early(engine, steps_before)
        steps_before = engine.steps
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url, json=body, timeout=DEADLINE_S)
        assert_cancelled_early(engine, steps_before)
    finally:
        http.stop()
