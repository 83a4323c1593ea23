"""The OpenAI-compatible HTTP API: the official `openai` client and raw httpx against a real
`shardwright serve --http-port 0` (one server per module) with a tiny deployment, compared with
the gRPC Generate of the same deployment.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shardwright.api.chat_template import render_chat
from shardwright.api.openai_schema import OpenAIError
from test_server_e2e import serving_chat

ALICE, BOB = "alice-token-123", "bob-token-4567"
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
GREEDY = {"temperature": 0, "max_tokens": 12, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(gRPC Client as alice, HTTP base URL) of a server running deployment 'chat' for alice."""
    def chat_template(model) -> None:
        (model / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE, "bos_token": "^"}))

    with serving_chat(tmp_path_factory.mktemp("http"), "--http-port", "0", prepare=chat_template) as (alice, info, _, _):
        yield alice, f"http://{info['http_address']}/v1"


def _openai(base_url: str, token: str = ALICE) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=token, max_retries=0, timeout=120)


def test_models_are_the_tenants_running_deployments(served):
    _, url = served
    assert [m.id for m in _openai(url).models.list()] == ["chat"]
    assert [m.id for m in _openai(url, BOB).models.list()] == []


@pytest.mark.parametrize("prompt", [[1, 2, 3], "hello"])
def test_greedy_completion_equals_grpc_generate(served, prompt):
    alice, url = served
    expected = alice.generate("chat", prompt, max_tokens=12, ignore_eos=True)
    assert len(expected["token_ids"]) == 12
    out = _openai(url).completions.create(model="chat", prompt=prompt, **GREEDY)
    assert out.choices[0].text == expected["text"] and out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == \
        (expected["prompt_tokens"], 12, expected["prompt_tokens"] + 12)
    chunks = list(_openai(url).completions.create(model="chat", prompt=prompt, stream=True, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks) == expected["text"]
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_string_cuts_the_text_as_grpc_does(served):
    alice, url = served
    full = alice.generate("chat", [7, 8, 9], max_tokens=12, ignore_eos=True)["text"]
    stop = full[len(full) // 2]  # a character in the middle of the greedy text
    expected = alice.generate("chat", [7, 8, 9], max_tokens=12, ignore_eos=True, stop=[stop])
    out = _openai(url).completions.create(model="chat", prompt=[7, 8, 9], stop=[stop], **GREEDY)
    assert out.choices[0].text == expected["text"] == full[:full.index(stop)]
    assert out.choices[0].finish_reason == "stop"


def test_chat_completion_renders_the_template(served):
    alice, url = served
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    expected = alice.generate("chat", "^<|system|>be brief\n<|user|>hi\n<|assistant|>", max_tokens=12,
                              ignore_eos=True)
    client = _openai(url)
    out = client.chat.completions.create(model="chat", messages=messages, **GREEDY)
    assert out.choices[0].message.content == expected["text"] and out.choices[0].message.role == "assistant"
    assert out.usage.prompt_tokens == expected["prompt_tokens"]
    chunks = list(client.chat.completions.create(model="chat", messages=messages, stream=True, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected["text"]


def test_sse_framing_usage_chunk_and_done(served):
    _, url = served
    body = {"model": "chat", "prompt": [1, 2, 3], "max_tokens": 5, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{url}/completions", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {ALICE}"}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"  # every event ends with a blank line
    assert all(e.startswith("data: ") and "\n" not in e for e in events[:-1])
    chunks = [json.loads(e[len("data: "):]) for e in events[:-2]]
    assert {c["object"] for c in chunks} == {"text_completion"} and len({c["id"] for c in chunks}) == 1
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 5,
                                                                   "total_tokens": 8}
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("extra, param", [({"logprobs": 21}, "logprobs"), ({"logit_bias": {"1": 5}}, "logit_bias"),
                                          ({"n": 0}, "n"), ({"n": 65}, "n"),
                                          ({"prompt": ["a"] * 33, "n": 2}, "prompt"),
                                          ({"presence_penalty": 2.5}, "presence_penalty"),
                                          ({"repetition_penalty": 0}, "repetition_penalty"),
                                          ({"bogus": 1}, "bogus"), ({"temperature": -1}, "temperature")])
def test_unsupported_or_bad_parameters_are_400_naming_them(served, extra, param):
    _, url = served
    response = httpx.post(f"{url}/completions", json={"model": "chat", "prompt": "hi"} | extra,
                          headers={"Authorization": f"Bearer {ALICE}"}, timeout=60)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param and param in error["message"] and error["type"] == "invalid_request_error"


def test_n_choices_and_prompt_lists_answer_in_openais_order(served):
    """Choice i*n+j is prompt i's j-th sample; greedy choices equal gRPC's greedy run of their
    prompt; prompt tokens count once per prompt, completion tokens once per choice."""
    alice, url = served
    prompts = [[1, 2, 3], [4, 5], [9, 8, 7, 6]]
    expected = [alice.generate("chat", p, max_tokens=12, ignore_eos=True) for p in prompts]
    out = _openai(url).completions.create(model="chat", prompt=prompts, n=2, **GREEDY)
    assert [c.index for c in out.choices] == list(range(6))
    assert [c.text for c in out.choices] == [e["text"] for e in expected for _ in range(2)]
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (9, 6 * 12)
    chunks = list(_openai(url).completions.create(model="chat", prompt=prompts, n=2, stream=True, **GREEDY))
    streamed = {i: "".join(ch.choices[0].text for ch in chunks if ch.choices and ch.choices[0].index == i)
                for i in range(6)}
    assert streamed == {c.index: c.text for c in out.choices}
    finishes = [ch.choices[0].index for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert sorted(finishes) == list(range(6))  # exactly one finish chunk per choice


def test_seeded_n_choices_differ_and_the_first_equals_n_1(served):
    _, url = served
    client = _openai(url)
    sampled = {"prompt": [3, 1, 4], "max_tokens": 12, "temperature": 1.0, "seed": 1234,
               "extra_body": {"ignore_eos": True}}
    single = client.completions.create(model="chat", **sampled)
    several = client.completions.create(model="chat", n=3, **sampled)
    again = client.completions.create(model="chat", n=3, **sampled)
    texts = [c.text for c in several.choices]
    assert texts[0] == single.choices[0].text and texts == [c.text for c in again.choices]
    assert len(set(texts)) == 3  # 12 tokens drawn at temperature 1 from three different seeds
    chat = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}], n=2, **GREEDY)
    assert [c.index for c in chat.choices] == [0, 1]
    assert chat.choices[0].message.content == chat.choices[1].message.content


def test_penalties_reach_the_engine_as_grpcs_do(served):
    """The same penalties through HTTP and gRPC give the same tokens, and they change the output
    (tests/engine/test_engine_penalties.py checks the engine against a reference)."""
    alice, url = served
    penalties = {"presence_penalty": -2.0, "frequency_penalty": 0.5, "repetition_penalty": 1.25}  # < 0 favours repeats
    expected = alice.generate("chat", [5, 5, 5, 5], max_tokens=12, ignore_eos=True, **penalties)
    plain = alice.generate("chat", [5, 5, 5, 5], max_tokens=12, ignore_eos=True)
    assert expected["token_ids"] != plain["token_ids"]
    out = _openai(url).completions.create(model="chat", prompt=[5, 5, 5, 5], presence_penalty=-2.0,
                                          frequency_penalty=0.5, temperature=0, max_tokens=12,
                                          extra_body={"ignore_eos": True, "repetition_penalty": 1.25})
    assert out.choices[0].text == expected["text"]


def test_logprobs_equal_grpcs_in_openais_shapes(served):
    """Completions (whole and streamed) and chat logprobs carry the engine's values, the same
    the gRPC API returns (tests/engine/test_engine_penalties.py checks them against a reference)."""
    alice, url = served
    grpc_out = alice.generate("chat", [1, 2, 3], max_tokens=6, ignore_eos=True, logprobs=3)
    chosen = [e["logprob"] for e in grpc_out["logprobs"]]
    tops = [[t["logprob"] for t in e["top"]] for e in grpc_out["logprobs"]]
    assert [e["token_id"] for e in grpc_out["logprobs"]] == grpc_out["token_ids"] and all(len(t) == 3 for t in tops)
    client = _openai(url)
    out = client.completions.create(model="chat", prompt=[1, 2, 3], logprobs=3, **{**GREEDY, "max_tokens": 6})
    lp = out.choices[0].logprobs
    assert lp.token_logprobs == chosen
    # keyed by token text, as OpenAI does: byte tokens >= 128 all decode to U+FFFD and collide
    assert all(set(d.values()) <= set(t) and d for d, t in zip(lp.top_logprobs, tops))
    assert "".join(lp.tokens) == out.choices[0].text and lp.text_offset[0] == 0
    chunks = list(client.completions.create(model="chat", prompt=[1, 2, 3], logprobs=3, stream=True,
                                            **{**GREEDY, "max_tokens": 6}))
    assert [v for c in chunks if c.choices and c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs] \
        == chosen
    chat = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}], logprobs=True,
                                          top_logprobs=2, **{**GREEDY, "max_tokens": 6})
    content = chat.choices[0].logprobs.content
    assert len(content) == 6 and all(len(e.top_logprobs) == 2 for e in content)
    assert content[0].top_logprobs[0].logprob >= content[0].top_logprobs[1].logprob
    assert _openai(url).completions.create(model="chat", prompt=[1], **GREEDY).choices[0].logprobs is None


