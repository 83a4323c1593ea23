"""Metrics and logs of a real `shardwright serve` (gRPC only, `--metrics-port 0 --log-format
json`): after a known set of requests the counters and histogram counts are exactly what was
sent, and the log has one JSON line per finished request and per job transition."""

from __future__ import annotations

import json

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from test_server_e2e import serving_chat
from waiting import eventually

ALICE = "alice-token-123"
UNARY, STREAMS, UNARY_TOKENS, STREAM_TOKENS = 10, 2, 4, 5


def _samples(url: str) -> dict[tuple, float]:
    text = httpx.get(url, timeout=60).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("metrics")
    log_path = root / "serve.log"
    with open(log_path, "w") as log, serving_chat(root, "--metrics-port", "0", "--metrics-host", "127.0.0.1",
                                                  "--log-format", "json", stderr=log) as (alice, info, _, job_id):
        yield alice, f"http://{info['metrics_address']}/metrics", log_path, job_id


def test_counters_and_histograms_count_exactly_what_was_sent(served):
    alice, url, _, _ = served
    before = _samples(url)
    prompts = [[1 + i, 2, 3] for i in range(UNARY)]
    for prompt in prompts:
        assert len(alice.generate("chat", prompt, max_tokens=UNARY_TOKENS, ignore_eos=True)["token_ids"]) == UNARY_TOKENS
    for _ in range(STREAMS):
        list(alice.generate_stream("chat", [9, 9], max_tokens=STREAM_TOKENS, ignore_eos=True))
    after = _samples(url)
    chat = (("deployment", "chat"),)

    def delta(name, labels=chat):
        return after.get((name, labels), 0.0) - before.get((name, labels), 0.0)

    done = UNARY + STREAMS
    assert delta("shardwright_requests_total", (("deployment", "chat"), ("finish_reason", "length"))) == done
    assert delta("shardwright_generation_tokens_total") == UNARY * UNARY_TOKENS + STREAMS * STREAM_TOKENS
    assert delta("shardwright_prompt_tokens_total") == UNARY * 3 + STREAMS * 2
    assert delta("shardwright_request_latency_seconds_count",
                 (("deployment", "chat"), ("finish_reason", "length"))) == done
    assert delta("shardwright_time_to_first_token_seconds_count") == STREAMS  # seen token by token: streams
    assert delta("shardwright_inter_token_latency_seconds_count") == STREAMS * (STREAM_TOKENS - 1)
    assert after[("shardwright_requests_in_flight", chat)] == 0


def test_one_json_log_line_per_finished_request_and_per_transition(served):
    alice, _, log_path, job_id = served
    alice.generate("chat", [5, 6, 7], max_tokens=3, ignore_eos=True)
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    requests = [entry for entry in lines if entry["message"] == "request finished"]
    last = requests[-1]
    assert (last["tenant"], last["deployment"], last["api"], last["prompt_tokens"], last["generated_tokens"],
            last["finish_reason"], last["status"]) == ("alice", "chat", "grpc", 3, 3, "length", "ok")
    assert last["latency_s"] > 0 and last["level"] == "info" and last["logger"] == "shardwright.requests"
    states = [entry["state"] for entry in lines if entry.get("logger") == "shardwright.jobs" and entry["job_id"] == job_id]
    assert states[0] in ("submitted", "queued") and "running" in states


def test_control_plane_engine_and_training_series_move_when_jobs_run(served):
    """The scheduler's and the engine's gauges (jobs by state, GPUs, KV blocks, requests in the engine)
    and a running training job's step series, from the same /metrics."""
    from test_server_e2e import CORPUS, TRAIN_JOB

    alice, url, _, _ = served
    job = alice.submit(TRAIN_JOB.format(corpus=CORPUS).replace("steps: 6", "steps: 400")
                       .replace("tiny-train", "metrics-train"))
    try:
        train = (("job", "metrics-train"), ("tenant", "alice"))
        seen = eventually(lambda: (s := _samples(url)).get(("shardwright_training_step", train), 0) >= 2 and s,
                          "a training step of 2 on /metrics", 180, 0.5)
        assert seen[("shardwright_training_loss", train)] > 0
        assert seen[("shardwright_training_tokens_per_second", train)] > 0
        assert seen[("shardwright_training_step_seconds", train)] > 0
        assert seen[("shardwright_jobs", (("kind", "training"), ("priority", "batch"), ("state", "running")))] == 1
        assert seen[("shardwright_jobs", (("kind", "inference"), ("priority", "serving"), ("state", "running")))] == 1
        assert seen[("shardwright_state_store_up", ())] == 1
        assert seen[("shardwright_gpus", (("state", "held"),))] == 2  # tp=1 deployment + tp=1 training job
        assert seen[("shardwright_gpus", (("state", "total"),))] >= 2
        def chat(state):
            return (("deployment", "chat"), ("state", state), ("tenant", "alice"))
        assert seen[("shardwright_kv_blocks", chat("total"))] == 64
        assert seen[("shardwright_kv_blocks", chat("used"))] == 0  # idle: every block back
        assert seen[("shardwright_engine_requests", chat("running"))] == 0
        assert seen[("shardwright_engine_requests", chat("waiting"))] == 0
        saved = (("deployment", "chat"), ("quantity", "prefill_tokens_saved"), ("tenant", "alice"))
        # prefix caching is on by default, so it is reported; every prompt so far is shorter than one
        # 8-token block, so no prefill token was saved yet
        assert seen[("shardwright_prefix_cache", saved)] == 0
        assert seen[("shardwright_job_transitions_total", (("kind", "training"), ("state", "running")))] == 1
        assert seen[("shardwright_placement_wait_seconds_count", ())] >= 2
    finally:
        alice.cancel(job["job_id"])
