"""InferenceService: Generate and GenerateStream over a deployment's InferenceEngine.

Thin: converts protobuf to the pydantic SamplingParams at the edge, finds the caller's
deployment, and maps failures to status codes (INVALID_ARGUMENT, NOT_FOUND, UNAVAILABLE,
DEADLINE_EXCEEDED). A call whose client goes away or whose deadline passes cancels its request,
freeing its KV blocks before the engine's next step; a call without a deadline gets the server's
default one, and none runs past the server's maximum (CallLimits).

GenerateStream relays the tokens that are ready together: one message per token for a request with
max_tokens_per_message 0 or 1 (what clients from before that field read), else up to that many in
one message's `tokens` (StreamMessages), so that the per-message costs (protobuf, the gRPC write,
the thread wake-ups at both ends) are paid once per batch when the relay falls behind the engine.
"""

from __future__ import annotations

import time

import grpc
from pydantic import ValidationError

from shardwright.serving.requests import RequestFailed
from shardwright.serving.sampling import SamplingParams
from shardwright.api.auth import Authenticator, tenant_of
from shardwright.api.errors import one_line as _one_line
from shardwright.api.gen.shardwright.v1 import inference_pb2 as pb
from shardwright.api.gen.shardwright.v1 import inference_pb2_grpc as pb_grpc
from shardwright.api.limits import FLAGS, CallLimits
from shardwright.api.metrics import ServiceMetrics

DEFAULT_MAX_TOKENS = 16
MAX_TOKENS_PER_MESSAGE = 256  # a GenerateStream message's tokens at most (bounds its size with logprobs)
# grpc reports "no deadline" as ~9.2e18 s left, which threading waits cannot take (OverflowError).
NO_DEADLINE_S = 10**7


def sampling_params(msg: pb.SamplingParams) -> SamplingParams:
    """The pydantic SamplingParams of a request (proto zero values mean 'default')."""
    fields = {"max_tokens": msg.max_tokens or DEFAULT_MAX_TOKENS, "temperature": msg.temperature,
              "top_k": msg.top_k, "top_p": msg.top_p or 1.0, "stop": list(msg.stop),
              "stop_token_ids": list(msg.stop_token_ids), "ignore_eos": msg.ignore_eos,
              "presence_penalty": msg.presence_penalty, "frequency_penalty": msg.frequency_penalty,
              "repetition_penalty": msg.repetition_penalty or 1.0}
    if msg.HasField("seed"):
        fields["seed"] = msg.seed
    if msg.HasField("logprobs"):
        fields["logprobs"] = msg.logprobs
    return SamplingParams(**fields)


def logprob_message(token: int, logprob: tuple) -> pb.TokenLogprob:
    chosen, top = logprob
    return pb.TokenLogprob(token_id=token, logprob=chosen, top=[pb.TopLogprob(token_id=t, logprob=lp) for t, lp in top])


def start_generation(backend, tenant: str, deployment: str, prompt: str | list[int], params: SamplingParams,
                     metrics: ServiceMetrics | None = None, api: str = "grpc"):
    """Queue one generation on the tenant's running deployment; returns (engine, stream).

    The one path from every API (gRPC here, OpenAI-compatible HTTP in api/http.py) into an
    engine, so both give identical tokens, and both are measured and logged alike (with
    `metrics`, the stream is an ObservedStream; its `end()` records a request that ends early).
    Raises LookupError (no such running deployment), ValueError (a request that can never run)
    or RuntimeError (the engine is shut down).
    """
    engine = backend.engine(tenant, deployment)
    stream = engine.submit(prompt, params)
    return engine, stream if metrics is None else metrics.observe(stream, tenant, deployment, api)


def cancel_generation(engine, stream) -> None:
    """Cancel a request (a no-op once finished) and, for an observed one, record its end now."""
    engine.cancel(stream.request_id)
    if hasattr(stream, "end"):
        stream.end("cancelled")


