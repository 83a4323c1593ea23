"""The OpenAI-compatible HTTP API (`shardwright serve --http-port P`), beside gRPC.

FastAPI on uvicorn in a background thread, over the same control plane, tokens and engines as
the gRPC InferenceService (both queue work through `start_generation`, so greedy output is
identical). Guarantees:
- `GET /v1/models` lists the caller's tenant's running deployments; `POST /v1/completions` (one
  prompt or a list) and `POST /v1/chat/completions` (with the deployment's chat template only),
  each with `n` choices per prompt, answer as OpenAI does:
  a JSON body with `usage`, or with `stream: true` server-sent events `data: {chunk}` ending
  with `data: [DONE]` (and a usage chunk first when `stream_options.include_usage`);
- every error is `{"error": {"message", "type", "param", "code"}}`: 400 for bad or unsupported
  parameters (named in `param`), 401 without a valid `Authorization: Bearer TOKEN` when a tokens
  file is configured, 404 for an unknown model, 413 over the request size limit, 429 when the
  tenant already holds `--max-streams-per-tenant` streams and generations (HTTP and gRPC share the
  count), 503 when the engine cannot serve, 504 when a generation passes
  `--generate-default-deadline-s` (it is cancelled);
- a client that disconnects, mid-stream or while waiting for a whole completion, cancels its
  request, which frees its KV blocks before the engine's next step;
- `GET /metrics` serves Prometheus text without a token: the server's metrics, gRPC and HTTP
  requests alike (api/metrics.py).
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import threading
import time

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from shardwright.serving.requests import RequestFailed
from shardwright.api.auth import Authenticator
from shardwright.api.chat_template import render_chat
from shardwright.api.errors import one_line
from shardwright.api.metrics import CountRequests, ServiceMetrics
from shardwright.api.limits import CallLimits, StreamSlots, too_large_message
from shardwright.api.openai_schema import (ChatRequest, CompletionRequest, OpenAIError, choice, completion_id,
                                           envelope, finish, logprobs_body, parse, usage)
from shardwright.api.servicers.inference import cancel_generation, start_generation
from shardwright.config import Settings

_END = object()
DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks that its client is still there


def _tenant(request: Request, auth: Authenticator) -> str:
    header = request.headers.get("authorization", "")
    tenant = auth.tenant([("authorization", header)])
    if tenant is None:
        raise OpenAIError(401, "missing or invalid bearer token: send 'Authorization: Bearer TOKEN' "
                          "(a token from the server's SHARDWRIGHT_TOKENS_FILE)", code="invalid_api_key")
    return tenant


async def _json_body(request: Request, limit_bytes: int):
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit_bytes:
        raise OpenAIError(413, too_large_message(int(declared), limit_bytes), code="request_too_large")
    body = await request.body()
    if len(body) > limit_bytes:
        raise OpenAIError(413, too_large_message(len(body), limit_bytes), code="request_too_large")
    try:
        return json.loads(body)
    except ValueError as err:
        raise OpenAIError(400, f"the request body is not JSON: {err}", code="invalid_json") from err


def _start(backend, tenant: str, model: str, prompt, params, metrics: ServiceMetrics):
    """`start_generation`, with its failures as OpenAI errors."""
    try:
        return start_generation(backend, tenant, model, prompt, params, metrics, "http")
    except LookupError as err:
        raise OpenAIError(404, f"The model {model!r} does not exist: {one_line(err)}", param="model",
                          code="model_not_found") from err
    except ValueError as err:
        raise OpenAIError(400, one_line(err), param="prompt", code="invalid_value") from err
    except RuntimeError as err:
        raise OpenAIError(503, one_line(err), code="engine_unavailable") from err


async def _events(stream):
    """The stream's (token, text) events on the event loop, pumped by a thread of its own (so
    that many open streams do not exhaust the default executor); raises RequestFailed. The
    events that are ready together cross to the loop in one batch (one wake-up, not one per token)."""
    loop, queue = asyncio.get_running_loop(), asyncio.Queue()

    def put(item) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the server's loop has closed: nobody is listening any more
            pass

    def pump() -> None:
        while True:
            items, done = stream.take()
            if items:
                put(items)
            if done:
                put(_END if stream.error is None else RequestFailed(stream.error))
                return

    threading.Thread(target=pump, name=f"shardwright-http-{stream.request_id}", daemon=True).start()
    while (batch := await queue.get()) is not _END:
        if isinstance(batch, Exception):
            raise batch
        for item in batch:
            yield item


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"


class _Choice:
    """One choice of a completion: its own request in the engine."""

    def __init__(self, index: int, engine, stream, counts_prompt: bool, wants_logprobs: bool) -> None:
        self.index, self.engine, self.stream = index, engine, stream
        self.counts_prompt = counts_prompt  # the first choice of its prompt: its prompt tokens count once
        self.wants_logprobs = wants_logprobs
        self.tokens_seen = 0  # tokens delivered so far (events with a token id)
        self.logprobs_sent = 0  # of which the logprobs went out in a chunk
        self.text_offset = 0  # completions' text_offset of the next logprob entry

    def take_logprobs(self) -> list | None:
        """Logprob entries of the tokens delivered since the last call (None when not asked)."""
        if not self.wants_logprobs:
            return None
        out = self.stream.output
        upto = min(self.tokens_seen, len(out.logprobs))
        decode = self.engine.tokenizer.decode
        entries = [(decode([out.token_ids[i]]), out.logprobs[i][0],
                    [(decode([t]), lp) for t, lp in out.logprobs[i][1]]) for i in range(self.logprobs_sent, upto)]
        self.logprobs_sent = upto
        return entries

    def cancel(self) -> None:
        cancel_generation(self.engine, self.stream)  # a no-op once it has finished


def _start_choices(backend, tenant: str, model: str, prompts: list, params: list,
                   metrics: ServiceMetrics) -> list[_Choice]:
    """Queue `len(params)` choices of every prompt; on a failure, cancels those already queued."""
    choices: list[_Choice] = []
    try:
        for prompt in prompts:
            for j, one in enumerate(params):
                engine, stream = _start(backend, tenant, model, prompt, one, metrics)
                choices.append(_Choice(len(choices), engine, stream, counts_prompt=j == 0,
                                       wants_logprobs=one.logprobs is not None))
    except BaseException:
        for c in choices:
            c.cancel()
        raise
    return choices


class _DeadlinePassed(Exception):
    """The request's deadline passed before its last token."""