def test_auth_and_unknown_model_errors(served):
    _, url = served
    for headers in ({}, {"Authorization": "Bearer wrong-token-000"}):
        response = httpx.get(f"{url}/models", headers=headers, timeout=60)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        _openai(url, "wrong-token-000").completions.create(model="chat", prompt="hi")
    with pytest.raises(openai.NotFoundError) as err:
        _openai(url, BOB).completions.create(model="chat", prompt="hi")  # alice's deployment, not bob's
    assert err.value.body["param"] == "model" and err.value.body["code"] == "model_not_found"
    response = httpx.post(f"{url}/completions", json={"model": "nope", "prompt": "hi"},
                          headers={"Authorization": f"Bearer {ALICE}"}, timeout=60)
    assert response.status_code == 404 and set(response.json()["error"]) == {"message", "type", "param", "code"}
    response = httpx.post(f"{url}/completions", json={"model": "chat", "prompt": "x" * (5 * 1024 * 1024)},
                          headers={"Authorization": f"Bearer {ALICE}"}, timeout=60)  # over serve's 4 MiB default
    assert response.status_code == 413 and "--max-request-mib" in response.json()["error"]["message"]


def test_a_model_without_chat_template_is_refused_clearly(tmp_path):
    with pytest.raises(OpenAIError) as err:
        render_chat("plain", str(tmp_path), [{"role": "user", "content": "hi"}])
    assert err.value.status == 400 and err.value.code == "no_chat_template" and "plain" in err.value.message


def _samples(url: str) -> dict[tuple, float]:
    text = httpx.get(url.removesuffix("/v1") + "/metrics", timeout=60).text  # no token: scrapers have none
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_count_requests_by_tenant_and_code_and_time_first_tokens(served):
    _, url = served
    ok = ("shardwright_http_requests_total", (("code", "200"), ("endpoint", "/v1/completions"), ("tenant", "alice")))
    denied = ("shardwright_http_requests_total", (("code", "401"), ("endpoint", "/v1/models"),
                                                  ("tenant", "unauthenticated")))
    ttft = ("shardwright_time_to_first_token_seconds_count", (("deployment", "chat"),))
    before = _samples(url)
    _openai(url).completions.create(model="chat", prompt=[1, 2], max_tokens=2, temperature=0)
    assert httpx.get(f"{url}/models", timeout=60).status_code == 401
    after = _samples(url)
    for key in (ok, denied, ttft):
        assert after[key] - before.get(key, 0.0) == 1, key