def call_deadline_s(context: grpc.ServicerContext, limits: CallLimits) -> tuple[float, str]:
    """Seconds a generation may run, and whose bound that is: the client's deadline, capped at
    --generate-max-deadline-s; --generate-default-deadline-s when the client set none."""
    left = context.time_remaining()
    if left is None or left >= NO_DEADLINE_S:
        return limits.generate_default_deadline_s, (f"this server's default deadline "
                                                    f"({FLAGS['generate_default_deadline_s']}), as the call set none")
    if left > limits.generate_max_deadline_s:
        return limits.generate_max_deadline_s, f"this server's maximum deadline ({FLAGS['generate_max_deadline_s']})"
    return left, "the call's deadline"


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    def __init__(self, backend, auth: Authenticator, limits: CallLimits | None = None,
                 metrics: ServiceMetrics | None = None) -> None:
        self.backend = backend
        self.auth = auth
        self.limits = limits or CallLimits()
        self.metrics = metrics

    @staticmethod
    def _past_deadline(context, engine, stream, timeout: float, whose: str) -> None:
        cancel_generation(engine, stream)
        context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                      f"{stream.request_id} did not finish within {whose}, {timeout:.1f} s; it was cancelled: "
                      "raise the client timeout, lower max_tokens or use GenerateStream")

    def _submit(self, request: pb.GenerateRequest, context: grpc.ServicerContext):
        tenant = tenant_of(context, self.auth)
        which = request.WhichOneof("prompt")
        prompt = request.text if which == "text" else list(request.token_ids.ids) if which else None
        try:
            params = sampling_params(request.params)
            if prompt is None:
                self.backend.engine(tenant, request.deployment)  # an unknown deployment is NOT_FOUND first
                raise ValueError("give a prompt: text or token_ids")
            engine, stream = start_generation(self.backend, tenant, request.deployment, prompt, params,
                                              self.metrics, "grpc")
        except LookupError as err:
            context.abort(grpc.StatusCode.NOT_FOUND, _one_line(err))
        except (ValueError, ValidationError) as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, _one_line(err))
        except RuntimeError as err:
            context.abort(grpc.StatusCode.UNAVAILABLE, _one_line(err))
        # Runs when the call ends for any reason: a client gone or a deadline passed frees the blocks
        # (cancelling a finished request is a no-op).
        if not context.add_callback(lambda: cancel_generation(engine, stream)):
            cancel_generation(engine, stream)  # the call had already ended
        return engine, stream

    def Generate(self, request, context):
        timeout, whose = call_deadline_s(context, self.limits)
        engine, stream = self._submit(request, context)
        try:
            out = stream.result(timeout_s=timeout)
        except TimeoutError:
            self._past_deadline(context, engine, stream, timeout, whose)
        except RequestFailed as err:
            context.abort(grpc.StatusCode.UNAVAILABLE, _one_line(err))
        return pb.GenerateResponse(request_id=out.request_id, token_ids=out.token_ids, text=out.text,
                                   finish_reason=out.finish_reason or "", prompt_tokens=len(out.prompt_ids),
                                   logprobs=[logprob_message(t, lp) for t, lp in zip(out.token_ids, out.logprobs)])

    def GenerateStream(self, request, context):
        if request.max_tokens_per_message < 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"max_tokens_per_message={request.max_tokens_per_message}: give 0 or 1 (one token per "
                          f"message) or up to {MAX_TOKENS_PER_MESSAGE}")
        timeout, whose = call_deadline_s(context, self.limits)
        end = time.monotonic() + timeout
        engine, stream = self._submit(request, context)
        messages = StreamMessages(stream.output, request.max_tokens_per_message)
        try:
            while True:
                left = end - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                items, done = stream.take(timeout_s=left)  # every token ready now, waiting what is left
                if not context.is_active():
                    return
                yield from messages.of(items)
                if done:
                    break
            if stream.error is not None:
                raise RequestFailed(stream.error)
        except TimeoutError:
            self._past_deadline(context, engine, stream, timeout, whose)
        except RequestFailed as err:
            context.abort(grpc.StatusCode.UNAVAILABLE, _one_line(err))
        yield pb.GenerateStreamResponse(token_id=-1, finish_reason=stream.output.finish_reason or "",
                                        prompt_tokens=len(stream.output.prompt_ids))


class StreamMessages:
    """The GenerateStreamResponse messages of a stream's (token id or None, text delta) items.

    `per_message` 0 or 1: one message per item in token_id, text and logprob (what clients from
    before `max_tokens_per_message` read). N > 1: the items given together, N at most per message,
    in its `tokens` (token_id -1, text and logprob empty). Either way the same tokens, text deltas and
    logprobs in the same order; `output` is the request's RequestOutput, whose logprobs[i] is the
    i-th token's.
    """

    def __init__(self, output, per_message: int) -> None:
        self.output, self.per_message = output, min(max(per_message, 1), MAX_TOKENS_PER_MESSAGE)
        self.seen = 0  # tokens given so far

    def _logprob(self, token: int | None) -> pb.TokenLogprob | None:
        if token is None:
            return None
        self.seen += 1
        logprobs = self.output.logprobs
        return logprob_message(token, logprobs[self.seen - 1]) if len(logprobs) >= self.seen else None

    def of(self, items: list[tuple[int | None, str]]) -> list[pb.GenerateStreamResponse]:
        if self.per_message == 1:
            return [pb.GenerateStreamResponse(token_id=-1 if token is None else token, text=text,
                                              logprob=self._logprob(token)) for token, text in items]
        tokens = [pb.StreamedToken(token_id=-1 if token is None else token, text=text, logprob=self._logprob(token))
                  for token, text in items]
        n = self.per_message
        return [pb.GenerateStreamResponse(token_id=-1, tokens=tokens[i: i + n]) for i in range(0, len(tokens), n)]