class _Call:
    """One completion request (its choices) on its way through an engine, within `deadline_s`
    seconds; `release()` gives its stream slot back (once, however the call ends)."""

    def __init__(self, request: Request, req, chat: bool, choices: list[_Choice], deadline_s: float,
                 release=None) -> None:
        self.request, self.req, self.chat, self.choices = request, req, chat, choices
        self.cid = completion_id(chat)
        self.deadline_s, self._end = deadline_s, time.monotonic() + deadline_s
        self._release, self._released = release, False

    def release(self) -> None:
        if self._release is not None and not self._released:
            self._released = True
            self._release()

    def _left(self) -> float:
        return self._end - time.monotonic()

    def _timeout_error(self) -> OpenAIError:
        return OpenAIError(504, f"the request did not finish within its deadline of {self.deadline_s:g} s and was "
                           "cancelled (the server's `shardwright serve --generate-default-deadline-s`); lower "
                           "max_tokens or n, or stream", code="timeout")

    def _envelope(self, chunk: bool, choices: list[dict], **extra) -> dict:
        return envelope(self.cid, self.chat, self.req.model, chunk, choices, **extra)

    def cancel(self) -> None:
        """Cancel every choice's request in its engine (a no-op once it has finished)."""
        for c in self.choices:
            c.cancel()

    def _usage(self) -> dict:
        outs = [(c.counts_prompt, c.stream.output) for c in self.choices]
        return usage(sum(len(o.prompt_ids) for counts, o in outs if counts), sum(len(o.token_ids) for _, o in outs))

    async def _merged(self):
        """(choice, text or None at its end) as the choices' events arrive (counting each
        choice's tokens in `tokens_seen`); raises RequestFailed."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(c: _Choice) -> None:
            try:
                async for token, text in _events(c.stream):
                    await queue.put((c, token, text))
                await queue.put((c, None, None))
            except RequestFailed as err:
                await queue.put(err)

        tasks = [asyncio.ensure_future(pump(c)) for c in self.choices]
        try:
            for _ in self.choices:
                while True:
                    try:
                        item = await asyncio.wait_for(queue.get(), timeout=max(self._left(), 0.0))
                    except asyncio.TimeoutError:
                        raise _DeadlinePassed from None
                    if isinstance(item, Exception):
                        raise item
                    c, token, text = item
                    c.tokens_seen += token is not None
                    yield c, text
                    if text is None:
                        break
        finally:
            for task in tasks:
                task.cancel()

    async def sse(self):
        """Server-sent events; every choice's request is cancelled however the stream ends."""
        try:
            if self.chat:
                yield _sse(self._envelope(True, [choice(True, "", None, delta=True, first=True, index=c.index)
                                                 for c in self.choices]))
            async for c, text in self._merged():
                if text is None:
                    reason = finish(c.stream.output.finish_reason)
                    yield _sse(self._envelope(True, [choice(self.chat, "", reason, delta=True, index=c.index,
                                                            logprobs=self._logprobs(c))]))
                elif text:
                    yield _sse(self._envelope(True, [choice(self.chat, text, None, delta=True, index=c.index,
                                                            logprobs=self._logprobs(c))]))
            if self.req.stream_options is not None and self.req.stream_options.include_usage:
                yield _sse(self._envelope(True, [], usage=self._usage()))
            yield "data: [DONE]\n\n"
        except RequestFailed as err:
            yield _sse(OpenAIError(503, one_line(err), code="request_failed").body())
        except _DeadlinePassed:
            yield _sse(self._timeout_error().body())
        finally:
            self.cancel()
            self.release()

    async def whole(self) -> dict:
        """The complete answer; cancels the requests if the client goes away first."""
        async def drain() -> dict[int, str]:
            texts = {c.index: [] for c in self.choices}
            async for c, text in self._merged():
                if text:
                    texts[c.index].append(text)
            return {i: "".join(parts) for i, parts in texts.items()}

        task = asyncio.ensure_future(drain())
        try:
            while not (await asyncio.wait({task}, timeout=DISCONNECT_POLL_S))[0]:
                if await self.request.is_disconnected():
                    task.cancel()
                    raise OpenAIError(499, "the client disconnected; the request was cancelled")
            try:
                texts = task.result()
            except RequestFailed as err:
                raise OpenAIError(503, one_line(err), code="request_failed") from err
            except _DeadlinePassed:
                raise self._timeout_error() from None
        finally:
            self.cancel()
            self.release()
        return self._envelope(False, [choice(self.chat, texts[c.index], finish(c.stream.output.finish_reason),
                                             delta=False, index=c.index, logprobs=self._logprobs(c))
                                      for c in self.choices], usage=self._usage())

    def _logprobs(self, c: _Choice) -> dict | None:
        """The logprobs of `c`'s tokens not yet sent, in OpenAI's shape (None when not asked)."""
        entries = c.take_logprobs()
        body = logprobs_body(self.chat, entries, c.text_offset)
        if entries:
            c.text_offset += sum(len(t) for t, _, _ in entries)
        return body


class _EventStream(StreamingResponse):
    """`call.sse()` as text/event-stream; the request is cancelled however the response ends,
    even when the client is gone before the first event (so the generator never starts)."""

    def __init__(self, call: _Call) -> None:
        super().__init__(call.sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.call = call

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.call.cancel()
            self.call.release()


def build_app(backend, auth: Authenticator, max_request_bytes: int, metrics: ServiceMetrics | None = None,
              limits: CallLimits | None = None, slots: StreamSlots | None = None) -> FastAPI:
    """The FastAPI application of the OpenAI-compatible API over `backend` (a SchedulerService);
    `metrics`: the server's (shared with gRPC), else a registry of its own; `slots`: the gRPC
    server's stream slots, so that a tenant's HTTP generations and gRPC streams share its limit."""
    app = FastAPI(title="Shardwright OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = metrics or ServiceMetrics()
    limits = limits or CallLimits()
    slots = slots or StreamSlots(limits)
    app.add_middleware(CountRequests, metrics=metrics, auth=auth)

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, err: OpenAIError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, err: HTTPException):
        return JSONResponse(OpenAIError(err.status_code, f"{request.method} {request.url.path}: {err.detail}",
                                        code=str(err.status_code)).body(), status_code=err.status_code)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.text(), media_type=metrics.content_type)

    @app.get("/v1/models")
    async def models(request: Request):
        tenant = _tenant(request, auth)
        records = await asyncio.to_thread(_running_deployments, backend, tenant)
        return {"object": "list", "data": [{"id": r["name"], "object": "model", "created": int(r["submitted_at_s"]),
                                            "owned_by": tenant} for r in records]}

    async def generate(request: Request, chat: bool):
        tenant = _tenant(request, auth)
        req = parse(ChatRequest if chat else CompletionRequest, await _json_body(request, max_request_bytes))
        params = req.choice_params(req.max_completion_tokens if chat else None)
        prompts = [await asyncio.to_thread(_chat_prompt, backend, tenant, req)] if chat else req.prompts()
        key = f"tenant {tenant}"
        refusal = slots.acquire(key, limits.max_streams_per_tenant, "max_streams_per_tenant")
        if refusal is not None:
            raise OpenAIError(429, refusal, code="rate_limit_exceeded")
        try:
            choices = await asyncio.to_thread(_start_choices, backend, tenant, req.model, prompts, params, metrics)
        except BaseException:
            slots.release(key)
            raise
        call = _Call(request, req, chat, choices, limits.generate_default_deadline_s, lambda: slots.release(key))
        if req.stream:
            return _EventStream(call)
        return await call.whole()

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, chat=True)

    return app


def _running_deployments(backend, tenant: str) -> list[dict]:
    records, token = backend.list(tenant, page_size=100, state="running", kind="inference")
    while token:
        more, token = backend.list(tenant, page_size=100, page_token=token, state="running", kind="inference")
        records += more
    return records


def _chat_prompt(backend, tenant: str, req: ChatRequest) -> str:
    try:
        engine = backend.engine(tenant, req.model)
    except LookupError as err:
        raise OpenAIError(404, f"The model {req.model!r} does not exist: {one_line(err)}", param="model",
                          code="model_not_found") from err
    return render_chat(req.model, engine.config.model_dir, [m.model_dump() for m in req.messages])


class HttpServer:
    """uvicorn serving `build_app` on its own thread; TLS from the same PEM files as gRPC."""

    def __init__(self, backend, auth: Authenticator, host: str, port: int, max_request_bytes: int,
                 settings: Settings, grace_s: float = 10.0, metrics: ServiceMetrics | None = None,
                 limits: CallLimits | None = None, slots: StreamSlots | None = None) -> None:
        self.host, self.requested_port, self.grace_s = host, port, grace_s
        tls = {}
        if settings.tls_cert is not None and settings.tls_key is not None:
            tls = {"ssl_certfile": str(settings.tls_cert), "ssl_keyfile": str(settings.tls_key)}
            if settings.tls_client_ca is not None:
                tls |= {"ssl_ca_certs": str(settings.tls_client_ca), "ssl_cert_reqs": ssl.CERT_REQUIRED}
        config = uvicorn.Config(build_app(backend, auth, max_request_bytes, metrics, limits, slots),
                                log_level="warning",
                                access_log=False, lifespan="off",
                                timeout_graceful_shutdown=max(1, round(grace_s)), **tls)
        self.tls = bool(tls)
        self.server = uvicorn.Server(config)
        self.thread: threading.Thread | None = None
        self.port = 0

    def start(self, timeout_s: float = 30.0) -> int:
        """Bind (an OS-chosen port when the port is 0) and serve; returns the bound port."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.requested_port))
        except OSError as err:
            sock.close()
            raise OSError(f"cannot bind the HTTP port {self.host}:{self.requested_port} ({err.strerror}); "
                          "choose another --http-port") from err
        self.port = sock.getsockname()[1]
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                       name="shardwright-http", daemon=True)
        self.thread.start()
        waiting, deadline = threading.Event(), time.monotonic() + timeout_s
        while not self.server.started and self.thread.is_alive() and time.monotonic() < deadline:
            waiting.wait(0.05)
        if not self.server.started:
            raise RuntimeError(f"the HTTP server on {self.host}:{self.port} did not start; see the log above")
        return self.port

    def stop(self) -> None:
        """Stop accepting, let open requests finish for up to `grace_s`, then close."""
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=self.grace_s + 5)


def start_http(grpc_server, port: int) -> HttpServer:
    """Serve the HTTP API beside a started ShardwrightServer: its control plane, tokens, host,
    request size limit, TLS files and grace period. Returns the started HttpServer."""
    options = grpc_server.options
    http = HttpServer(grpc_server.control, grpc_server.auth, options.host, port, options.max_message_bytes,
                      options.settings, options.grace_s, metrics=grpc_server.metrics, limits=options.limits,
                      slots=grpc_server.guard.slots)
    http.start()
    return http
